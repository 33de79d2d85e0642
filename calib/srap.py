"""SRAP thresholds per model: the distribution of the similarity SRAP reads, a quantile rule, and its validation.

What SRAP reads at run time is the executor's ``cos_prev`` (``runtime/step_stats.py``): the cosine between a block
unit's output and its input — the previous unit's output — over the *whole* batch of the step, i.e. both CFG
branches of the prompt together. Calibration measures the same quantity per (prompt, step, unit) and per CFG branch
from three per-row sums (⟨in, out⟩, ‖in‖², ‖out‖²), so the combined value equals the runtime's for one-prompt runs.

Rule (per unit, because the level of the cosine is a property of each block: on qc-ref 0.86-0.97 depending on the
unit): ``tau_high`` = the ``quantile`` of the unit's cosine over the calibration prompts and the steps SRAP may act
on (not the warm-up or tail steps); ``tau_low`` = ``tau_high`` (no random band: P_base only matters between two
thresholds). So SRAP prunes each unit on about ``1 - quantile`` of its steps, the ones where it is most redundant.

Validation: on up to ``samples_per_unit`` calibration samples above the unit's threshold, the step is replayed with
and without pruning the unit and the relative error of the CFG velocity is measured. A unit whose median error is
above ``max_error`` gets no thresholds (never pruned). The errors are reported with the plan, so the cost of what
SRAP may prune is on record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from qc_compile.errors import UserError

DEFAULT_QUANTILE = 0.9
DEFAULT_MAX_ERROR = 0.5
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


def calibrate(grid: SimilarityGrid, prune_error: Callable[[int, int, str], float] | None, *,
              quantile: float = DEFAULT_QUANTILE, max_error: float = DEFAULT_MAX_ERROR, samples_per_unit: int = 2,
              warmup: int | None = None, tail: int | None = None) -> SrapCalibration:
    """Per-unit thresholds from the grid; ``prune_error(prompt, step, unit)`` measures the relative CFG-velocity
    error of pruning ``unit`` at that calibration sample (None: no validation, recorded as such)."""
    from qc_compile.runtime.policies.srap import SRAP

    if not 0.0 < quantile < 1.0:
        raise UserError(f"--srap-quantile must be in (0, 1), got {quantile}.")
    if max_error <= 0:
        raise UserError(f"--srap-max-error must be positive, got {max_error}.")
    warmup = SRAP.PARAMS["warmup"].default if warmup is None else warmup
    tail = SRAP.PARAMS["tail"].default if tail is None else tail
    cos = grid.cos("both")
    P, S, U = cos.shape
    steps = acting_steps(S, warmup, tail)
    if not steps:  # too few calibration steps to say anything: SRAP stays off in this plan
        return SrapCalibration({"tau_low": NEVER, "tau_high": NEVER},
                               {"note": f"{S} calibration steps leave none outside SRAP's warm-up {warmup} and tail "
                                        f"{tail}: no thresholds written", "validated": False})
    units: dict[str, dict] = {}
    rep: dict = {"quantile": quantile, "max_error": max_error, "steps": S, "acting_steps": [steps[0], steps[-1]],
                 "units": {}}
    for j, u in enumerate(grid.units):
        vals = cos[:, steps, j]
        stat = {b: _summary(grid.cos(b)[:, steps, j]) for b in ("both", "cond", "null")}
        if j == 0:  # the first block unit has no predecessor at run time: never pruned
            rep["units"][u] = {"cos": stat, "note": "first block unit: no predecessor, never pruned"}
            continue
        tau = float(torch.quantile(vals.flatten().double(), quantile))
        above = [(p, steps[k]) for p in range(P) for k in range(len(steps)) if float(vals[p, k]) >= tau]
        above.sort(key=lambda ps: -float(cos[ps[0], ps[1], j]))
        errs = []
        if prune_error is not None:
            pick = above[:: max(1, len(above) // max(1, samples_per_unit))][:samples_per_unit]
            errs = [{"prompt": p, "step": s, "cos": float(cos[p, s, j]), "velocity_rel_err": prune_error(p, s, u)}
                    for p, s in pick]
        med = _median([e["velocity_rel_err"] for e in errs])
        ok = med is None or med <= max_error
        units[u] = {"tau_low": round(tau, 6) if ok else NEVER, "tau_high": round(tau, 6) if ok else NEVER}
        rep["units"][u] = {"cos": stat, "threshold": tau, "pruned_fraction_calib": len(above) / vals.numel(),
                           "validation": errs, "median_velocity_rel_err": med, "kept": ok}
    params = {"tau_low": NEVER, "tau_high": NEVER, "units": units}
    rep["validated"] = prune_error is not None
    return SrapCalibration(params, rep)


def _summary(x: torch.Tensor) -> dict:
    x = x.flatten().double()
    q = torch.quantile(x, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
    return {"min": float(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]), "max": float(q[4])}


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
