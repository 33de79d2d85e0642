"""SRAP thresholds per model: the distribution of the similarity SRAP reads, and thresholds chosen by their measured cost.

What SRAP reads at run time is the executor's ``cos_prev`` (``runtime/step_stats.py``): the cosine between a block
unit's output and its input — the previous unit's output — over the *whole* batch of the step, i.e. both CFG
branches of the prompt together. Calibration measures the same quantity per (prompt, step, unit) and per CFG branch
from three per-row sums (⟨in, out⟩, ‖in‖², ‖out‖²), so the combined value equals the runtime's for one-prompt runs.

Rule (issue 12: a quantile of the similarity alone is not a safety criterion — on qc-ref consecutive units have
cosines of 0.86-0.97 and the per-unit 0.9 quantile pruned units whose output differs from their input by 30-40 %,
14 dB on the H200 sweep): thresholds are chosen against a *measured fidelity cost*. Candidate thresholds (the best
units by one-step pruning error, each above a quantile of its own cosine) are run end to end on the calibration prompts
inside the caching context (``hlc``, what ``quantcache`` runs) and compared with full compute; the most permissive
candidate within the PSNR budget (default 0.5 dB) that saves at least the minimum compute (default 3 points) is
written, or thresholds that never prune when none does — the report (plan provenance ``calibration.runtime.srap``)
lists the per-unit cosine distributions and every candidate's compute saved and dB cost, and the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from qc_compile.errors import UserError

DEFAULT_MAX_ERROR = 0.5
DEFAULT_BUDGET_DB = 0.5  # issue 12's bar: SRAP may cost at most 0.5 dB of PSNR ...
DEFAULT_MIN_SAVING = 3.0  # ... and must save at least 3 points of compute to be worth it
DEFAULT_LEVELS = (0.75, 0.25)  # per candidate unit set: prune above these quantiles of the unit's cosine
DEFAULT_MAX_UNITS = 3  # candidate unit sets grow up to this many units (cost: one evaluation per candidate)
NEVER = 1.0  # a cosine threshold no real unit exceeds strictly (tau_high) -> never pruned


@dataclass
class SimilarityGrid:
    """Per-row sums for SRAP's cosine: tensors (prompts, steps, 2 CFG branches [cond, null], units)."""

    units: list[str]
    dot: torch.Tensor
    in_sq: torch.Tensor
    out_sq: torch.Tensor

    def cos(self, branch: str = "both") -> torch.Tensor:
        """(prompts, steps, units) cosine: ``both`` = over the two CFG rows together (what the runtime reads for a
        one-prompt run), ``cond`` / ``null`` = one branch."""
        if branch == "both":
            d, a, b = self.dot.sum(2), self.in_sq.sum(2), self.out_sq.sum(2)
        else:
            i = {"cond": 0, "null": 1}[branch]
            d, a, b = self.dot[:, :, i], self.in_sq[:, :, i], self.out_sq[:, :, i]
        return d / (a * b).sqrt().clamp_min(1e-12)


