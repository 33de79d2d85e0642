"""Reference (pure torch) implementations of the ``qc::`` ops: the CPU kernels, and the truth the GPU kernels match.

Semantics that the fused kernels reproduce exactly:

* A prologue (LayerNorm + modulation, GELU) is computed in fp32 and its result is rounded to the activation dtype
  before rotation and quantization, which is what the unfused graph does when it materialises that tensor; the
  fused kernel therefore changes speed, not numerics.
* Rotation is :func:`formats.blocked_hadamard` (fp32); quantization is per token (:mod:`formats`).
* Linear outputs are ``(xq @ wq^T) * x_scale * w_scale + bias`` accumulated in fp32, cast to ``out_dtype`` once.
"""

from __future__ import annotations

import torch

from . import formats as F
from .cache_stats import NUM_STATS

LN_EPS = 1e-6
_QUANTIZERS = {"fp8": F.quantize_fp8_per_token, "int8": F.quantize_int8_per_token}


def check_activation(x: torch.Tensor, name: str = "x") -> None:
    """Activations are floating point with at least one dimension."""
    if x.dim() < 1 or not x.dtype.is_floating_point or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(
            f"{name} must be a float32/float16/bfloat16 tensor with >= 1 dim, got {x.dtype} {tuple(x.shape)}")


