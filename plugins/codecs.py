"""One codec per low-bit format: its code range, block size, scale rule and quantize / dequantize, in torch.

Every quantizer of the project goes through this table: the Q/DQ graph pass (``passes/insert_qdq``), the torch
package and its activation fake quantization (``torch_package``), the kernels' reference quantizers
(:mod:`qc_compile.plugins.formats`), calibration (via the torch package) and the plan's format menus
(``plan.WEIGHT_FORMATS`` / ``ACTIVATION_FORMATS`` are views of :data:`CODECS`). It imports only torch, so the
plugins, the runtime and the compiler can all use it.

Conventions (``x ~= code * scale``, scales fp32, rounding half to even):

* **Given-scale quantization** (:meth:`Codec.quantize`) divides: ``codes = to_codes(x / scale)``, which is what ONNX
  ``QuantizeLinear`` defines. The Q/DQ graphs' weights, the torch package's INT8 / INT6 / INT4 weights and every
  static-scale activation use it.
* **Per-row dynamic quantization** (:meth:`Codec.quantize_rows`) multiplies by the reciprocal,
  ``to_codes(x * (qmax / amax))``, as the Triton producers do. The kernels' per-token activations and the torch
  package's FP8 weights (which feed ``qc::fp8_linear``) use it. The two can differ by one code on rare ties; both
  are kept exactly as they were recorded (tests/test_codecs.py).
* Scales from a row/block maximum floor it at :data:`AMAX_FLOOR` (a zero row quantizes to zeros); scales from a
  calibrated maximum (:meth:`Codec.static_scale`, the plan's ``act_scale``) floor it at :data:`CALIB_AMAX_FLOOR`.
* NVFP4 is two-level: an fp32 per-tensor scale ``amax / (6 * 448)`` and an FP8 E4M3 scale per block of 16
  (:func:`quantize_nvfp4`). It is **simulated** on Hopper (no FP4 tensor cores before Blackwell).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
INT4_MAX = 7.0
E2M1_MAX = 6.0
AMAX_FLOOR = 1e-12
CALIB_AMAX_FLOOR = 1e-8
NVFP4_BLOCK = 16
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# |v| above a threshold adds one code step: strictly for these (ties go down to the even code) ...
E2M1_STRICT = (0.25, 1.25, 2.5, 5.0)
# ... and inclusively for these (ties go up to the even code).
E2M1_INCLUSIVE = (0.75, 1.75, 3.5)


@dataclass(frozen=True)
class Codec:
    """A number format. ``kind``: ``none`` (unquantized), ``float8`` (E4M3 cast), ``int`` (rounded integers) or
    ``e2m1`` (FP4 values); ``qmax`` the largest code magnitude (scale = amax / qmax); ``qmin`` the most negative
    code the storage holds (ONNX QuantizeLinear saturates there, e.g. -128 for INT8); ``block`` the block size along
    the input (weights) or last (activations) axis; ``weight`` / ``activation`` whether the plan may use it there."""

    name: str
    bits: int
    kind: str
    qmax: float | None = None
    qmin: float | None = None
    block: int | None = None
    weight: bool = True
    activation: bool = True
    simulated: bool = False
    min_opset: int = 13

    # ------------------------------------------------------------------ scales
    def scale(self, amax: torch.Tensor) -> torch.Tensor:
        """The scale for a row/block maximum (fp32)."""
        return amax.clamp_min(AMAX_FLOOR) / self.qmax

    def static_scale(self, amax: float) -> float:
        """The plan's per-tensor ``act_scale`` for a calibrated |x| maximum."""
        return max(float(amax), CALIB_AMAX_FLOOR) / self.qmax

    # ------------------------------------------------------------------ codes
    def to_codes(self, y: torch.Tensor) -> torch.Tensor:
        """Values already in code units -> codes (float8_e4m3fn, int8, or fp32 E2M1 values), saturating."""
        if self.kind == "float8":
            return y.clamp(self.qmin, self.qmax).to(torch.float8_e4m3fn)
        if self.kind == "int":
            return self._round(y).to(torch.int8)
        if self.kind == "e2m1":
            return round_to_e2m1(y)
        raise ValueError(f"{self.name} has no codes")

    def _round(self, y: torch.Tensor) -> torch.Tensor:
        """Integer formats: the codes as fp32 numbers (a negative value rounding to zero keeps its sign, -0.0)."""
        return torch.round(y).clamp(self.qmin, self.qmax)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """Given-scale quantization (QuantizeLinear): ``to_codes(x / scale)``."""
        return self.to_codes(x / scale)

    @staticmethod
    def dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """``q * scale`` in fp32."""
        return q.float() * scale

    def fake_quant(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """Quantize-dequantize with a static per-tensor scale (a Q/DQ pair on an activation edge), fp32. Integer codes
        stay fp32 here, so -0.0 survives as in the graphs' float arithmetic."""
        y = x.float() / scale
        return (self._round(y) if self.kind == "int" else self.to_codes(y).float()) * scale

    def quantize_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row dynamic quantization, reciprocal form (the kernels' convention): ``(codes, scale[..., 1])``."""
        amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
        return self.to_codes(x.float() * (self.qmax / amax)), amax / self.qmax

    def quantize_channels(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``[N, K]``, one scale per output channel, given-scale form: ``(codes [N, K], scale [N])``."""
        s = self.scale(w.float().abs().amax(dim=1))
        return self.quantize(w, s[:, None]), s

    def quantize_blocks(self, w: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``[N, K]``, one scale per ``block`` (default: the codec's) input channels:
        ``(codes [N, K], scale [N, K / block])``."""
        n, k = w.shape
        block = block or self.block
        if not block or k % block:
            raise ValueError(f"{self.name}: block {block} must divide K={k}")
        wb = w.float().reshape(n, k // block, block)
        s = self.scale(wb.abs().amax(-1, keepdim=True))
        return self.quantize(wb, s).reshape(n, k), s.squeeze(-1)

    @staticmethod
    def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Codes ``[N, K]`` and block scales ``[N, K / block]`` back to fp32 ``[N, K]``."""
        n, k = q.shape
        block = k // scales.shape[-1]
        return (q.float().reshape(n, k // block, block) * scales.float().unsqueeze(-1)).reshape(n, k)


CODECS: dict[str, Codec] = {c.name: c for c in (
    Codec("bf16", 16, "none"),
    Codec("fp8_e4m3", 8, "float8", FP8_E4M3_MAX, -FP8_E4M3_MAX, min_opset=19),
    Codec("int8", 8, "int", INT8_MAX, -128.0),
    Codec("int4_b64", 4, "int", INT4_MAX, -8.0, block=64, activation=False, min_opset=21),
    Codec("int4_b128", 4, "int", INT4_MAX, -8.0, block=128, activation=False, min_opset=21),
    Codec("nvfp4", 4, "e2m1", E2M1_MAX, -E2M1_MAX, block=NVFP4_BLOCK, min_opset=23),
    Codec("int6_sim", 6, "int", 31.0, -31.0, simulated=True),  # the graph clips INT8 codes to +-31
)}


def codec(name: str) -> Codec:
    """The codec of a format name (KeyError names the known ones)."""
    try:
        return CODECS[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r}; known: {', '.join(CODECS)}") from None


# ------------------------------------------------------------------------------------------------ INT4 packing
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed INT4 codes in [-8, 7] (any integer dtype, last dim even) two per byte.

    Stored offset-binary (``code + 8`` in 0..15), element ``2i`` in the low nibble and ``2i+1`` in the high
    nibble of byte ``i``; the result is uint8 with the last dimension halved.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K/2]`` to int8 codes ``[..., K]`` in [-8, 7]."""
    if p.dtype != torch.uint8:
        raise ValueError(f"packed int4 must be uint8, got {p.dtype}")
    lo = (p & 0x0F).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# ------------------------------------------------------------------------------------------------ NVFP4
def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (+-{0, .5, 1, 1.5, 2, 3, 4, 6}), ties to even code, saturating at 6."""
    a = x.float().abs()
    code = sum((a > t).int() for t in E2M1_STRICT) + sum((a >= t).int() for t in E2M1_INCLUSIVE)
    grid = torch.tensor(E2M1_GRID, device=x.device)
    return torch.sign(x.float()) * grid[code]


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The per-tensor (second-level) scale of a dynamic NVFP4 tensor, fp32 scalar."""
    return (amax.clamp_min(AMAX_FLOOR) / (FP8_E4M3_MAX * E2M1_MAX)).reshape(())


def nvfp4_static_global_scale(amax: float) -> float:
    """The per-tensor scale of NVFP4 activations from a calibrated |x| maximum (the plan's ``global_scale``)."""
    return max(float(amax), CALIB_AMAX_FLOOR) / (E2M1_MAX * FP8_E4M3_MAX)


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4: E2M1 values, one FP8 E4M3 scale per 16 values of the last axis, one fp32 scale per tensor.

    ``global = amax(x) / (448 * 6)`` unless given (a static, calibrated one); block scale
    ``s_b = fp8(amax_b / 6 / global)``; values ``e2m1(x / (s_b * global))``. Returns ``(values fp32 on the E2M1 grid
    [..., K], block scales float8_e4m3fn [..., K/16], global scale fp32 scalar)``; the codes stay unpacked because
    nothing on Hopper consumes packed FP4.
    """
    k = x.shape[-1]
    if k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension divisible by {NVFP4_BLOCK}, got {k}")
    xf = x.float()
    gscale = nvfp4_global_scale(xf.abs().amax()) if global_scale is None else global_scale
    xb = xf.reshape(*x.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    bamax = xb.abs().amax(-1, keepdim=True)
    bscale = (bamax / E2M1_MAX / gscale).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    denom = bscale.float() * gscale
    vals = round_to_e2m1(torch.where(denom > 0, xb / denom.clamp_min(torch.finfo(torch.float32).tiny), 0.0))
    return vals.reshape(x.shape), bscale.squeeze(-1), gscale


def dequantize_nvfp4(vals: torch.Tensor, bscale: torch.Tensor, gscale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_nvfp4` (fp32)."""
    k = vals.shape[-1]
    vb = vals.float().reshape(*vals.shape[:-1], k // NVFP4_BLOCK, NVFP4_BLOCK)
    return (vb * (bscale.float().unsqueeze(-1) * gscale)).reshape(vals.shape)


def fake_quant_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize through NVFP4 (simulated on Hopper), fp32."""
    return dequantize_nvfp4(*quantize_nvfp4(x, global_scale))
