"""CUDA implementations of the ``qc::`` ops and their registration on the CUDA dispatch key.

The FP8 GEMM backend is a measured choice (``bench/results/linear_*.md``): ``scaled_mm`` is
``torch._scaled_mm`` with row-wise scales (cuBLASLt/CUTLASS), ``triton`` the TMA kernel in :mod:`gemm`,
``triton_ptr`` its pointer-based variant. ``QC_FP8_GEMM`` overrides it. ``_scaled_mm`` runs with fast
accumulation (no periodic fp32 promotion of the FP8 accumulator): on an H200 it was 1.03-1.25x faster with the
same end-to-end error (quantization dominates); ``QC_FP8_FAST_ACCUM=0`` turns it off. Shapes a kernel cannot
take run the reference on the device instead, so every op works on every shape.
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here means: no CUDA kernels, reference everywhere)

from .. import reference as R
from . import cache, gemm, producers

DEFAULT_FP8_GEMM = "scaled_mm"
_SCALED_MM_BROKEN: set[str] = set()


def fp8_gemm_backend() -> str:
    """The FP8 GEMM backend in use (environment override, else the measured default)."""
    return os.environ.get("QC_FP8_GEMM", DEFAULT_FP8_GEMM)


def _quant(x: torch.Tensor, block: int, prologue: int, out_mode: int, shift=None, scale=None, fallback=None):
    if producers.supported(x.shape[-1], block) and x.numel():
        return producers.launch(x, block, prologue, out_mode, shift, scale)
    return fallback()


def rotate_quant_fp8(x, block):
    R.check_activation(x)
    return _quant(x, block, producers.PROLOGUE_NONE, producers.OUT_FP8,
                  fallback=lambda: R.rotate_quant(x, block, "fp8"))


def rotate_quant_int8(x, block):
    R.check_activation(x)
    return _quant(x, block, producers.PROLOGUE_NONE, producers.OUT_INT8,
                  fallback=lambda: R.rotate_quant(x, block, "int8"))


def modulate_quant_fp8(x, shift, scale, block):
    R.check_activation(x)
    R.check_modulation(x, shift, scale)
    return _quant(x, block, producers.PROLOGUE_LN_MODULATE, producers.OUT_FP8, shift, scale,
                  fallback=lambda: R.modulate_quant_fp8(x, shift, scale, block))


def gelu_rotate_quant_fp8(h, block):
    R.check_activation(h, "h")
    return _quant(h, block, producers.PROLOGUE_GELU, producers.OUT_FP8,
                  fallback=lambda: R.gelu_rotate_quant_fp8(h, block))


def _scaled_mm(a, xs, wq, ws, bias, out_dtype, fast_accum: bool):
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    return torch._scaled_mm(a, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), bias=bias, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def fp8_matmul(a, xs, wq, ws, bias, out_dtype, backend: str | None = None) -> torch.Tensor:
    """2-D FP8 linear on CUDA with the chosen backend; ``a[M, K]``, ``xs[M, 1]``."""
    backend = backend or fp8_gemm_backend()
    m, k = a.shape
    n = wq.shape[0]
    key = str(a.device)
    if backend == "scaled_mm" and key not in _SCALED_MM_BROKEN and k % 16 == 0 and n % 16 == 0 \
            and out_dtype == torch.bfloat16:
        try:
            return _scaled_mm(a.contiguous(), xs.contiguous(), wq.contiguous(), ws.contiguous(), bias, out_dtype,
                              os.environ.get("QC_FP8_FAST_ACCUM", "1") == "1")
        except RuntimeError:
            _SCALED_MM_BROKEN.add(key)  # this torch/device has no row-wise FP8 path: use Triton from now on
    return gemm.fp8_gemm(a, xs.reshape(-1), wq, ws, bias, out_dtype, tma=backend != "triton_ptr")


def fp8_linear(xq, x_scale, wq, w_scale, bias, out_dtype):
    R.check_fp8_linear(xq, x_scale, wq, w_scale, bias)
    k = xq.shape[-1]
    y = fp8_matmul(xq.reshape(-1, k), x_scale.reshape(-1, 1), wq, w_scale, bias, out_dtype)
    return y.reshape(*xq.shape[:-1], wq.shape[0])


def w4a8_linear(xq, x_scale, w_packed, w_scales, bias, out_dtype):
    group = R.check_w4a8_linear(xq, x_scale, w_packed, w_scales, bias)
    k = xq.shape[-1]
    if not gemm.w4a8_supported(k, group):
        return R.w4a8_linear(xq, x_scale, w_packed, w_scales, bias, out_dtype)
    y = gemm.w4a8_gemm(xq.reshape(-1, k), x_scale.reshape(-1), w_packed, w_scales, bias, out_dtype)
    return y.reshape(*xq.shape[:-1], w_packed.shape[0])


def cache_stats_apply(x_in, cached_residual, out_new):
    R.check_cache(x_in, cached_residual, out_new)
    return cache.launch(x_in, cached_residual, out_new)


_IMPLS = {
    "rotate_quant_fp8": rotate_quant_fp8, "rotate_quant_int8": rotate_quant_int8,
    "modulate_quant_fp8": modulate_quant_fp8, "gelu_rotate_quant_fp8": gelu_rotate_quant_fp8,
    "fp8_linear": fp8_linear, "w4a8_linear": w4a8_linear, "cache_stats_apply": cache_stats_apply,
}


def register(**ops) -> None:
    """``register(rotate_quant_fp8=<CustomOpDef>, ...)``: attach each CUDA implementation above."""
    for name, op in ops.items():
        op.register_kernel("cuda")(_IMPLS[name])
