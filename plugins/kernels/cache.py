"""Cache statistics + residual apply in one pass over memory (see :mod:`qc_compile.plugins.cache_stats`).

Grid ``(P, B)``: program ``p`` of batch element ``b`` strides over that element's values, writes ``y`` and
keeps the ten running sums in fp32 registers; it stores its ten partial sums to ``partials[b, p, :]`` and a
second tiny reduction (``partials.sum(1)``) finishes. Two stages instead of atomics keep the statistics
deterministic from run to run, which the policies' thresholds rely on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cache_stats import NUM_STATS, same_flat_layout

BLOCK = 1024


@triton.jit
def _cache_kernel(
    x_ptr, c_ptr, o_ptr, y_ptr, part_ptr, L, P,
    COMPUTE: tl.constexpr, HAS_CACHE: tl.constexpr, BLOCK: tl.constexpr, NSTAT: tl.constexpr,
):
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = b * L
    z = tl.zeros((BLOCK,), dtype=tl.float32)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 = z, z, z, z, z, z, z, z, z, z
    for start in range(p * BLOCK, L, P * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < L
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_CACHE:
            c = tl.load(c_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        else:
            c = z
        if COMPUTE:
            o = tl.load(o_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            r = o - x
            tl.store(y_ptr + base + offs, r.to(y_ptr.dtype.element_ty), mask=m)
        else:
            r = c
            o = x + c
            tl.store(y_ptr + base + offs, o.to(y_ptr.dtype.element_ty), mask=m)
        s0 += tl.abs(r - c)
        s1 += tl.abs(c)
        s2 += tl.abs(r)
        s3 += r * r
        s4 += c * c
        s5 += r * c
        s6 += tl.abs(x)
        s7 += x * x
        s8 += o * o
        s9 += x * o
    out = part_ptr + (b * P + p) * NSTAT
    tl.store(out + 0, tl.sum(s0, 0))
    tl.store(out + 1, tl.sum(s1, 0))
    tl.store(out + 2, tl.sum(s2, 0))
    tl.store(out + 3, tl.sum(s3, 0))
    tl.store(out + 4, tl.sum(s4, 0))
    tl.store(out + 5, tl.sum(s5, 0))
    tl.store(out + 6, tl.sum(s6, 0))
    tl.store(out + 7, tl.sum(s7, 0))
    tl.store(out + 8, tl.sum(s8, 0))
    tl.store(out + 9, tl.sum(s9, 0))


def launch(
    x_in: torch.Tensor, cached_residual: torch.Tensor | None, out_new: torch.Tensor | None, programs: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA implementation of ``qc::cache_stats_apply`` (same contract as the reference)."""
    b = x_in.shape[0]
    length = x_in.numel() // max(b, 1)
    given = [t for t in (x_in, cached_residual, out_new) if t is not None]
    if not same_flat_layout(given, length):  # the kernel walks memory: make the layouts equal and row-major
        x_in, cached_residual, out_new = (None if t is None else t.contiguous()
                                          for t in (x_in, cached_residual, out_new))
    x = x_in
    y = torch.empty_like(x)  # same strides as x (dense): element i of y is element i of x in memory
    if programs is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        programs = max(1, min(triton.cdiv(length, BLOCK), (4 * sms + b - 1) // max(b, 1)))
    part = torch.empty((b, programs, NUM_STATS), dtype=torch.float32, device=x.device)
    c = cached_residual if cached_residual is not None else x
    o = out_new if out_new is not None else x
    if b and length:
        _cache_kernel[(programs, b)](
            x, c, o, y, part, length, programs,
            COMPUTE=out_new is not None, HAS_CACHE=cached_residual is not None, BLOCK=BLOCK, NSTAT=NUM_STATS,
            num_warps=4,
        )
        stats = part.sum(1)
    else:
        stats = torch.zeros((b, NUM_STATS), dtype=torch.float32, device=x.device)
    return y, stats
