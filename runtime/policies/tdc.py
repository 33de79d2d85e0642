"""TDC — 6Bit-Diffusion's Temporal Delta Cache with its guards, and PDR (purified delta refresh).

A block unit's residual δ = output − input changes little between adjacent steps. Per unit:

* **stability** e = ‖δ_t − δ_{t−k}‖₁ / ‖δ_{t−k}‖₁ / k, measured whenever the unit is computed (the executor's
  ``res_rel_l1`` against the residual cached k steps earlier; divided by k so that it is a per-step rate — with
  back-to-back computations it is exactly "how much δ changed over the previous two steps");
* **skip** (REUSE: cached δ added to the current input) at the next step while e < ``thresh``;
* **accumulated-error guard**: each skipped step adds e to E_acc; a step whose skip would bring E_acc above
  ``acc_thresh`` (τ) is computed instead, and E_acc resets on every computation;
* **max run**: at most ``max_skip`` (N_max, published default 2) consecutive skipped steps;
* computed in the first ``warmup`` and last ``tail`` steps and whenever e is unknown.

**PDR** (``pdr``): the first computation after a skip refreshes the cache; it runs at variant ``high`` (INT8 next to
NVFP4 in the paper: the predictor's Γ is not available after a skip), and at variant ``fp`` when the unit's input
outlier ratio max|x|/mean|x| at its last computation exceeded ``outlier_ratio`` (25 in the paper, which applies it per
linear layer; we apply it to the unit input — the granularity the executor sees). Computations that follow a
computed step use variant ``default`` here; the DMPQ predictor (``dmpq``) routes those when combined (``6bit``).

Published: N_max = 2, outlier ratio 25. The thresholds are not published; the defaults are ours (tuned on qc-ref).
"""

from __future__ import annotations

import math
from typing import Mapping

from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.policies.base import BasePolicy, Param, computed, residual_change_rates


class TDC(BasePolicy):
    name = "tdc"
    PARAMS = {
        "thresh": Param(0.05, float, 0.0, None, doc="per-step residual change below which a unit is skipped"),
        "acc_thresh": Param(0.15, float, 0.0, None, doc="accumulated-error guard tau"),
        "max_skip": Param(2, int, 0, 1000, doc="N_max consecutive skipped steps"),
        "warmup": Param(2, int, 1, 1000),
        "tail": Param(1, int, 0, 1000),
        "pdr": Param(True, bool, doc="refresh after a skip in higher precision"),
        "outlier_ratio": Param(25.0, float, 0.0, None, lo_open=True, nullable=True,
                               doc="input max/mean above which a refresh runs at variant fp (null: never)"),
    }

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        self.stability: dict[str, float] = {}
        self.acc: dict[str, float] = {u: 0.0 for u in self.blocks}
        self.run: dict[str, int] = {u: 0 for u in self.blocks}
        self.outlier: dict[str, float] = {}

    def refresh_variant(self, u: str) -> str:
        if not self.pdr:
            return "default"
        if self.outlier_ratio is not None and self.outlier.get(u, 0.0) > self.outlier_ratio:
            return "fp"
        return "high"

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        out: dict[str, UnitDecision] = {}
        edge = self.in_edges(step, self.warmup, self.tail)
        for u in self.blocks:
            e = self.stability.get(u)
            skip = (not edge and e is not None and u in self.last_computed and self.run[u] < self.max_skip
                    and e < self.thresh and self.acc[u] + e <= self.acc_thresh)
            if skip:
                out[u] = UnitDecision(Action.REUSE)
                self.acc[u] += e
                self.run[u] += 1
            elif self.run[u] > 0:  # first computation after a skip: PDR
                out[u] = UnitDecision(Action.COMPUTE, self.refresh_variant(u))
        return out

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        self.stability.update(residual_change_rates(stats, step, self.blocks, self.last_computed))
        for u in self.blocks:
            if not computed(stats, u):
                continue
            o = stats.get(u, "in_outlier")
            if not math.isnan(o):
                self.outlier[u] = o
            self.acc[u] = 0.0
            self.run[u] = 0
