"""torch custom ops ``torch.ops.qc.*``: CPU (reference) kernels, fake kernels for torch.compile, CUDA via Triton.

Importing this module registers the ops. The default implementation of every op is the pure-torch reference in
:mod:`reference` (it runs on any device, so CPU CI executes the same graph as the GPU); on CUDA the Triton kernels
of :mod:`qc_compile.plugins.kernels` override it when Triton is importable. Signatures (``Tensor?`` = optional):

* ``rotate_quant_fp8(x, block) -> (xq fp8[..., K], scale f32[..., 1])``; ``block`` 0 = no rotation
* ``rotate_quant_int8(x, block) -> (xq int8[..., K], scale f32[..., 1])``
* ``modulate_quant_fp8(x[B,T,C], shift[B,1|T,C], scale[B,1|T,C], block) -> (xq, scale)``
* ``gelu_rotate_quant_fp8(h, block) -> (hq, scale)``
* ``fp8_linear(xq, x_scale, wq[N,K], w_scale[N], bias[N]?, out_dtype) -> y[..., N]``
* ``w4a8_linear(xq fp8|int8, x_scale, w_packed u8[N,K/2], w_scales f32[N,K/G], bias?, out_dtype) -> y``
* ``cache_stats_apply(x_in, cached_residual?, out_new?) -> (y, stats f32[B, 10])`` (see :mod:`cache_stats`)

Weights for rotated activations must be rotated the same way offline (``formats.blocked_hadamard(W, block)``).
"""

from typing import Optional

import torch
from torch import Tensor

from . import formats as F
from . import reference as R
from .cache_stats import NUM_STATS

_FP8 = torch.float8_e4m3fn
# The kernels read their inputs densely: ask torch.compile to hand them contiguous tensors, so that inductor writes
# the producing fused kernel's output in that layout instead of a strided buffer followed by an eager
# ``.contiguous()`` copy (measured on H100: three 0.43 ms copies per XL unit before this tag).
_TAGS = (getattr(torch.Tag, "needs_contiguous_strides", None) or torch.Tag.needs_fixed_stride_order,)


def _quant_fake(x: Tensor, qdtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=qdtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("qc::rotate_quant_fp8", mutates_args=(), tags=_TAGS)
def rotate_quant_fp8(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Blocked Hadamard (``block``; 0 = none) + per-token dynamic FP8 E4M3 quantization."""
    return R.rotate_quant(x, block, "fp8")


@rotate_quant_fp8.register_fake
def _(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    R.check_activation(x)
    F.check_rotation_block(x.shape[-1], block)
    return _quant_fake(x, _FP8)


@torch.library.custom_op("qc::rotate_quant_int8", mutates_args=(), tags=_TAGS)
def rotate_quant_int8(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Blocked Hadamard + per-token dynamic symmetric INT8 quantization (round half to even)."""
    return R.rotate_quant(x, block, "int8")


@rotate_quant_int8.register_fake
def _(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    R.check_activation(x)
    F.check_rotation_block(x.shape[-1], block)
    return _quant_fake(x, torch.int8)


@torch.library.custom_op("qc::modulate_quant_fp8", mutates_args=(), tags=_TAGS)
def modulate_quant_fp8(x: Tensor, shift: Tensor, scale: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """LayerNorm (no affine, eps 1e-6) + ``x*(1+scale)+shift`` + rotation + per-token FP8 (before qkv / fc1)."""
    return R.modulate_quant_fp8(x, shift, scale, block)


@modulate_quant_fp8.register_fake
def _(x: Tensor, shift: Tensor, scale: Tensor, block: int) -> tuple[Tensor, Tensor]:
    R.check_modulation(x, shift, scale)
    F.check_rotation_block(x.shape[-1], block)
    return _quant_fake(x, _FP8)


@torch.library.custom_op("qc::gelu_rotate_quant_fp8", mutates_args=(), tags=_TAGS)
def gelu_rotate_quant_fp8(h: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """GELU(tanh) + rotation + per-token FP8 (before mlp.fc2)."""
    return R.gelu_rotate_quant_fp8(h, block)


@gelu_rotate_quant_fp8.register_fake
def _(h: Tensor, block: int) -> tuple[Tensor, Tensor]:
    R.check_activation(h, "h")
    F.check_rotation_block(h.shape[-1], block)
    return _quant_fake(h, _FP8)


@torch.library.custom_op("qc::fp8_linear", mutates_args=(), tags=_TAGS)
def fp8_linear(
    xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """FP8 x FP8 GEMM with per-token x per-channel dequantization and bias in the epilogue."""
    return R.fp8_linear(xq, x_scale, wq, w_scale, bias, out_dtype)


@fp8_linear.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype):
    R.check_fp8_linear(xq, x_scale, wq, w_scale, bias)
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


@torch.library.custom_op("qc::w4a8_linear", mutates_args=(), tags=_TAGS)
def w4a8_linear(
    xq: Tensor, x_scale: Tensor, w_packed: Tensor, w_scales: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype
) -> Tensor:
    """Packed INT4 block-wise weights x FP8 or INT8 per-token activations, + bias."""
    return R.w4a8_linear(xq, x_scale, w_packed, w_scales, bias, out_dtype)


@w4a8_linear.register_fake
def _(xq, x_scale, w_packed, w_scales, bias, out_dtype):
    R.check_w4a8_linear(xq, x_scale, w_packed, w_scales, bias)
    return xq.new_empty((*xq.shape[:-1], w_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op("qc::cache_stats_apply", mutates_args=(), tags=_TAGS)
def cache_stats_apply(
    x_in: Tensor, cached_residual: Optional[Tensor], out_new: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """One pass: cache statistics (:mod:`cache_stats`) and either the new residual or the applied output."""
    return R.cache_stats_apply(x_in, cached_residual, out_new)


@cache_stats_apply.register_fake
def _(x_in, cached_residual, out_new):
    R.check_cache(x_in, cached_residual, out_new)
    return x_in.new_empty(x_in.shape), x_in.new_empty((x_in.shape[0], NUM_STATS), dtype=torch.float32)


def _register_cuda() -> bool:
    """Attach the Triton kernels to the CUDA dispatch key; False (reference on CUDA) when Triton is missing."""
    try:
        from .kernels import dispatch
    except ImportError:
        return False
    dispatch.register(
        rotate_quant_fp8=rotate_quant_fp8, rotate_quant_int8=rotate_quant_int8, modulate_quant_fp8=modulate_quant_fp8,
        gelu_rotate_quant_fp8=gelu_rotate_quant_fp8, fp8_linear=fp8_linear, w4a8_linear=w4a8_linear,
        cache_stats_apply=cache_stats_apply,
    )
    return True


CUDA_KERNELS_REGISTERED = _register_cuda()
