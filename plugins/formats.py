"""Low-bit number formats and their reference quantizers (pure torch, any device).

These functions define what every kernel in :mod:`qc_compile.plugins` must compute; the Triton kernels and the
TensorRT plugins are checked against them. Conventions shared by all of them:

* Activations are quantized **per token** (one scale per row of the last dimension), weights **per output
  channel** (rows of ``W[N, K]``) or **per block** of the input dimension. Scales are fp32 and multiply the
  quantized value: ``x ~= q * scale``.
* Activation scales keep a trailing singleton dimension (``x[..., K] -> scale[..., 1]``) so they broadcast and feed
  ``torch._scaled_mm`` unchanged; weight scales are ``[N]`` (per channel) or ``[N, K // block]`` (per block).
* A row whose absolute maximum is zero gets the scale ``AMAX_FLOOR / qmax`` and quantizes to zeros (no NaN).
* Rounding is round-half-to-even everywhere (torch's float8 cast and :func:`torch.round`).

NVFP4 has no tensor-core path on Hopper (sm_90): everything NVFP4 here is **simulated** (fake quantization in
higher precision) and must never be reported as a speedup there.
"""

from __future__ import annotations

import functools
import math

import torch

FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
INT4_MAX = 7.0
E2M1_MAX = 6.0
AMAX_FLOOR = 1e-12
NVFP4_BLOCK = 16
NVFP4_SIMULATED_ON_HOPPER = True
"""NVFP4 MMA exists only on Blackwell (sm_100/sm_120); on sm_90 this format is emulated."""

_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _amax_last(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)


# --------------------------------------------------------------------------------------------------------------
# Hadamard rotation
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, normalized: bool = True) -> torch.Tensor:
    """Sylvester Hadamard matrix of size ``n`` (a power of two); symmetric, and orthogonal when normalised.

    Unnormalised entries are exactly +-1, which is what the kernels feed to the tensor cores (exact in bf16);
    the ``1/sqrt(n)`` factor is applied afterwards in fp32.
    """
    h = _sylvester(n)
    if normalized:
        h = h / math.sqrt(n)
    return h.to(dtype)


def check_rotation_block(k: int, block: int) -> None:
    """Raise ValueError unless ``block`` is 0 (no rotation) or a power of two dividing ``k``."""
    if block == 0:
        return
    if block < 0 or block & (block - 1):
        raise ValueError(f"rotation block must be 0 or a power of two, got {block}")
    if k % block:
        raise ValueError(f"rotation block {block} does not divide the channel dimension {k}")


def blocked_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Apply the normalised ``block x block`` Hadamard to each consecutive block of the last dimension.

    Equivalent to ``x @ blockdiag(H, ..., H)``; since H is symmetric and orthogonal the transform is its own
    inverse. Computed in float64 for float64 input, else float32 (the result has that dtype). ``block == 0``
    returns ``x`` upcast the same way. For a linear ``y = x W^T`` rotate both sides along K:
    ``y = blocked_hadamard(x) @ blocked_hadamard(W)^T``.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    check_rotation_block(x.shape[-1], block)
    if block in (0, 1):
        return xf
    h = hadamard_matrix(block, dt).to(x.device)
    shape = xf.shape
    return (xf.reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# Per-token activation quantizers and per-channel weight quantizers
# --------------------------------------------------------------------------------------------------------------
def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric FP8 E4M3 per row: ``scale = absmax / 448``; returns ``(q e4m3fn, scale fp32[..., 1])``."""
    amax = _amax_last(x)
    q = (x.float() * (FP8_E4M3_MAX / amax)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, amax / FP8_E4M3_MAX


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 per row: ``scale = absmax / 127``, round half to even, range [-127, 127]."""
    amax = _amax_last(x)
    q = torch.round(x.float() * (INT8_MAX / amax)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in fp32 (works for fp8 and int8 codes and for per-channel weight scales given as ``[N, 1]``)."""
    return q.float() * scale


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[N, K]`` to FP8 E4M3 with one fp32 scale per output channel, returned as ``[N]``."""
    q, s = quantize_fp8_per_token(w)
    return q, s.squeeze(-1)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[N, K]`` to INT8 with one fp32 scale per output channel, returned as ``[N]``."""
    q, s = quantize_int8_per_token(w)
    return q, s.squeeze(-1)


# --------------------------------------------------------------------------------------------------------------
# INT4 block-wise weights (weight-only / W4A8)
# --------------------------------------------------------------------------------------------------------------
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


def quantize_int4_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[N, K]`` to symmetric INT4 per block of ``block`` input channels.

    ``scale = absmax(block) / 7``, codes ``round(w / scale)`` clamped to [-8, 7] (so -8 is never produced by
    rounding but is a valid code). Returns ``(packed uint8 [N, K/2], scales fp32 [N, K/block])``.
    """
    n, k = w.shape
    if block <= 0 or k % block or block % 2:
        raise ValueError(f"int4 block {block} must be even and divide K={k}")
    wb = w.float().reshape(n, k // block, block)
    amax = wb.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR)
    scale = amax / INT4_MAX
    q = torch.round(wb / scale).clamp(-8, 7).to(torch.int8).reshape(n, k)
    return pack_int4(q), scale.squeeze(-1)


def dequantize_int4_blockwise(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Packed INT4 ``[N, K/2]`` and block scales ``[N, K/block]`` back to fp32 ``[N, K]``."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    block = k // scales.shape[-1]
    return (q.reshape(n, k // block, block) * scales.float().unsqueeze(-1)).reshape(n, k)


# --------------------------------------------------------------------------------------------------------------
# NVFP4 (simulated on Hopper)
# --------------------------------------------------------------------------------------------------------------
def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (+-{0, .5, 1, 1.5, 2, 3, 4, 6}), ties to even code, saturating at 6."""
    a = x.float().abs()
    # Midpoints; ties at 0.25, 1.25, 2.5, 5 go down (to an even code), ties at 0.75, 1.75, 3.5 go up.
    code = (
        (a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
        + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int()
    )
    grid = torch.tensor(_E2M1_GRID, device=x.device)
    return torch.sign(x.float()) * grid[code]


def quantize_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 (simulated on Hopper): E2M1 values, one FP8 E4M3 scale per 16 values, one fp32 scale per tensor.

    ``global = amax(x) / (448 * 6)``; block scale ``s_b = fp8(amax_b / 6 / global)``; values
    ``e2m1(x / (s_b * global))``. Returns ``(values fp32 on the E2M1 grid [..., K], block scales
    float8_e4m3fn [..., K/16], global scale fp32 scalar)``; the codes are kept unpacked because nothing on
    Hopper consumes packed FP4.
    """
    k = x.shape[-1]
    if k % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension divisible by {NVFP4_BLOCK}, got {k}")
    xf = x.float()
    gscale = (xf.abs().amax().clamp_min(AMAX_FLOOR) / (FP8_E4M3_MAX * E2M1_MAX)).reshape(())
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


def fake_quant_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize through NVFP4 (simulated on Hopper), returning fp32."""
    return dequantize_nvfp4(*quantize_nvfp4(x))
