"""HLC — QuantCache's hierarchical latent caching (Eq. 5–6): per-unit divergence score and refresh interval.

At every step where block unit *l* is computed, the score

    D^(l) = ‖p_t − p_{t−k}‖₁ / k · M^(l)                                                        (Eq. 5)

is measured and sets the number of steps until its next computation:

    τ = τ_max if D < δ1;  τ_mid if δ1 ≤ D < δ2;  τ_min if D ≥ δ2                                 (Eq. 6)

In between, the unit is REUSEd: its residual cached at the last computation is added to the *current* input
(Δ-DiT style), not a stale output replayed. **Our addition** (``extrapolate`` = g, default 0.5): the residual added is
extrapolated to the current step from the unit's last two computations, r1 + g·k·(r1 − r0) with k = steps since r1
divided by the steps between r0 and r1 (TaylorSeer's first-order term, damped; the executor keeps the one extra
residual per unit only when a policy asks). g = 0 is the paper's plain reuse. Readings we chose where the paper is
silent or garbled:

* **p is the unit's residual** (output − input), the quantity that is cached, and ‖·‖₁ is relative to the cached
  residual (the executor's ``res_rel_l1``), so δ1/δ2 do not depend on the activation scale. k is the number of steps
  since that residual was computed (the interval just finished).
* **Motion term** ``M`` (``motion``): ``moreg`` = m_t + |m_t − m_{t−k}| / k with m_t the relative
  inter-frame change of the residual (executor stat ``motion``) — "the inter-frame gradient of the feature map,
  capturing the rate of change in motion across timesteps", in the AdaCache MoReg form (motion score + motion
  gradient) that Eq. 5 follows; ``score`` = m_t; ``none`` = 1 (the default on qc-ref: see below).
* Eq. 6 prints τ_min twice; the text ("adapting caching frequency") and the AdaCache lineage give the three
  levels τ_max ≥ τ_mid ≥ τ_min used here.
* **Refresh-interval rule**: a unit is computed as soon as τ steps have passed since its last computation, whatever
  else happens; it is also computed when it has no score yet (first computations), in the first ``warmup`` steps
  and in the last ``tail`` steps (the paper does not say; the defaults are ours and documented in ``PARAMS``).
* Units that another policy pruned instead of computing stay due and are computed at the next step.
* **Hierarchy** (``align``, default on): the refresh steps of all units lie on one grid — a unit with interval τ
  is recomputed at steps i with (i − warmup) mod τ = 0 (and never later than τ steps after its last computation),
  with τ_min | τ_mid | τ_max. Units refreshed at the same step then see each other's fresh outputs, and the sets of
  refreshed units nest (every τ_max refresh is also a τ_mid and τ_min refresh): our reading of "hierarchical".
  On qc-ref this matters more than anything else: free-running per-unit phases (``align=false``) mix fresh and
  stale residuals and lost 6 dB PSNR at 7 points less compute (bench/results/tune_quantcache_h100.json:
  31.6% / 22.1 dB free-running vs 38.1% / 28.0 dB aligned, same thresholds).
* ``dt_weight`` (our addition, off by default): multiply D by dt·S, the step size relative to a uniform schedule.
  A reused residual errs in the velocity, and the latent moves by velocity × dt, so the same feature divergence
  costs more on the long late steps of a shifted rectified-flow schedule than on the short early ones.

Thresholds are per model: they come from the plan (``cache_policy.params.hlc``, optionally per unit under
``units: {unit: {delta1, delta2}}``) or ``--set hlc.delta1=...``. ``calibrate`` writes them for quantized plans
whose own quantized run computes more than the unquantized model at the defaults (quantization noise raises D:
``qc_compile.calib.hlc_thresholds``).

Defaults: δ1 = δ2 = 0.12, τ ∈ {1, 5}, warm-up 3, tail 2, no motion term, extrapolate 0.5, tuned on qc-ref with
``tools/tune_policies.py --config-file tools/configs/tune_extrapolate.txt`` (32 tuning captions, caption seed 7,
noise seeds 0 and 1000, never the held-out ones; H200; bench/results/tune_extrapolate_h200/). Over those 64 videos:
plain reuse at δ 0.1 (the previous default) 37.0% of unit evaluations, 30.46 dB mean / 21.65 dB min PSNR; g = 0.5 at
δ 0.1 37.5%, 33.69 / 22.87 dB; g = 0.5 at δ 0.12 36.5%, 33.88 / 22.49 dB (the default); g = 1 overshoots (42.7%,
33.56 / 19.34 dB: the extrapolated trajectory raises D, so more units recompute, and the worst video gets worse).
On the held-out captions (issue 12's sweep, bench/results/must_show_h200) the new default gave 36.5% at
34.80 / 25.23 dB against 37.0% at 31.50 / 23.42 dB for the previous one. Earlier tuning of the plain reuse
(bench/results/tune_quantcache_h100.json): a middle level (δ2 = 0.2, τ 1/3/6) 38.1% / 28.0 dB, the moreg motion term
33.6% / 28.7 dB: neither bought anything measurable on this model, so the default keeps two levels; both stay
available.
"""

