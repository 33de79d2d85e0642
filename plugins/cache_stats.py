"""The statistics vector of ``qc::cache_stats_apply`` and the policy metrics derived from it.

The op returns raw per-batch-element **sums** (fp32, ``[B, NUM_STATS]``) rather than ratios, because sums add:
the CFG pair or a whole batch aggregates exactly by summing rows (:func:`reduce_batch`) before taking ratios,
and one small device-to-host copy per step carries everything a policy needs. With ``x`` the unit input,
``r`` the residual the unit produced (compute mode) or applied (apply mode), ``c`` the cached residual and
``o = x + r`` the unit output:

====  ==================  =============================================
idx   name                sum over the batch element of
====  ==================  =============================================
0     l1_diff             ``|r - c|``
1     l1_cached           ``|c|``
2     l1_res              ``|r|``
3     sq_res              ``r^2``
4     sq_cached           ``c^2``
5     dot_res_cached      ``r * c``
6     l1_in               ``|x|``
7     sq_in               ``x^2``
8     sq_out              ``o^2``
9     dot_in_out          ``x * o``
====  ==================  =============================================

Derived metrics (all shapes ``[B]`` or scalar after :func:`reduce_batch`):

* :func:`rel_l1` = l1_diff / l1_cached — relative L1 change of a residual against its cached copy
  (First-Block cache, TDC, AdaCache-style distances).
* :func:`rel_change` = l1_res / l1_in — relative L1 change between a unit's input and output (6Bit-Diffusion's Gamma).
* :func:`cos_in_out` — cosine similarity of the unit's input and output (SRAP's consecutive-layer redundancy).
* :func:`cos_residual` — cosine similarity of the new and cached residuals.
* :func:`res_norm`, :func:`cached_norm` — L2 norms (MagCache's magnitude ratio is their quotient).
"""

from __future__ import annotations

import torch

STAT_NAMES = (
    "l1_diff", "l1_cached", "l1_res", "sq_res", "sq_cached", "dot_res_cached", "l1_in", "sq_in", "sq_out", "dot_in_out",
)
NUM_STATS = len(STAT_NAMES)
IDX = {name: i for i, name in enumerate(STAT_NAMES)}
_TINY = 1e-30


def _col(stats: torch.Tensor, name: str) -> torch.Tensor:
    if stats.shape[-1] != NUM_STATS:
        raise ValueError(f"expected a stats tensor [..., {NUM_STATS}], got {tuple(stats.shape)}")
    return stats[..., IDX[name]].double()


def reduce_batch(stats: torch.Tensor) -> torch.Tensor:
    """Sum the per-element rows (exact aggregation of the sums), ``[B, N] -> [N]``."""
    return stats.double().sum(0)


def rel_l1(stats: torch.Tensor) -> torch.Tensor:
    """``sum|r - c| / sum|c|``; +inf where nothing is cached yet (forces a refresh)."""
    num, den = _col(stats, "l1_diff"), _col(stats, "l1_cached")
    return torch.where(den > 0, num / den.clamp_min(_TINY), torch.full_like(num, float("inf")))


def rel_change(stats: torch.Tensor) -> torch.Tensor:
    """``sum|o - x| / sum|x|`` (the unit's relative L1 input-to-output change)."""
    return _col(stats, "l1_res") / _col(stats, "l1_in").clamp_min(_TINY)


def cos_in_out(stats: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the unit's input and output."""
    den = (_col(stats, "sq_in") * _col(stats, "sq_out")).sqrt().clamp_min(_TINY)
    return _col(stats, "dot_in_out") / den


def cos_residual(stats: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the new and the cached residual."""
    den = (_col(stats, "sq_res") * _col(stats, "sq_cached")).sqrt().clamp_min(_TINY)
    return _col(stats, "dot_res_cached") / den


def res_norm(stats: torch.Tensor) -> torch.Tensor:
    """L2 norm of the residual ``r``."""
    return _col(stats, "sq_res").sqrt()


def cached_norm(stats: torch.Tensor) -> torch.Tensor:
    """L2 norm of the cached residual ``c``."""
    return _col(stats, "sq_cached").sqrt()


def same_flat_layout(ts: list[torch.Tensor], length: int) -> bool:
    """True when the tensors can be walked as flat memory without copies: each dense and non-overlapping, all with
    the same strides, batch outermost (``stride(0) == length``): then offset ``i`` of every tensor holds the same
    element (e.g. the channel-major hidden state of a model whose patch embedding returns a transposed view)."""
    t0 = ts[0]
    if not all(dense(t) and t.shape == t0.shape and t.stride() == t0.stride() for t in ts):
        return False
    return t0.dim() == 0 or t0.shape[0] <= 1 or t0.stride(0) == length


def dense(t: torch.Tensor) -> bool:
    """Every element in one gap-free block of memory, no two elements at one address (any dimension order)."""
    expect = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return True
