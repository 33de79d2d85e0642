"""Control schedules for AIGQ's per-step precision at equal average bits (issue 12, item 2), and the bit accounting
that shows the bits are equal.

A plan's ``schedule`` puts its ``high`` variant on the steps whose block residuals change most (:mod:`.act_schedule`).
Whether *where* those steps go matters can only be shown against schedules with the same number of high steps:

* ``reversed`` — the same count on the steps act_schedule ranks *last*: the lowest per-step residual change D_t
  (the plan's recorded redundancy, ``provenance.calibration.runtime.redundancy`` for ``--uniform`` plans or
  ``provenance.calibration.redundancy`` for AIGQ plans). Step 0 has no D_t (the plan ranks it first) and is never
  chosen. Without a recorded ranking (older plans) the deterministic stand-in is the middle steps, a contiguous run
  centred on the trajectory's midpoint, which is where D_t is lowest on qc-ref
  (bench/results/must_show_h200/plans/fp8.plan.json);
* ``uniform`` — the same count evenly spaced: step floor((2k+1)·S / 2n) for k < n (the centres of n equal bins);
* ``none`` — no high step: every step at the plan's default formats (the lower bound; more bits can only be added).

Average bits are counted per linear evaluation: every linear of every evaluated unit contributes its weight and its
activation format's bits under the variant that unit ran. The step policies route block units only (embed and final
always run ``default``), which this accounting follows; it is unweighted by layer size (the plan does not record
sizes), so equal counts of high steps give equal averages exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from qc_compile.errors import UserError
from qc_compile.models.units import is_block
from qc_compile.plan import ACTIVATION_FORMATS, DEFAULT_VARIANT, WEIGHT_FORMATS, Plan

PLACEMENTS = ("reversed", "uniform", "none")


@dataclass(frozen=True)
class Bits:
    """Mean bits per linear evaluation."""

    weight: float
    activation: float

    @property
    def mean(self) -> float:
        return (self.weight + self.activation) / 2

    def to_dict(self) -> dict[str, float]:
        return {"weight": self.weight, "activation": self.activation, "mean": self.mean}


def recorded_redundancy(plan: Plan) -> list[float] | None:
    """The per-step D_t the plan's schedule was ranked by (nan for steps without one), or None if the plan does not
    record one of the schedule's length."""
    cal = (plan.provenance or {}).get("calibration") or {}
    for d in ((cal.get("runtime") or {}).get("redundancy"), cal.get("redundancy")):
        if isinstance(d, list) and len(d) == len(plan.schedule) and d:
            return [math.nan if x is None else float(x) for x in d]
    return None


def _high_variant(schedule: list[str]) -> str | None:
    used = sorted(set(schedule) - {DEFAULT_VARIANT})
    if len(used) > 1:
        raise UserError(f"plan schedule uses several non-default variants ({', '.join(used)}); the equal-bits "
                        "controls move one variant (e.g. high) against default.")
    return used[0] if used else None


def reversed_steps(n: int, num_steps: int, redundancy: list[float] | None) -> list[int]:
    """The ``n`` steps with the lowest recorded D_t (ties: the earlier step); the middle steps without a ranking."""
    if redundancy is not None:
        ranked = sorted((i for i, x in enumerate(redundancy) if not math.isnan(x)), key=lambda i: (redundancy[i], i))
        if len(ranked) >= n:
            return sorted(ranked[:n])
    start = (num_steps - n) // 2
    return list(range(start, start + n))


