"""A divergence guard for any caching policy: a block unit that has been skipped too long is computed.

Caching policies decide per unit from what they measured at its last computation; between computations nothing
checks that the reused residual is still close. One bad estimate then lets a single video drift (the min-PSNR
videos of issue 12's sweep). ``guard`` bounds that, composed with any policy (``hlc+guard``, ``quantcache+guard``,
``teacache+guard``), and it is applied *after* the other components' decisions are merged (it overrides a skip, which
the normal merge rule, "a unit is computed only if no component skips it", could not):

* ``max_reuse``: at most this many consecutive steps without computing a unit (reused, pruned, or gated shut);
  the next one computes it. 0 disables the bound.
* ``max_drift``: an estimate of the relative error a skipped unit accumulates — the sum, over the steps it has been
  skipped, of its last measured residual change per step (the executor's ``res_rel_l1`` divided by the steps
  between its last two computations, as HLC's Eq. 5 score). A skip that would take the estimate past the bound is
  turned into a compute. ``inf`` (or 0) disables it.

Forced computations keep the variant the policy asked for. The guard only turns skips into computes, so it never
lowers the compute fraction. Off unless named in the policy; its defaults (8 steps, drift 1.0) are loose bounds that
do not act on qc-ref's default HLC schedule (τ ≤ 5) and catch runaway reuse of other settings.
"""

from __future__ import annotations

import math
from typing import Mapping

from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.policies.base import BasePolicy, Param, computed

SKIPS = (Action.REUSE, Action.PRUNE, Action.GATED)


class ReuseGuard(BasePolicy):
    name = "guard"
    PARAMS = {
        "max_reuse": Param(8, int, 0, 1000, doc="most consecutive steps a unit may go uncomputed (0 = no bound)"),
        "max_drift": Param(1.0, float, 0.0, None, doc="bound on the accumulated relative residual change of a "
                                                         "skipped unit (0 or inf = no bound)"),
    }

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        self.skipped: dict[str, int] = {}  # consecutive uncomputed steps per unit
        self.rate: dict[str, float] = {}  # last measured residual change per step
        self.forced: list[tuple[int, str, str]] = []  # (step, unit, reason): what the guard overrode

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        return {}  # acts in enforce(), after the merge

    def enforce(self, step: StepInfo, decisions: Mapping[str, UnitDecision]) -> dict[str, UnitDecision]:
        """``decisions`` with the skips that break a bound turned into computes (same variant)."""
        out = dict(decisions)
        for u, d in decisions.items():
            if d.action not in SKIPS or u not in self.blocks:
                continue
            n = self.skipped.get(u, 0) + 1  # consecutive skips if this one goes ahead
            reason = None
            if self.max_reuse and n > self.max_reuse:
                reason = "max_reuse"
            elif 0 < self.max_drift < math.inf and self.rate.get(u, 0.0) * n > self.max_drift:
                reason = "max_drift"
            if reason:
                out[u] = UnitDecision(Action.COMPUTE, d.variant)
                self.forced.append((step.index, u, reason))
        return out

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        for u in self.blocks:
            if computed(stats, u):
                last = self.last_computed.get(u)
                rel = stats.get(u, "res_rel_l1")
                if last is not None and not math.isnan(rel):
                    self.rate[u] = rel / max(step.index - last, 1)
                self.last_computed[u] = step.index
                self.skipped[u] = 0
            else:
                self.skipped[u] = self.skipped.get(u, 0) + 1

    def describe(self) -> dict:
        return {"name": self.name, "params": dict(self.params), "forced": len(getattr(self, "forced", []))}