class BlockSignals:
    """Forward hooks on a model's block units gathering, per step and per batch row, SRAP's cosine sums and the
    residual's relative L1 change since the previous step (AIGQ's redundancy signal). ``take_step()`` after each
    step; ``grid()`` at the end. Rows are [cond prompts; null prompts] as the sampler batches them."""

    def __init__(self, model) -> None:
        from qc_compile.models.units import block_units

        self.units = list(block_units(model.unit_names()))
        self.model = model
        self._cur: dict[str, tuple] = {}
        self._prev_res: dict[str, torch.Tensor] = {}
        self._steps: list[dict[str, tuple]] = []
        self._handles: list = []

    def _hook(self, unit: str):
        def hook(mod, args, kwargs, out):
            x = args[0].detach().float()
            o = out.detach().float()
            B = x.shape[0]
            xf, of = x.reshape(B, -1), o.reshape(B, -1)
            r = of - xf
            prev = self._prev_res.get(unit)
            ch = ((r - prev).abs().sum(1) / prev.abs().sum(1).clamp_min(1e-12)) if prev is not None \
                and prev.shape == r.shape else torch.full((B,), math.nan)
            self._prev_res[unit] = r
            self._cur[unit] = ((xf * of).sum(1).cpu(), xf.pow(2).sum(1).cpu(), of.pow(2).sum(1).cpu(), ch.cpu())
        return hook

    def __enter__(self) -> "BlockSignals":
        for u in self.units:
            self._handles.append(self.model.block(u).register_forward_hook(self._hook(u), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def take_step(self) -> None:
        missing = [u for u in self.units if u not in self._cur]
        if missing:
            raise RuntimeError(f"block signals: units {missing} did not run this step")
        self._steps.append(self._cur)
        self._cur = {}

    def grid(self) -> tuple[SimilarityGrid, torch.Tensor]:
        """(similarity grid, residual change (prompts, steps, units) of the cond branch)."""
        def stack(k: int) -> torch.Tensor:  # (steps, units, 2P) -> (P, steps, 2, units)
            t = torch.stack([torch.stack([s[u][k] for u in self.units]) for s in self._steps])
            S, U, B = t.shape
            return t.reshape(S, U, 2, B // 2).permute(3, 0, 2, 1).contiguous()
        res = stack(3)[:, :, 0]
        return SimilarityGrid(self.units, stack(0), stack(1), stack(2)), res


def grid_from_store(store) -> SimilarityGrid:
    """The similarity grid of an AIGQ statistics store (``blk/<unit>/{dot_in_out,in_norm,out_norm}``)."""
    units = store.block_units()
    if f"blk/{units[1 if len(units) > 1 else 0]}/dot_in_out" not in store.shard(0, 0):
        raise UserError(f"{store.dir}: these calibration statistics predate SRAP calibration (no dot_in_out); "
                        "re-run calibrate with --fresh.")

    def g(key: str, power: int) -> torch.Tensor:
        t = torch.stack([torch.stack([torch.stack([store.sample(p, s, f"blk/{u}/{key}", "both") for u in units], -1)
                                      for s in range(store.num_steps)]) for p in range(store.num_prompts)])
        return t.pow(power)
    return SimilarityGrid(units, g("dot_in_out", 1), g("in_norm", 2), g("out_norm", 2))


@dataclass
class SrapCalibration:
    params: dict  # plan cache_policy.params.srap
    report: dict = field(default_factory=dict)

    @property
    def pruning_units(self) -> list[str]:
        return sorted(u for u, d in self.params.get("units", {}).items() if d["tau_high"] < NEVER)


def acting_steps(num_steps: int, warmup: int, tail: int) -> list[int]:
    return [s for s in range(num_steps) if warmup <= s < num_steps - tail]


@dataclass
class Fidelity:
    """One end-to-end evaluation on the calibration prompts: PSNR (dB, capped at ``PSNR_CAP``) of each prompt's
    final video against full compute, and the mean fraction of block-unit evaluations computed."""

    psnr_db: list[float]
    compute: float


PSNR_CAP = 50.0  # dB: differences beyond this are invisible, so a candidate's cost counts from here down (a baseline
#                   that matches full compute exactly would otherwise make a 60 dB result look like a 40 dB loss)
Evaluate = Callable[[dict | None], Fidelity]  # SRAP params (None: the caching context alone) -> fidelity


def calibrate(grid: SimilarityGrid, prune_error: Callable[[int, int, str], float] | None,
              evaluate: Evaluate | None = None, *, budget_db: float = DEFAULT_BUDGET_DB,
              min_saving: float = DEFAULT_MIN_SAVING, max_error: float = DEFAULT_MAX_ERROR,
              levels: Sequence[float] = DEFAULT_LEVELS, max_units: int = DEFAULT_MAX_UNITS,
              samples_per_unit: int = 2, warmup: int | None = None, tail: int | None = None,
              context: str = "hlc") -> SrapCalibration:
    """Per-unit thresholds chosen against a measured fidelity cost.

    1. Per unit, the cosine distribution (reported) and the velocity error of pruning it at its most similar
       calibration steps (``prune_error``, cheap one-step replays) rank the units; units above ``max_error`` are out.
    2. Candidates, from the least permissive: the ``k`` best-ranked units (k = 1 .. ``max_units``), each pruned above
       the ``levels`` quantiles of its own cosine. ``evaluate`` runs the calibration prompts under ``context`` + SRAP
       with a candidate's thresholds; its cost is the mean PSNR drop (dB, against full compute) from ``context``
       alone, its saving the points of compute it removes. A candidate passes if the mean cost is at most
       ``budget_db`` and no prompt loses more than twice that; the search stops at the first k whose strictest level
       fails.
    3. The passing candidate saving the most is written if it saves at least ``min_saving`` points; otherwise every
       unit gets ``NEVER`` (SRAP never prunes) and the report says why, with every candidate's numbers.
    Without ``evaluate`` nothing is validated end to end, so nothing is pruned (recorded as such)."""
    from qc_compile.runtime.policies.srap import SRAP

    if budget_db <= 0 or min_saving < 0 or max_error <= 0:
        raise UserError(f"SRAP calibration: --srap-budget-db and --srap-max-error must be positive and "
                        f"--srap-min-saving not negative; got {budget_db}, {max_error} and {min_saving}.")
    if not levels or not all(0.0 <= q < 1.0 for q in levels):
        raise UserError(f"SRAP calibration: quantile levels must be in [0, 1), got {list(levels)}.")
    warmup = SRAP.PARAMS["warmup"].default if warmup is None else warmup
    tail = SRAP.PARAMS["tail"].default if tail is None else tail
    never = {"tau_low": NEVER, "tau_high": NEVER}
    cos = grid.cos("both")
    P, S, U = cos.shape
    steps = acting_steps(S, warmup, tail)
    rep: dict = {"rule": "fidelity", "context": context, "budget_db": budget_db, "min_saving_points": min_saving,
                 "max_error": max_error, "levels": list(levels), "steps": S, "units": {}, "candidates": []}
    if not steps:  # too few calibration steps to say anything: SRAP stays off in this plan
        rep.update(note=f"{S} calibration steps leave none outside SRAP's warm-up {warmup} and tail {tail}: "
                        "SRAP never prunes", validated=False)
        return SrapCalibration(dict(never), rep)
    rep["acting_steps"] = [steps[0], steps[-1]]
    ranked: list[tuple[float, str, int]] = []
    for j, u in enumerate(grid.units):
        vals = cos[:, steps, j]
        stat = {b: _summary(grid.cos(b)[:, steps, j]) for b in ("both", "cond", "null")}
        if j == 0:  # the first block unit has no predecessor at run time: never pruned
            rep["units"][u] = {"cos": stat, "note": "first block unit: no predecessor, never pruned"}
            continue
        top = sorted(((p, steps[k]) for p in range(P) for k in range(len(steps))),
                     key=lambda ps: -float(cos[ps[0], ps[1], j]))
        pick = top[:: max(1, len(top) // (4 * max(1, samples_per_unit)))][:samples_per_unit]  # the similar quarter
        errs = [{"prompt": p, "step": s, "cos": float(cos[p, s, j]), "velocity_rel_err": prune_error(p, s, u)}
                for p, s in pick] if prune_error is not None else []
        med = _median([e["velocity_rel_err"] for e in errs])
        rep["units"][u] = {"cos": stat, "validation": errs, "median_velocity_rel_err": med,
                           "eligible": med is not None and med <= max_error}
        if med is not None and med <= max_error:
            ranked.append((med, u, j))
    ranked.sort()
    rep["ranking"] = [u for _, u, _ in ranked]
    rep["validated"] = evaluate is not None
    if evaluate is None:
        rep["reason"] = "no end-to-end fidelity evaluation was available: SRAP never prunes in this plan"
        return SrapCalibration({**never, "units": {u: dict(never) for u in grid.units[1:]}}, rep)
    if not ranked:
        rep["reason"] = (f"pruning any unit at a single calibration step changes the velocity by more than "
                         f"{max_error} (relative): SRAP never prunes in this plan")
        return SrapCalibration({**never, "units": {u: dict(never) for u in grid.units[1:]}}, rep)
    t0 = time.perf_counter()
    base = evaluate(None)
    rep["baseline"] = {"psnr_db_mean": _mean(base.psnr_db), "psnr_db_min": min(base.psnr_db),
                       "compute_percent": 100 * base.compute}
    best: tuple[float, dict] | None = None
    for k in range(1, min(max_units, len(ranked)) + 1):
        chosen = ranked[:k]
        for li, q in enumerate(levels):
            units = {u: dict(never) for u in grid.units[1:]}
            for _, u, j in chosen:
                tau = math.floor(float(torch.quantile(cos[:, steps, j].flatten().double(), q)) * 1e6) / 1e6
                units[u] = {"tau_low": tau, "tau_high": tau}
            params = {**never, "units": units}
            fid = evaluate(params)
            drops = [b - c for b, c in zip(base.psnr_db, fid.psnr_db)]
            cand = {"units": [u for _, u, _ in chosen], "level": q,
                    "thresholds": {u: units[u]["tau_high"] for _, u, _ in chosen},
                    "compute_percent": 100 * fid.compute, "saved_points": 100 * (base.compute - fid.compute),
                    "psnr_db_mean": _mean(fid.psnr_db), "psnr_db_min": min(fid.psnr_db),
                    "cost_db_mean": _mean(drops), "cost_db_max": max(drops)}
            cand["passes"] = cand["cost_db_mean"] <= budget_db and cand["cost_db_max"] <= 2 * budget_db
            rep["candidates"].append(cand)
            if not cand["passes"]:
                break
            if best is None or cand["saved_points"] > best[0]:
                best = (cand["saved_points"], params)
        if not rep["candidates"][-1]["passes"] and rep["candidates"][-1]["level"] == levels[0]:
            break  # the strictest level of k units already costs too much: more units cost more
    rep["evaluation_seconds"] = round(time.perf_counter() - t0, 2)
    if best is not None and best[0] >= min_saving:
        rep["chosen"] = next(c for c in rep["candidates"] if c["passes"] and c["saved_points"] == best[0])
        return SrapCalibration(best[1], rep)
    tried = "; ".join(f"{'+'.join(c['units'])} above q{c['level']:g}: saves {c['saved_points']:.1f} points at "
                      f"{c['cost_db_mean']:.2f} dB mean / {c['cost_db_max']:.2f} dB worst" for c in rep["candidates"])
    rep["reason"] = (f"no candidate saves >= {min_saving:g} points of compute at <= {budget_db:g} dB mean PSNR cost "
                     f"(against {context} alone, on {len(base.psnr_db)} calibration prompt(s)): {tried}. "
                     "SRAP never prunes in this plan")
    return SrapCalibration({**never, "units": {u: dict(never) for u in grid.units[1:]}}, rep)


def summary_line(rep: dict | None) -> str | None:
    """One line saying what SRAP's calibration decided and why (the numbers are in the plan's provenance)."""
    if not rep:
        return None
    chosen = rep.get("chosen")
    if chosen:
        return (f"SRAP prunes {', '.join(chosen['units'])}: saves {chosen['saved_points']:.1f} points of compute at "
                f"{chosen['cost_db_mean']:.2f} dB mean PSNR cost under {rep.get('context', 'hlc')} on the calibration "
                "prompts")
    return f"SRAP never prunes with this plan: {rep.get('reason', rep.get('note', ''))}"


def _summary(x: torch.Tensor) -> dict:
    x = x.flatten().double()
    q = torch.quantile(x, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
    return {"min": float(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]), "max": float(q[4])}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _median(xs: Sequence[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def step_prune_error(executor, z: torch.Tensor, timestep: torch.Tensor, cond, cfg: float, unit: str,
                     reference: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Relative L2 error of the CFG velocity of one step when ``unit`` is pruned (identity), against the step with
    every unit computed. ``z`` is the latent (n, ...) before the step; returns (error, reference velocity)."""
    from qc_compile.runtime.policy import Action, UnitDecision

    def v_of(decisions) -> torch.Tensor:
        executor.reset()
        v, _ = executor.step(torch.cat([z, z]), timestep, cond, decisions)
        v = v[:, : z.shape[1]].float()
        vc, vu = v.chunk(2)
        return vu + cfg * (vc - vu)

    ref = v_of({}) if reference is None else reference
    pv = v_of({unit: UnitDecision(Action.PRUNE)})
    return float((pv - ref).norm() / ref.norm().clamp_min(1e-12)), ref


class LatentRecorder:
    """An executor wrapper keeping the latent (cond half) and timestep each step was run on, so calibration can
    replay any (prompt, step) of a plain ``generate`` call."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.unit_names = executor.unit_names
        self.z: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []

    def __getattr__(self, item):
        return getattr(self.executor, item)

    def reset(self) -> None:
        self.executor.reset()

    def step(self, z, timestep, cond, decisions):
        n = z.shape[0] // 2
        self.z.append(z[:n].detach().cpu().clone())
        self.t.append(timestep.detach().cpu().clone())
        self.cond = cond
        return self.executor.step(z, timestep, cond, decisions)
