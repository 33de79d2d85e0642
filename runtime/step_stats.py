"""Per-unit statistics of a computed block unit, written into one row of the step's stats tensor on the device.

Two implementations of the same columns (:data:`~qc_compile.runtime.policy.STAT_NAMES`), chosen by the runner:

* :func:`torch_unit_stats` — plain torch reductions (any device, any backend; the reference);
* :func:`fused_unit_stats` — one ``qc::cache_stats_apply`` pass computes the new residual and every sum, plus two
  reads for ``in_outlier`` / ``motion`` at ``level="full"`` (the fast path on CUDA).

Both return the residual to cache for the unit. Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Callable

import torch

from qc_compile.runtime.policy import STAT_INDEX

STATS_LEVELS = ("full", "cache")
UnitStats = Callable[..., torch.Tensor]


def _frames(res: torch.Tensor, T: int, prefix: int) -> torch.Tensor:
    """The residual's video tokens as (B, T, S, C): ``prefix`` tokens in front of them (CogVideoX's text stream in
    its joint sequence) are left out of the motion term."""
    rv = res[:, prefix:] if prefix else res
    return rv.reshape(rv.shape[0], T, -1, rv.shape[-1])


def torch_unit_stats(row: torch.Tensor, h: torch.Tensor, out: torch.Tensor, cached: torch.Tensor | None,
                     has_prev: bool, T: int, level: str = "full", prefix: int = 0) -> torch.Tensor:
    """Fill ``row`` for a unit that mapped ``h`` to ``out``; returns the residual to cache (in ``out``'s dtype)."""
    S = STAT_INDEX
    hf = h.float()
    res = (out - h).float()
    row[S["in_norm"]] = hf.norm()
    row[S["res_norm"]] = res.norm()
    if cached is not None:
        row[S["res_rel_l1"]] = (res - cached.float()).abs().sum() / cached.float().abs().sum().clamp_min(1e-12)
    if has_prev:
        row[S["cos_prev"]] = torch.nn.functional.cosine_similarity(out.float().flatten(), hf.flatten(), dim=0)
    habs = hf.abs()
    res_l1 = res.abs().sum()
    row[S["in_out_rel_l1"]] = res_l1 / habs.sum().clamp_min(1e-12)
    if level == "full":
        row[S["in_outlier"]] = habs.max() / habs.mean().clamp_min(1e-12)
        if T > 1:
            r4 = _frames(res, T, prefix)
            l1 = res_l1 if not prefix else r4.abs().sum()
            row[S["motion"]] = (r4[:, 1:] - r4[:, :-1]).abs().sum() / l1.clamp_min(1e-12)
    return res.to(out.dtype)


def fused_unit_stats(row: torch.Tensor, h: torch.Tensor, out: torch.Tensor, cached: torch.Tensor | None,
                     has_prev: bool, T: int, level: str = "full", prefix: int = 0) -> torch.Tensor:
    """:func:`torch_unit_stats` from the sums of one ``qc::cache_stats_apply`` pass."""
    from qc_compile.plugins import cache_stats as CS
    from qc_compile.plugins import ops as _ops  # noqa: F401  (registers torch.ops.qc)

    S, i = STAT_INDEX, CS.IDX
    res, raw = torch.ops.qc.cache_stats_apply(h, cached, out)
    v = raw.sum(0)
    row[S["in_norm"]] = v[i["sq_in"]].sqrt()
    row[S["res_norm"]] = v[i["sq_res"]].sqrt()
    if cached is not None:
        row[S["res_rel_l1"]] = v[i["l1_diff"]] / v[i["l1_cached"]].clamp_min(1e-12)
    if has_prev:
        row[S["cos_prev"]] = v[i["dot_in_out"]] / (v[i["sq_in"]] * v[i["sq_out"]]).sqrt().clamp_min(1e-8)
    row[S["in_out_rel_l1"]] = v[i["l1_res"]] / v[i["l1_in"]].clamp_min(1e-12)
    if level == "full":
        row[S["in_outlier"]] = h.abs().amax().float() / (v[i["l1_in"]] / h.numel()).clamp_min(1e-12)
        if T > 1:
            r4 = _frames(res, T, prefix)
            l1 = v[i["l1_res"]] if not prefix else r4.abs().sum(dtype=torch.float32)
            row[S["motion"]] = ((r4[:, 1:] - r4[:, :-1]).abs().sum(dtype=torch.float32) / l1.clamp_min(1e-12))
    return res


STATS_IMPLS: dict[str, UnitStats] = {"torch": torch_unit_stats, "fused": fused_unit_stats}