from __future__ import annotations

import math
from typing import Mapping

from qc_compile.errors import UserError
from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.policies.base import BasePolicy, Param, computed, require_order


class HLC(BasePolicy):
    name = "hlc"
    PARAMS = {
        "delta1": Param(0.12, float, 0.0, None, doc="D below this -> tau_max"),
        "delta2": Param(0.12, float, 0.0, None, doc="D from this up -> tau_min"),
        "tau_max": Param(5, int, 1, 100, doc="steps until recomputation for low divergence"),
        "tau_mid": Param(5, int, 1, 100),
        "tau_min": Param(1, int, 1, 100),
        "motion": Param("none", str, choices=("moreg", "score", "none")),
        "dt_weight": Param(False, bool, doc="scale D by the step size relative to a uniform schedule"),
        "align": Param(True, bool, doc="refresh on a common grid: a unit with interval tau is computed at steps "
                                       "(i - warmup) % tau == 0, so the refresh sets nest"),
        "warmup": Param(3, int, 1, 1000, doc="first steps always computed (>= 1: the cache must be filled)"),
        "tail": Param(2, int, 0, 1000, doc="last steps always computed"),
        "units": Param({}, dict, doc="per-unit {delta1, delta2} overrides from calibration"),
        "extrapolate": Param(0.5, float, 0.0, 2.0, doc="weight g of the first-order term of a reuse: the residual "
                             "added is r1 + g·k·(r1 − r0) from the unit's last two computations (0 = r1 as cached)"),
    }

    @property
    def extrapolation(self) -> float:
        return float(self.extrapolate)

    def validate(self) -> None:
        require_order(self.name, self.params, "delta1", "delta2")
        require_order(self.name, self.params, "tau_min", "tau_mid", "tau_max")
        if self.align and (self.tau_mid % self.tau_min or self.tau_max % self.tau_mid):
            raise UserError(f"hlc.align needs nested intervals (tau_min divides tau_mid divides tau_max), got "
                            f"{self.tau_min}/{self.tau_mid}/{self.tau_max}; e.g. 1/2/4, or set hlc.align=false.")
        for unit, d in self.params["units"].items():
            if not isinstance(d, Mapping) or not set(d) <= {"delta1", "delta2"}:
                raise UserError(f"hlc.units.{unit}: expected a mapping with keys delta1 and/or delta2, got {d!r}.")
            for k, v in d.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                    raise UserError(f"hlc.units.{unit}.{k} = {v!r}: expected a number in [0, inf).")
            lo, hi = d.get("delta1", self.delta1), d.get("delta2", self.delta2)
            if lo > hi:
                raise UserError(f"hlc.units.{unit}: delta1 = {lo:g} must not exceed delta2 = {hi:g}.")

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        unknown = set(self.params["units"]) - set(self.blocks)
        if unknown:
            raise UserError(f"hlc.units names unit(s) {sorted(unknown)} that this model does not have; block units "
                            f"are {', '.join(self.blocks)}.")
        self.tau: dict[str, int] = {}
        self.score: dict[str, float] = {}
        self.motion_prev: dict[str, float] = {}

    def thresholds(self, unit: str) -> tuple[float, float]:
        d = self.params["units"].get(unit, {})
        return d.get("delta1", self.delta1), d.get("delta2", self.delta2)

    def interval(self, unit: str, score: float) -> int:
        d1, d2 = self.thresholds(unit)
        if score < d1:
            return self.tau_max
        if score < d2:
            return self.tau_mid
        return self.tau_min

    def divergence(self, unit: str, rel_l1: float, k: int, motion: float) -> float:
        """Eq. 5 with the readings in the module docstring (NaN motion counts as 1)."""
        d = rel_l1 / max(k, 1)
        if self.motion == "none" or math.isnan(motion):
            return d
        if self.motion == "score":
            return d * motion
        prev = self.motion_prev.get(unit, motion)
        return d * (motion + abs(motion - prev) / max(k, 1))

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        if self.in_edges(step, self.warmup, self.tail):
            return {}
        out = {}
        for u in self.blocks:
            last = self.last_computed.get(u)
            tau = self.tau.get(u)
            if last is None or tau is None or step.index - last >= tau:
                continue  # computed (default decision): the refresh-interval rule
            if self.align and (step.index - self.warmup) % tau == 0:
                continue  # computed: an aligned refresh step of this unit's interval
            out[u] = UnitDecision(Action.REUSE)
        return out

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        for u in self.blocks:
            if not computed(stats, u):
                continue
            last = self.last_computed.get(u)
            rel = stats.get(u, "res_rel_l1")
            motion = stats.get(u, "motion")
            if last is not None and not math.isnan(rel):
                score = self.divergence(u, rel, step.index - last, motion)
                if self.dt_weight:
                    score *= step.dt * step.num_steps
                self.score[u] = score
                self.tau[u] = self.interval(u, score)
            if not math.isnan(motion):
                self.motion_prev[u] = motion
            self.last_computed[u] = step.index
