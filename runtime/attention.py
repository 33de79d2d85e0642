"""Self-attention backends of the fast path: bf16 SDPA (default) or SageAttention's 8-bit kernel (optional extra).

``sage``: `sageattention <https://github.com/thu-ml/SageAttention>`_ 1.0.6 (BSD-3, pure Triton; ``pip install
"qc-compile[sage]"``) quantizes Q and K to INT8 per block of tokens for Q·K^T and runs P·V in FP16. Why an option:
on an H200 attention was 42% of a computed STDiT3-XL block of the FP8 fast path (1.97 of 4.66 ms, all bf16 flash
attention; plugins/README.md 6c). Off by default: its speed and fidelity on a GPU are measured by
``tools/bench_attention.py`` and ``FastRunner(attention="sage")`` on qc-ref, not assumed.

What this module adds around ``sageattn``:

* **Head dims.** The kernels take head dims 64, 96 and 128 only; STDiT3-XL has 72 and qc-ref 32. q, k, v are
  zero-padded on the last dim to the next supported size (:func:`padded_attention`): the padded columns add nothing
  to Q·K^T (exact, and the per-block INT8 scales, which take a max over the block, are unchanged), the padded value
  columns give zero output columns that are dropped, and the softmax scale stays ``1/sqrt(original head dim)``.
  (The library's head-dim-96 kernels work on 128-wide tiles with a mask, so 72 -> 96 costs the arithmetic of 128.)
* **K smoothing without mutation.** ``sageattn(smooth_k=True)`` subtracts the per-head key mean *in place*
  (``k -= k.mean(seq)``), which would corrupt a caller's tensor (in the fast blocks ``k`` can be a view of the qkv
  projection). Subtracting the mean is exact for softmax (it shifts every logit of a query row by the same amount)
  and is what keeps INT8 keys accurate, so it is done here out of place and ``smooth_k=False`` is passed: the kernel
  never receives a tensor the caller holds (tested with a kernel that mutates its ``k``).
* **Sequence tails.** sageattention 1.0.6 loads the last, partial block of 64 keys with a mask but does not mask
  the logits: each missing key enters the softmax with logit 0 (and value 0), so the normaliser is too large
  whenever the key count is not a multiple of 64 (found with Triton's interpreter: 14-66% relative error at 200, 130
  and 15 tokens, 1% at 256). STDiT3-XL's 1590 tokens per frame hit it. :func:`sage_attention` then appends a column
  of ones to ``v`` (in the head-dim padding): the kernel's output in that column is the softmax mass of the real
  keys, and dividing by it gives the exact normalisation (the missing keys' values are 0, so they add nothing else).
  Head dim 128 has no room for the column: such sequences stay on SDPA. (That masked loads read zeros is what the
  interpreter does and what Triton's CUDA lowering does; ``tests/test_attention_sage_gpu.py`` checks the result.)
* **torch.compile / CUDA graphs.** The kernel call is a torch custom op (``qc::sage_attention``, with a fake
  kernel), so inductor keeps one graph around it (no graph break) and fuses the smoothing and padding into its
  producers; the op launches Triton kernels on the current stream, which CUDA-graph capture records (the fast
  runner's two warm-up calls happen before capture, so Triton's JIT compile is outside it).

Only self-attention with at least :data:`SAGE_MIN_TOKENS` tokens per sequence takes the sage kernel: its query
block is 128 tokens, so the temporal attention of STDiT3 (15 latent frames per sequence at 51 frames; 16 on qc-ref)
would compute 8x padded rows; ``tools/bench_attention.py`` times both backends on both shapes to check that choice.
Cross-attention keeps SDPA with its caption mask (the kernel takes no mask).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from qc_compile.errors import UserError

BACKENDS = ("sdpa", "sage")
SAGE_HEAD_DIMS = (64, 96, 128)
SAGE_MIN_TOKENS = 128  # the sage kernel's query block; shorter sequences (temporal attention) stay on SDPA
SAGE_KV_BLOCK = 64  # the kernel's key block (its partial last block is what the ones column corrects)
MAX_GRID_Y = 65535  # CUDA grid limit on batch * heads (the head-dim 96 kernel puts them on grid axis y)
SAGE_VERSION = "1.0.6"

Kernel = Callable[[Tensor, Tensor, Tensor, float], Tensor]


def padded_head_dim(d: int, supported: tuple[int, ...] = SAGE_HEAD_DIMS) -> int:
    """The smallest supported head dim >= ``d`` (ValueError past the largest)."""
    for s in supported:
        if s >= d:
            return s
    raise ValueError(f"head dim {d} is larger than the largest the sage kernels take ({supported[-1]})")


def padded_attention(q: Tensor, k: Tensor, v: Tensor, kernel: Kernel,
                     supported: tuple[int, ...] = SAGE_HEAD_DIMS) -> Tensor:
    """``kernel(q, k, v, sm_scale)`` on (B, H, N, d) tensors zero-padded to a supported head dim; output (B, H, N, d).

    Exact for any kernel that computes ``softmax(q k^T * sm_scale) v``: zero columns add nothing to q k^T, and the
    zero value columns give output columns that are cut off. ``sm_scale`` is ``1/sqrt(d)`` of the original ``d``.
    """
    d = q.shape[-1]
    p = padded_head_dim(d, supported)
    if p != d:
        q, k, v = (F.pad(t, (0, p - d)) for t in (q, k, v))
    out = kernel(q, k, v, 1.0 / math.sqrt(d))
    return out[..., :d] if p != d else out


def smooth_keys(k: Tensor) -> Tensor:
    """``k`` minus its mean over the sequence, per head (out of place). Exact for softmax attention: it subtracts
    ``q · mean(k)`` from every logit of a query row. SageAttention's fix for INT8 keys whose channels share a bias."""
    return k - k.mean(dim=-2, keepdim=True)


