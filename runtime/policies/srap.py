"""SRAP — QuantCache's structural redundancy-aware pruning (Eq. 9–11): prune a block unit whose output is nearly
collinear with the previous unit's, with a seeded random draw.

    S^(l,l+1) = cos(p^(l), p^(l+1))                                                               (Eq. 9)
    P_prune^(l+1) = 1 if S > τ_high;  P_base if τ_low ≤ S ≤ τ_high;  0 if S < τ_low                 (Eq. 10)
    V_t = Σ_{i=0..k} ‖p_t − p_{t−i}‖₁                                                             (Eq. 11)

A pruned unit is the identity (its output is its input). Readings we chose:

* **S needs the very output it would skip.** We use S measured at the unit's *last computed step* (the executor's
  ``cos_prev``: cosine between this unit's output and the previous unit's output in that step), not a calibration
  constant; a unit that has never been computed is not pruned. The decision is before the step, so there is no
  per-block synchronisation.
* **V_t modifier.** p_t in Eq. 11 carries no layer index; we take the latent entering each step, with the relative
  L1 norm (executor stat ``latent_rel_l1``, d_t = ‖z_t − z_{t−1}‖₁/‖z_{t−1}‖₁), and ‖z_t − z_{t−i}‖₁ ≈ Σ_{j<i} d_{t−j}
  (exact when the steps are collinear, as rectified-flow Euler steps nearly are), i.e. V_t = Σ_{i=1..k} Σ_{j<i} d_{t−j}
  over the last ``window`` = k steps observed (one step behind, to keep one device-to-host copy per step).
  V_t < δ_low multiplies the probability of the *redundant* units (S ≥ τ_low) by ``boost`` (capped at 1);
  V_t > δ_high multiplies every probability by ``damp``.
* The first block unit has no predecessor and is never pruned; with ``no_adjacent`` a unit is not pruned right after
  a unit SRAP pruned in the same step (S was measured against a computed predecessor). Nothing is pruned in the
  first ``warmup`` or the last ``tail`` steps.
* **Reproducibility:** one uniform draw per (step, candidate unit) in a fixed order from a PCG64 generator seeded by
  ``seed`` (the run's seed unless set), re-seeded at ``reset`` — the same seed gives the same decisions.

**Thresholds are per model.** QuantCache publishes no numeric values for τ_low, τ_high, P_base, δ_low or δ_high
(checked against the full text, ``../shared/seeds/001_*``: the 0.99xx numbers in its tables are CLIP-Temp scores,
not thresholds). The block-to-block cosine is a property of the model: on qc-ref it lies between 0.86 and 0.97
(consecutive units change the hidden state a lot), so any fixed threshold near 1 never prunes there, and a fixed
lower one prunes blindly. ``qc-compile calibrate`` therefore measures the distribution of ``cos_prev`` per unit,
step and CFG branch over the calibration prompts (:mod:`qc_compile.calib.srap`) and writes per-unit thresholds into
the plan (``cache_policy.params.srap.units = {unit: {tau_low, tau_high}}``), chosen by their *measured fidelity cost*:
candidate thresholds are run end to end on the calibration prompts under HLC and kept only if they save >= 3 points
of compute at <= 0.5 dB PSNR (a quantile of the cosine alone pruned qc-ref units whose output differs from their
input by 30-40 % and cost 17 dB on the H200 sweep). When no candidate qualifies, as on qc-ref, the plan's
thresholds never prune and its provenance says why. The runtime layers defaults < plan < ``--set``. Without a
calibrated plan the defaults below (0.995 / 0.999, ours) keep SRAP effectively off on models like qc-ref rather than
pruning unvalidated.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Mapping

import numpy as np

from qc_compile.errors import UserError
from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.policies.base import BasePolicy, Param, computed, require_order


class SRAP(BasePolicy):
    name = "srap"
    PARAMS = {
        "tau_low": Param(0.995, float, -1.0, 1.0, doc="cosine below this: never prune"),
        "tau_high": Param(0.999, float, -1.0, 1.0, doc="cosine above this: always prune"),
        "p_base": Param(0.1, float, 0.0, 1.0, doc="pruning probability between the thresholds"),
        "delta_low": Param(0.05, float, 0.0, None, doc="V_t below this boosts pruning"),
        "delta_high": Param(0.5, float, 0.0, None, doc="V_t above this damps pruning"),
        "boost": Param(1.5, float, 1.0, None),
        "damp": Param(0.5, float, 0.0, 1.0),
        "window": Param(3, int, 1, 1000, doc="k of Eq. 11"),
        "no_adjacent": Param(True, bool),
        "warmup": Param(2, int, 0, 1000),
        "tail": Param(1, int, 0, 1000),
        "seed": Param(None, int, 0, 2 ** 63 - 1, nullable=True, doc="default: the run's seed"),
        "units": Param({}, dict, doc="per-unit {tau_low, tau_high} from calibration (override the global ones)"),
    }

    def validate(self) -> None:
        require_order(self.name, self.params, "tau_low", "tau_high")
        require_order(self.name, self.params, "delta_low", "delta_high")
        for unit, d in self.params["units"].items():
            if not isinstance(d, Mapping) or not set(d) <= {"tau_low", "tau_high"}:
                raise UserError(f"srap.units.{unit}: expected a mapping with keys tau_low and/or tau_high, got {d!r}.")
            for k, v in d.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not -1.0 <= v <= 1.0:
                    raise UserError(f"srap.units.{unit}.{k} = {v!r}: expected a number in [-1, 1].")
            lo, hi = self.thresholds(unit)
            if lo > hi:
                raise UserError(f"srap.units.{unit}: tau_low = {lo:g} must not exceed tau_high = {hi:g}.")

    def thresholds(self, unit: str) -> tuple[float, float]:
        d = self.params["units"].get(unit, {})
        return d.get("tau_low", self.tau_low), d.get("tau_high", self.tau_high)

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        unknown = set(self.params["units"]) - set(self.blocks)
        if unknown:
            raise UserError(f"srap.units names unit(s) {sorted(unknown)} that this model does not have; block units "
                            f"are {', '.join(self.blocks)}.")
        self.rng = np.random.Generator(np.random.PCG64(self.seed or 0))
        self.similarity: dict[str, float] = {}
        self.latent_changes: deque[float] = deque(maxlen=self.window)
        self.last_probs: dict[str, float] = {}

    def probability(self, s: float, v: float | None, unit: str | None = None) -> float:
        """Eq. 10 with the V_t modifier (the unit's calibrated thresholds where the plan has them)."""
        lo, hi = self.thresholds(unit) if unit is not None else (self.tau_low, self.tau_high)
        if s > hi:
            p = 1.0
        elif s >= lo:
            p = self.p_base
        else:
            return 0.0
        if v is not None and v < self.delta_low:
            p = min(1.0, p * self.boost)
        elif v is not None and v > self.delta_high:
            p = p * self.damp
        return p

    def variation(self) -> float | None:
        """V_t from the latent changes observed so far (None until one is known)."""
        d = list(self.latent_changes)[::-1]  # newest first
        if not d:
            return None
        return float(sum(sum(d[:i]) for i in range(1, len(d) + 1)))

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        out: dict[str, UnitDecision] = {}
        v = self.variation()
        edge = self.in_edges(step, self.warmup, self.tail)
        self.last_probs = {}
        pruned_prev = False
        for i, u in enumerate(self.blocks):
            if i == 0:
                continue
            r = float(self.rng.random())  # drawn for every candidate, so draws do not depend on the state
            s = self.similarity.get(u)
            if edge or s is None or (self.no_adjacent and pruned_prev):
                pruned_prev = False
                continue
            p = self.probability(s, v, u)
            self.last_probs[u] = p
            pruned_prev = r < p
            if pruned_prev:
                out[u] = UnitDecision(Action.PRUNE)
        return out

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        super().observe(step, stats)
        d = stats.get("embed", "latent_rel_l1")
        if not math.isnan(d):
            self.latent_changes.append(d)
        for u in self.blocks:
            c = stats.get(u, "cos_prev")
            if computed(stats, u) and not math.isnan(c):
                self.similarity[u] = c
