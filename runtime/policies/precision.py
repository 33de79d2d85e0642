"""Precision routing: the AIGQ activation schedule (QuantCache Eq. 8), a plain per-step schedule from the plan, and
6Bit-Diffusion's DMPQ predictor. These only choose the *variant* of computed units; they never skip.

Variant names (see ``base.VARIANT_RANK``): ``default`` is the plan's main format of a unit, ``high`` its
higher-precision variant, ``low`` a lower one, ``fp`` unquantized. The torch FP executor runs every variant in FP
unless it is given per-variant models; the decisions are still recorded and drawn.

A schedule calibrated for another number of steps is resampled by relative position along the trajectory (step i of
n takes entry round(i·(m−1)/(n−1)) of the m calibrated ones): the first and last steps keep theirs, and a plan
calibrated at 30 steps applies to a 12-step run instead of failing it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from qc_compile.errors import UserError
from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.policies.base import BasePolicy, Param, computed, require_order, residual_change_rates


def _check_variant_list(field: str, seq: Any, num_steps: int) -> list[str]:
    if not isinstance(seq, (list, tuple)) or not all(isinstance(v, str) for v in seq):
        raise UserError(f"{field}: expected a list of variant names (one per step), got {type(seq).__name__}.")
    if not seq:
        raise UserError(f"{field}: expected one variant name per step, got an empty list.")
    if len(seq) != num_steps:  # calibrated for another step count: the same positions along the trajectory
        n = len(seq)
        return [seq[0 if num_steps == 1 else round(i * (n - 1) / (num_steps - 1))] for i in range(num_steps)]
    return list(seq)


class PrecisionSchedule(BasePolicy):
    """A per-step (optionally per-unit) variant list from the plan: ``plan["policy"]["schedule"]`` =
    ``{"steps": [variant per step], "units": {unit: [variant per step]}}`` (units override steps)."""

    name = "schedule"
    PARAMS = {
        "steps": Param(None, list, nullable=True, doc="variant per step"),
        "units": Param({}, dict, doc="unit -> variant per step"),
    }

    def validate(self) -> None:
        if self.steps is None and not self.params["units"]:
            raise UserError("policy schedule needs a precision schedule: the plan's policy.schedule.steps (a variant "
                            "per step) or policy.schedule.units; none was given. Run `qc-compile calibrate` or pass "
                            "--set schedule.steps=high,default,...")

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        self.step_variants = (_check_variant_list("schedule.steps", self.steps, num_steps)
                              if self.steps is not None else None)
        self.unit_variants = {}
        for u, seq in self.params["units"].items():
            if u not in self.blocks:
                raise UserError(f"schedule.units names unit {u!r}, which this model does not have.")
            self.unit_variants[u] = _check_variant_list(f"schedule.units.{u}", seq, num_steps)

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        out = {}
        for u in self.blocks:
            seq = self.unit_variants.get(u, self.step_variants)
            if seq is not None and seq[step.index] != "default":
                out[u] = UnitDecision(Action.COMPUTE, seq[step.index])
        return out


class AIGQ(BasePolicy):
    """AIGQ's activation bit-width per step (QuantCache Eq. 8) and its coupling with HLC.

    Two sources, the plan's calibrated schedule first:

    * ``schedule``: a variant per step from calibration (``plan["policy"]["aigq"]["schedule"]``);
    * online: D_t = mean over the units computed at the previous step of HLC's divergence rate
      (``res_rel_l1 / k``), then ``low`` if D_t < θ1, ``default`` (Bit_mid) if θ1 ≤ D_t < θ2, ``high`` if D_t ≥ θ2.

    **Eq. 8 direction.** Printed, Eq. 8 gives Bit_max for D_t < θ1 and calls large D_t "high redundancy", while D_t is
    defined as a *distance* between consecutive feature maps. We read D_t as the distance: a small change between
    steps (high redundancy) tolerates fewer bits, a large change (structure forming) gets more. This is the paper's
    stated intuition, with the comparison made on the quantity as defined.
    **Coupling** ("for larger skips ... enhance precision in post-skip steps"): a unit computed after ``post_skip`` or
    more skipped steps runs at ``high``. θ1/θ2 default to null (online part off) because they are per model.
    """

    name = "aigq"
    PARAMS = {
        "theta1": Param(None, float, 0.0, None, nullable=True),
        "theta2": Param(None, float, 0.0, None, nullable=True),
        "post_skip": Param(3, int, 1, 1000, nullable=True, doc="skipped steps after which a recompute runs high"),
        "schedule": Param(None, list, nullable=True, doc="calibrated variant per step"),
    }

    def validate(self) -> None:
        if (self.theta1 is None) != (self.theta2 is None):
            raise UserError("aigq.theta1 and aigq.theta2 must be given together (or neither).")
        require_order(self.name, self.params, "theta1", "theta2")

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        self.sched = _check_variant_list("aigq.schedule", self.schedule, num_steps) if self.schedule else None
        self.d_t: float | None = None
        self.prev_computed: dict[str, int] = {}

    def step_variant(self, step: StepInfo) -> str:
        if self.sched is not None:
            return self.sched[step.index]
        if self.theta1 is None or self.d_t is None:
            return "default"
        if self.d_t < self.theta1:
            return "low"
        if self.d_t < self.theta2:
            return "default"
        return "high"

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        base = self.step_variant(step)
        out = {}
        for u in self.blocks:
            v = base
            last = self.last_computed.get(u)
            if self.post_skip is not None and last is not None and step.index - last - 1 >= self.post_skip:
                v = "high"
            if v != "default":
                out[u] = UnitDecision(Action.COMPUTE, v)
        return out

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        rates = list(residual_change_rates(stats, step, self.blocks, self.last_computed).values())
        if rates:
            self.d_t = sum(rates) / len(rates)


class DMPQ(BasePolicy):
    """6Bit-Diffusion's dynamic mixed precision: predicted relative quantization error E = a·Γ_{t−1} + b, with Γ the
    unit's relative input-to-output L1 change at the previous step (executor stat ``in_out_rel_l1``); ``high`` (INT8
    in the paper) when E > ``threshold``, else ``default`` (NVFP4). Without Γ from the step just before (first step,
    or the first computation after a skip) the unit runs ``high`` — PDR's second rule.

    a, b and the threshold come from the calibration fit in the plan (``plan["policy"]["dmpq"]`` =
    ``{"a", "b", "threshold", "units": {unit: {"a", "b", "threshold"}}}``); the defaults (a=1, b=0, threshold 0.5)
    route on Γ itself and are marked uncalibrated in the trace.
    """

    name = "dmpq"
    PARAMS = {
        "a": Param(1.0, float),
        "b": Param(0.0, float),
        "threshold": Param(0.5, float, 0.0, None),
        "units": Param({}, dict, doc="per-unit {a, b, threshold}"),
        "calibrated": Param(False, bool),
    }

    def validate(self) -> None:
        for u, d in self.params["units"].items():
            if not isinstance(d, Mapping) or not set(d) <= {"a", "b", "threshold"}:
                raise UserError(f"dmpq.units.{u}: expected a mapping with keys a, b, threshold; got {d!r}.")
            if "threshold" in d and not (isinstance(d["threshold"], (int, float)) and d["threshold"] >= 0):
                raise UserError(f"dmpq.units.{u}.threshold = {d['threshold']!r}: expected a number in [0, inf).")

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        self.gamma: dict[str, float] = {}

    def predict(self, u: str, gamma: float) -> tuple[float, float]:
        d = self.params["units"].get(u, {})
        a, b, th = d.get("a", self.a), d.get("b", self.b), d.get("threshold", self.threshold)
        return a * gamma + b, th

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        out = {}
        for u in self.blocks:
            g = self.gamma.get(u)
            if g is None or self.last_computed.get(u) != step.index - 1:
                out[u] = UnitDecision(Action.COMPUTE, "high")
                continue
            err, th = self.predict(u, g)
            if err > th:
                out[u] = UnitDecision(Action.COMPUTE, "high")
        return out

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        for u in self.blocks:
            if computed(stats, u):
                g = stats.get(u, "in_out_rel_l1")
                if not math.isnan(g):
                    self.gamma[u] = g
                self.last_computed[u] = step.index