def uniform_steps(n: int, num_steps: int) -> list[int]:
    """``n`` evenly spaced steps of ``num_steps``: the centres of n equal bins."""
    return [((2 * k + 1) * num_steps) // (2 * n) for k in range(n)]


def control_schedules(plan: Plan, placements: Iterable[str] = PLACEMENTS) -> dict[str, list[str]]:
    """``{placement: schedule}`` with the plan's number of non-default (high) steps placed otherwise (``none``: no
    high step), each the length of the plan's schedule."""
    sched = list(plan.schedule)
    if not sched:
        raise UserError("plan has no per-step schedule; calibrate it (`qc-compile calibrate`) so that it carries "
                        "`variants.high` and a `schedule` before comparing schedule placements.")
    hv = _high_variant(sched)
    n, S = sum(v != DEFAULT_VARIANT for v in sched), len(sched)
    out: dict[str, list[str]] = {}
    for p in placements:
        if p == "reversed":
            steps = reversed_steps(n, S, recorded_redundancy(plan))
        elif p == "uniform":
            steps = uniform_steps(n, S)
        elif p == "none":
            steps = []
        else:
            raise ValueError(f"unknown placement {p!r}; known: {', '.join(PLACEMENTS)}")
        out[p] = [hv if i in steps else DEFAULT_VARIANT for i in range(S)] if hv else [DEFAULT_VARIANT] * S
    return out


def resample(schedule: list[str], num_steps: int) -> list[str]:
    """The schedule the runtime executes over ``num_steps`` steps (the step policies' resampling rule)."""
    from qc_compile.runtime.policies.precision import _check_variant_list

    return _check_variant_list("schedule", schedule, num_steps)


def schedule_evaluations(plan: Plan, schedule: list[str]) -> Counter:
    """``{(unit, variant): evaluations}`` of a run that computes every unit at every step under ``schedule`` (block
    units at the step's variant, the others at default)."""
    units = {e.unit for e in plan.linears.values() if e.unit}
    ev: Counter = Counter()
    for v in schedule:
        for u in units:
            ev[(u, v if is_block(u) else DEFAULT_VARIANT)] += 1
    return ev


def executed_evaluations(steps: Iterable[Any], unit_names: Iterable[str]) -> Counter:
    """``{(unit, variant): evaluations}`` actually computed in a run, from its step records (``StepRecord`` objects or
    trace dicts; a unit missing from a step's decisions was computed at default)."""
    ev: Counter = Counter()
    units = list(unit_names)
    for s in steps:
        dec = s.decisions if hasattr(s, "decisions") else s["decisions"]
        for u in units:
            d = dec.get(u) or {}
            if d.get("action", "compute") == "compute":
                ev[(u, d.get("variant") or DEFAULT_VARIANT)] += 1
    return ev


def average_bits(plan: Plan, evaluations: Mapping[tuple[str, str], int]) -> Bits:
    """Mean weight and activation bits over the linear evaluations of ``evaluations`` under the plan's formats and
    variants (a variant the plan does not define, e.g. ``fp``, counts as bf16)."""
    per_unit: dict[str, list] = {}
    for name, e in plan.linears.items():
        per_unit.setdefault(e.unit, []).append(name)
    resolved: dict[str, dict] = {}
    w = a = n = 0.0
    for (u, v), k in evaluations.items():
        names = per_unit.get(u, [])
        if not names or not k:
            continue
        if v not in resolved:
            resolved[v] = plan.resolve(v) if v == DEFAULT_VARIANT or v in plan.variants else None
        ents = resolved[v]
        for name in names:
            if ents is None:
                wb = ab = 16.0
            else:
                wb, ab = WEIGHT_FORMATS[ents[name].weight].bits, ACTIVATION_FORMATS[ents[name].activation].bits
            w, a, n = w + k * wb, a + k * ab, n + k
    if not n:
        raise UserError("no linear evaluation to average bits over: the plan's linears name none of the run's units.")
    return Bits(w / n, a / n)


def schedule_bits(plan: Plan, schedule: list[str], num_steps: int | None = None) -> Bits:
    """Average bits of a full-compute run under ``schedule`` (resampled to ``num_steps`` as the runtime does)."""
    s = resample(schedule, num_steps) if num_steps and num_steps != len(schedule) else list(schedule)
    return average_bits(plan, schedule_evaluations(plan, s))