# like the qc:: ops of plugins/ops.py: inductor hands the kernel dense tensors (sageattn needs the last dim contiguous)
_TAGS = (getattr(torch.Tag, "needs_contiguous_strides", None) or torch.Tag.needs_fixed_stride_order,)


@torch.library.custom_op("qc::sage_attention", mutates_args=(), device_types="cuda", tags=_TAGS)
def _sage_op(q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> Tensor:
    """``sageattn`` on (B, H, N, d) CUDA tensors with d in {64, 96, 128}; ``k`` already smoothed (see module doc).
    The inputs are fresh tensors of :func:`sage_attention`; smooth_k=False keeps the kernel from writing to ``k``."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=sm_scale, smooth_k=False)


@_sage_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _sage_kernel(q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> Tensor:
    # sageattn needs the last dim contiguous; the padded tensors are, a 64/96/128-dim view of qkv may not be
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return torch.ops.qc.sage_attention(q, k, v, sm_scale)


KERNEL: Kernel = _sage_kernel  # module attribute so CPU tests can substitute SDPA for the CUDA-only kernel


def sage_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """8-bit self-attention (no mask, not causal) on (B, H, N, d): keys smoothed, head dim padded, sage kernel, and
    the partial-key-block normalisation corrected (module doc)."""
    k = smooth_keys(k)
    if k.shape[-2] % SAGE_KV_BLOCK == 0:
        return padded_attention(q, k, v, KERNEL)
    d = q.shape[-1]
    p = padded_head_dim(d + 1)
    q, k = (F.pad(t, (0, p - d)) for t in (q, k))
    v = torch.cat([v, v.new_ones(*v.shape[:-1], 1), v.new_zeros(*v.shape[:-1], p - d - 1)], dim=-1)
    out = KERNEL(q, k, v, 1.0 / math.sqrt(d))
    # the divisor is >= 1/N: smoothed keys average to zero, so each query's largest real logit is >= the missing
    # keys' 0 and its own softmax weight is 1 before normalisation
    return out[..., :d] / out[..., d:d + 1]


def sage_applies(q: Tensor) -> bool:
    """Whether :func:`self_attend` takes the sage kernel for (B, H, N, d) ``q`` (shapes only: static under
    torch.compile): N at least :data:`SAGE_MIN_TOKENS`, a head dim the kernels (with padding and, for a partial last
    key block, the ones column) take, and B * H within the CUDA grid."""
    b, h, n, d = q.shape
    need = d if n % SAGE_KV_BLOCK == 0 else d + 1
    return n >= SAGE_MIN_TOKENS and need <= SAGE_HEAD_DIMS[-1] and b * h <= MAX_GRID_Y


def self_attend(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """Self-attention of the fast blocks on (B, H, N, d): ``backend`` "sage" takes the 8-bit kernel for sequences of
    at least :data:`SAGE_MIN_TOKENS` tokens (:func:`sage_applies`; shapes are static, so torch.compile resolves the
    branch at trace time)."""
    if backend == "sage" and sage_applies(q):
        return sage_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def check_attention_backend(backend: str, device: str | torch.device) -> None:
    """UserError unless ``backend`` can run on ``device`` (``sage`` needs CUDA and the ``sage`` extra)."""
    if backend not in BACKENDS:
        raise UserError(f"attention={backend!r} is not a fast-path attention backend; expected one of {BACKENDS} "
                        f"(\"sdpa\", the default, is bf16 scaled_dot_product_attention).")
    if backend == "sdpa":
        return
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise UserError(f"attention=\"sage\" (SageAttention's 8-bit Triton kernels) needs a CUDA GPU; the model is on "
                        f"{str(dev)!r}{'' if dev.type != 'cuda' else ', and CUDA is not available'}. Use "
                        f"attention=\"sdpa\" (the default) here.")
    try:
        import sageattention  # noqa: F401
        import triton  # noqa: F401
    except ImportError as e:
        raise UserError(f"attention=\"sage\" needs the optional package sageattention=={SAGE_VERSION} and Triton, "
                        f"which are not importable here ({e}). Install the extra: pip install \"qc-compile[sage]\" "
                        f"(or pip install sageattention=={SAGE_VERSION}), or use attention=\"sdpa\" (the "
                        f"default).") from None
