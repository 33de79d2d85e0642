"""Low-bit number formats as the kernels see them: Hadamard rotation and the reference quantizers (pure torch).

These functions define what every kernel in :mod:`qc_compile.plugins` must compute; the Triton kernels and the
TensorRT plugins are checked against them. The formats' arithmetic (code ranges, scale rules, rounding, NVFP4) lives
in the codec table, :mod:`qc_compile.plugins.codecs`; here it is named by layout. Conventions:

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

from qc_compile.plugins.codecs import (AMAX_FLOOR, CODECS, E2M1_MAX, FP8_E4M3_MAX, INT4_MAX, INT8_MAX,  # noqa: F401
                                       NVFP4_BLOCK, dequantize_nvfp4, fake_quant_nvfp4, pack_int4, quantize_nvfp4,
                                       round_to_e2m1, unpack_int4)

NVFP4_SIMULATED_ON_HOPPER = True
"""NVFP4 MMA exists only on Blackwell (sm_100/sm_120); on sm_90 this format is emulated."""


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
# Per-token activation quantizers and per-channel / per-block weight quantizers (the kernels' conventions)
# --------------------------------------------------------------------------------------------------------------
def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric FP8 E4M3 per row: ``scale = absmax / 448``; returns ``(q e4m3fn, scale fp32[..., 1])``."""
    return CODECS["fp8_e4m3"].quantize_rows(x)


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 per row: ``scale = absmax / 127``, round half to even, range [-127, 127]."""
    return CODECS["int8"].quantize_rows(x)


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


def quantize_int4_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``[N, K]`` to symmetric INT4 per block of ``block`` input channels.

    ``scale = absmax(block) / 7``, codes ``round(w / scale)`` clamped to [-8, 7] (so -8 is never produced by
    rounding but is a valid code). Returns ``(packed uint8 [N, K/2], scales fp32 [N, K/block])``.
    """
    if block <= 0 or w.shape[1] % block or block % 2:
        raise ValueError(f"int4 block {block} must be even and divide K={w.shape[1]}")
    q, s = CODECS["int4_b128"].quantize_blocks(w, block)
    return pack_int4(q), s


def dequantize_int4_blockwise(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Packed INT4 ``[N, K/2]`` and block scales ``[N, K/block]`` back to fp32 ``[N, K]``."""
    return CODECS["int4_b128"].dequantize_blocks(unpack_int4(packed), scales)

