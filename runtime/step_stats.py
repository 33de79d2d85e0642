"""Per-unit statistics of a step, kept as partial **sums** on the device and turned into ratios once per step.

A step writes one row of *partials* (:data:`PARTIAL_NAMES`) per unit: sums (squares, L1 norms, dot products,
counts), one max, and values that are the same on every rank (the action taken, the latent change, a gate's
already-reduced value). :func:`finish` turns a partials tensor into the statistics the policies read
(:data:`~qc_compile.runtime.policy.STAT_NAMES`). Sums add, so a video split over several processes (batch halves,
token shards: :mod:`qc_compile.runtime.parallel`) reduces its partials exactly — sum the sums, max the maxes, keep
one copy of the shared values — before the ratios are taken, and every rank sees the same statistics.

Two implementations fill a unit's row, chosen by the runner:

* :func:`torch_unit_stats` — plain torch reductions (any device, any backend; the reference);
* :func:`fused_unit_stats` — one ``qc::cache_stats_apply`` pass computes the new residual and every sum, plus two
  reads for ``in_outlier`` / ``motion`` at ``level="full"`` (the fast path on CUDA).

Both return the residual to cache for the unit. Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Callable

import torch

from qc_compile.runtime.policy import STAT_INDEX, STAT_NAMES

STATS_LEVELS = ("full", "cache", "none")
"""What the executor measures per computed unit: ``full`` every statistic; ``cache`` the sums of the fused pass
(no ``in_outlier`` / ``motion``); ``none`` nothing but the action taken, and no residual kept for reuse (a full
compute run reads neither: the FP8 fast path without caching pays no statistics kernels)."""
UnitStats = Callable[..., torch.Tensor]

SUM, MAX, SHARED = 0.0, 1.0, 2.0
PARTIALS: tuple[tuple[str, float], ...] = (
    ("sq_in", SUM), ("sq_res", SUM), ("sq_out", SUM), ("dot_in_out", SUM), ("l1_in", SUM), ("l1_res", SUM),
    ("l1_diff", SUM), ("l1_cached", SUM), ("count_in", SUM), ("l1_dframe", SUM), ("l1_frames", SUM), ("max_in", MAX),
    ("latent_l1_diff", SHARED), ("latent_l1_prev", SHARED), ("mod_rel_l1", SHARED), ("gate_rel_l1", SHARED),
    ("action", SHARED),
)
"""(name, how ranks combine it): ``SUM`` add, ``MAX`` take the largest, ``SHARED`` the same on every rank (rank 0's).
NaN = not measured this step (the statistic derived from it stays NaN)."""
PARTIAL_NAMES: tuple[str, ...] = tuple(n for n, _ in PARTIALS)
P: dict[str, int] = {n: i for i, n in enumerate(PARTIAL_NAMES)}
_REDUCE_OPS: dict = {}


def reduce_ops(device) -> torch.Tensor:
    """``(len(PARTIALS),)`` tensor of SUM / MAX / SHARED codes on ``device`` (for a reducer combining ranks)."""
    key = str(device)
    if key not in _REDUCE_OPS:
        _REDUCE_OPS[key] = torch.tensor([op for _, op in PARTIALS], device=device)
    return _REDUCE_OPS[key]


def new_partials(n_units: int, device) -> torch.Tensor:
    return torch.full((n_units, len(PARTIALS)), float("nan"), device=device)


def combine(gathered: torch.Tensor) -> torch.Tensor:
    """Partials of every rank ``(ranks, units, K)`` -> one ``(units, K)``: sums added in rank order, maxes maxed,
    shared values from rank 0. Deterministic, so every rank that holds ``gathered`` gets the same bits."""
    ops = reduce_ops(gathered.device)
    total = gathered[0].clone()
    for r in range(1, gathered.shape[0]):
        total = total + gathered[r]
    return torch.where(ops == SUM, total, torch.where(ops == MAX, gathered.amax(0), gathered[0]))


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp_min(1e-12)


def finish(p: torch.Tensor) -> torch.Tensor:
    """The statistics ``(units, len(STAT_NAMES))`` from partials ``(units, K)`` (NaN where not measured)."""
    S = STAT_INDEX
    c = {n: p[:, i] for n, i in P.items()}
    cols = [None] * len(STAT_NAMES)
    cols[S["in_norm"]] = c["sq_in"].sqrt()
    cols[S["res_norm"]] = c["sq_res"].sqrt()
    cols[S["res_rel_l1"]] = ratio(c["l1_diff"], c["l1_cached"])
    cols[S["cos_prev"]] = c["dot_in_out"] / (c["sq_in"] * c["sq_out"]).sqrt().clamp_min(1e-8)
    cols[S["in_out_rel_l1"]] = ratio(c["l1_res"], c["l1_in"])
    cols[S["motion"]] = ratio(c["l1_dframe"], c["l1_frames"])  # video tokens only (CogVideoX: no text prefix)
    cols[S["in_outlier"]] = ratio(c["max_in"], c["l1_in"] / c["count_in"])
    cols[S["mod_rel_l1"]] = c["mod_rel_l1"]
    cols[S["latent_rel_l1"]] = ratio(c["latent_l1_diff"], c["latent_l1_prev"])
    cols[S["gate_rel_l1"]] = c["gate_rel_l1"]
    cols[S["action"]] = c["action"]
    return torch.stack(cols, dim=1)


def _frames(res: torch.Tensor, T: int, prefix: int) -> torch.Tensor:
    """The residual's video tokens as (B, T, S, C): ``prefix`` tokens in front of them (CogVideoX's text stream in
    its joint sequence) are left out of the motion term."""
    rv = res[:, prefix:] if prefix else res
    return rv.reshape(rv.shape[0], T, -1, rv.shape[-1])


def torch_unit_stats(row: torch.Tensor, h: torch.Tensor, out: torch.Tensor, cached: torch.Tensor | None,
                     has_prev: bool, T: int, level: str = "full", prefix: int = 0) -> torch.Tensor:
    """Fill the partials ``row`` for a unit that mapped ``h`` to ``out``; returns the residual to cache (in
    ``out``'s dtype). ``h`` may be a shard (tokens (B, T·S_local, C)): frames stay whole, so ``motion`` is local."""
    hf = h.float()
    of = out.float()
    res = (out - h).float()
    row[P["sq_in"]] = hf.square().sum()
    row[P["sq_res"]] = res.square().sum()
    if cached is not None:
        row[P["l1_diff"]] = (res - cached.float()).abs().sum()
        row[P["l1_cached"]] = cached.float().abs().sum()
    if has_prev:
        row[P["dot_in_out"]] = (of * hf).sum()
        row[P["sq_out"]] = of.square().sum()
    habs = hf.abs()
    res_l1 = res.abs().sum()
    row[P["l1_res"]] = res_l1
    row[P["l1_in"]] = habs.sum()
    if level == "full":
        row[P["max_in"]] = habs.max()
        row[P["count_in"]].fill_(float(h.numel()))  # a kernel argument: `row[k] = float` is a synchronising copy
        if T > 1:
            r4 = _frames(res, T, prefix)
            row[P["l1_frames"]] = res_l1 if not prefix else r4.abs().sum()
            row[P["l1_dframe"]] = (r4[:, 1:] - r4[:, :-1]).abs().sum()
    return res.to(out.dtype)


def fused_unit_stats(row: torch.Tensor, h: torch.Tensor, out: torch.Tensor, cached: torch.Tensor | None,
                     has_prev: bool, T: int, level: str = "full", prefix: int = 0) -> torch.Tensor:
    """:func:`torch_unit_stats` from the sums of one ``qc::cache_stats_apply`` pass."""
    from qc_compile.plugins import cache_stats as CS
    from qc_compile.plugins import ops as _ops  # noqa: F401  (registers torch.ops.qc)

    i = CS.IDX
    res, raw = torch.ops.qc.cache_stats_apply(h, cached, out)
    v = raw.sum(0)
    for name in ("sq_in", "sq_res", "l1_res", "l1_in"):
        row[P[name]] = v[i[name]]
    if cached is not None:
        row[P["l1_diff"]] = v[i["l1_diff"]]
        row[P["l1_cached"]] = v[i["l1_cached"]]
    if has_prev:
        row[P["dot_in_out"]] = v[i["dot_in_out"]]
        row[P["sq_out"]] = v[i["sq_out"]]
    if level == "full":
        lo, hi = torch.aminmax(h)  # one read of h (no |h| temporary)
        row[P["max_in"]] = torch.maximum(-lo, hi).float()
        row[P["count_in"]].fill_(float(h.numel()))
        if T > 1:
            r4 = _frames(res, T, prefix)
            row[P["l1_frames"]] = v[i["l1_res"]] if not prefix else r4.abs().sum(dtype=torch.float32)
            row[P["l1_dframe"]] = _frame_diff_l1(r4)
    return res


def _frame_diff_l1_eager(r4: torch.Tensor) -> torch.Tensor:
    return (r4[:, 1:] - r4[:, :-1]).abs().sum(dtype=torch.float32)


_FRAME_DIFF: dict[str, Callable] = {}


def _frame_diff_l1(r4: torch.Tensor) -> torch.Tensor:
    """sum |r[t+1] - r[t]| over frames: on CUDA one compiled reduction reading ``r4`` once (eager, it writes and
    re-reads two full-size temporaries per computed unit); eager elsewhere, or if compiling fails."""
    if not r4.is_cuda:
        return _frame_diff_l1_eager(r4)
    fn = _FRAME_DIFF.get("fn")
    if fn is None:
        fn = _FRAME_DIFF["fn"] = torch.compile(_frame_diff_l1_eager, dynamic=False)
    try:
        return fn(r4)
    except Exception:  # noqa: BLE001  (a torch without a working inductor: the eager reduction is the same sum)
        _FRAME_DIFF["fn"] = _frame_diff_l1_eager
        return _frame_diff_l1_eager(r4)


class LocalReducer:
    """The :class:`~qc_compile.runtime.protocols.StatsReducer` of a video computed by one process: nothing to
    combine."""

    def partials(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def sums(self, t: torch.Tensor) -> torch.Tensor:
        return t


LOCAL = LocalReducer()

STATS_IMPLS: dict[str, UnitStats] = {"torch": torch_unit_stats, "fused": fused_unit_stats}