def check_modulation(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> None:
    """``x [B, T, C]`` with ``shift``/``scale`` of shape ``[B, 1, C]`` or ``[B, T, C]`` (STDiT3's t2i_modulate)."""
    if x.dim() != 3:
        raise ValueError(f"modulate expects x of shape [B, T, C], got {tuple(x.shape)}")
    b, t, c = x.shape
    for name, m in (("shift", shift), ("scale", scale)):
        if m.dim() != 3 or m.shape[0] != b or m.shape[2] != c or m.shape[1] not in (1, t):
            raise ValueError(f"{name} must be [B, 1, C] or [B, T, C] = [{b}, 1|{t}, {c}], got {tuple(m.shape)}")
    if shift.shape != scale.shape:
        raise ValueError(f"shift {tuple(shift.shape)} and scale {tuple(scale.shape)} must have the same shape")


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm without affine, then ``x * (1 + scale) + shift``; fp32 math, result in ``x.dtype``."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).square().mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * (1.0 + scale.float()) + shift.float()
    return y.to(x.dtype)


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (STDiT3's MLP), fp32 math, result in ``h.dtype``."""
    return torch.nn.functional.gelu(h.float(), approximate="tanh").to(h.dtype)


def rotate_quant(x: torch.Tensor, block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked Hadamard (``block`` 0 = none) then per-token quantization to ``fmt`` ('fp8' or 'int8')."""
    check_activation(x)
    return _QUANTIZERS[fmt](F.blocked_hadamard(x, block))


def modulate_quant_fp8(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The producer in front of ``qkv`` / ``mlp.fc1``: LN + modulate, (rotate), per-token FP8."""
    check_activation(x)
    check_modulation(x, shift, scale)
    return rotate_quant(ln_modulate(x, shift, scale), block, "fp8")


def gelu_rotate_quant_fp8(h: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The producer in front of ``mlp.fc2``: GELU(tanh), (rotate), per-token FP8."""
    check_activation(h, "h")
    return rotate_quant(gelu_tanh(h), block, "fp8")


def check_linear(xq: torch.Tensor, x_scale: torch.Tensor, n: int, k: int, bias: torch.Tensor | None) -> None:
    """Shapes shared by the quantized linears: ``xq[..., K]``, ``x_scale[..., 1]``, ``bias[N]``."""
    if xq.dim() < 1 or xq.shape[-1] != k:
        raise ValueError(f"activation last dim {tuple(xq.shape)} does not match weight K={k}")
    if tuple(x_scale.shape) != (*xq.shape[:-1], 1) or x_scale.dtype != torch.float32:
        raise ValueError(
            f"x_scale must be float32 of shape {(*xq.shape[:-1], 1)}, got {x_scale.dtype} {tuple(x_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def check_fp8_linear(xq, x_scale, wq, w_scale, bias) -> None:
    """FP8 activations ``[..., K]`` and FP8 weights ``[N, K]`` with fp32 per-channel scales ``[N]``."""
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn or wq.dim() != 2:
        raise ValueError(f"fp8_linear needs float8_e4m3fn xq and 2-D wq, got {xq.dtype}, {wq.dtype} {tuple(wq.shape)}")
    n, k = wq.shape
    if tuple(w_scale.shape) != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"w_scale must be float32 of shape ({n},), got {w_scale.dtype} {tuple(w_scale.shape)}")
    check_linear(xq, x_scale, n, k, bias)


def fp8_linear(xq, x_scale, wq, w_scale, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq @ wq^T) * x_scale * w_scale + bias`` in fp32 (exact products of fp8 values), cast to ``out_dtype``."""
    check_fp8_linear(xq, x_scale, wq, w_scale, bias)
    y = (xq.float() @ wq.float().t()) * x_scale * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def check_w4a8_linear(xq, x_scale, w_packed, w_scales, bias) -> int:
    """Validate W4A8 operands and return the INT4 block size (K / number of scale columns)."""
    if xq.dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"w4a8_linear activations must be float8_e4m3fn or int8, got {xq.dtype}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or w_scales.dim() != 2:
        raise ValueError("w4a8_linear needs packed uint8 weights [N, K/2] and fp32 block scales [N, K/block]")
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    if w_scales.shape[0] != n or w_scales.dtype != torch.float32 or k % w_scales.shape[1]:
        raise ValueError(f"w_scales {w_scales.dtype} {tuple(w_scales.shape)} do not fit weights [N={n}, K={k}]")
    check_linear(xq, x_scale, n, k, bias)
    return k // w_scales.shape[1]


def w4a8_linear(xq, x_scale, w_packed, w_scales, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """Packed INT4 block-wise weights times FP8/INT8 per-token activations, fp32 accumulation, + bias."""
    check_w4a8_linear(xq, x_scale, w_packed, w_scales, bias)
    w = F.dequantize_int4_blockwise(w_packed, w_scales)
    y = (xq.float() @ w.t()) * x_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def check_cache(x_in: torch.Tensor, cached_residual: torch.Tensor | None, out_new: torch.Tensor | None) -> None:
    """All given tensors share ``x_in``'s shape (``[B, ...]``, B >= 1) and floating dtype family."""
    check_activation(x_in, "x_in")
    if cached_residual is None and out_new is None:
        raise ValueError("cache_stats_apply needs cached_residual (apply) or out_new (compute), or both")
    for name, t in (("cached_residual", cached_residual), ("out_new", out_new)):
        if t is not None and (t.shape != x_in.shape or not t.dtype.is_floating_point):
            raise ValueError(f"{name} must be floating with shape {tuple(x_in.shape)}, got {t.dtype} {tuple(t.shape)}")


def cache_stats_apply(
    x_in: torch.Tensor, cached_residual: torch.Tensor | None, out_new: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :mod:`cache_stats`: returns ``(y, stats[B, NUM_STATS])``.

    Compute mode (``out_new`` given): ``r = out_new - x_in``, ``y = r`` (the residual to cache), and ``r`` is
    compared with ``cached_residual`` (zeros if None). Apply mode (``out_new`` None): ``r = cached_residual``,
    ``y = x_in + r``. Both modes fill the same statistics with ``o = x_in + r``.
    """
    check_cache(x_in, cached_residual, out_new)
    b = x_in.shape[0]
    x = x_in.float().reshape(b, -1)
    c = cached_residual.float().reshape(b, -1) if cached_residual is not None else torch.zeros_like(x)
    if out_new is not None:
        o = out_new.float().reshape(b, -1)
        r = o - x
        y = r
    else:
        r = c
        o = x + c
        y = o
    stats = torch.stack(
        [
            (r - c).abs().sum(1), c.abs().sum(1), r.abs().sum(1), (r * r).sum(1), (c * c).sum(1), (r * c).sum(1),
            x.abs().sum(1), (x * x).sum(1), (o * o).sum(1), (x * o).sum(1),
        ],
        dim=1,
    )
    assert stats.shape[1] == NUM_STATS
    return y.reshape(x_in.shape).to(x_in.dtype), stats
