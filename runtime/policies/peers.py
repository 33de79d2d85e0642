"""Peer caching methods, faithful to their published rules and defaults, behind the same interface.

=========  =======================================================================================================
name       rule (source)
=========  =======================================================================================================
interval   static interval on whole units: compute every block at steps i % N == 0 (and the last ``tail`` steps),
           REUSE their residuals otherwise (cache_diffusion / Δ-DiT-style residual reuse, no test).
fora       FORA (arXiv 2407.01425, ``prathebaselva/FORA`` src/models.py): a static schedule on the DDPM-style
           countdown index r = S−1−i: full computation at the first step and where r % N == 0 (so the last step is
           always computed), N = 3 (the repository's example). In between every block reuses its cached
           self-attention, cross-attention and MLP outputs, taken *before* the adaLN gate and multiplied by the
           current step's gates (as FORA's code does); the cross-attention of STDiT3 (absent in DiT) is treated as an
           attention layer and cached too.
teacache   TeaCache (``ali-vilab/TeaCache`` eval/teacache/experiments/opensora.py): indicator = relative L1 change of
           the first block's adaLN-modulated input vs the previous step, rescaled by the Open-Sora 1.2 polynomial
           [2.17546007e2, −1.18329252e2, 2.68662585e1, −4.59364272e−2, 4.84426240e−2] and accumulated; while the sum
           stays below ``rel_l1_thresh`` (slow 0.1 = default, fast 0.2) the whole stack is skipped (each unit's cached
           residual, which together equal the stack residual of the last full step); otherwise computed and the sum
           reset. First and last steps always computed. One indicator for the CFG batch (Open-Sora runs it as one).
fbcache    First-Block Cache (ParaAttention; diffusers FirstBlockCacheConfig): always run the first block unit;
           if the relative L1 change of its residual against the residual at the last full computation is below
           ``threshold`` (0.06, the published video/HunyuanVideo value; 0.08 for FLUX), reuse all later units.
dbcache    DBCache (cache-dit): Fn first units always computed, their combined residual compared (relative L1) with
           the one at the last full computation; below ``threshold`` (0.08) the middle units are reused; the last Bn
           units always run; no caching in the first ``warmup`` = 8 steps; optional max cached / max continuous
           cached steps (−1 = unlimited, the defaults). cache-dit's default Fn = 8 would be qc-ref's whole stack
           (8 block units), so the default here is Fn = 2, Bn = 0 scaled to depth: one STDiT3 layer (spatial +
           temporal) as the probe; set ``dbcache.fn`` / ``dbcache.bn`` for other splits.
pab        Pyramid Attention Broadcast (VideoSys ``core/pab_mgr.py``, OpenSoraPABConfig): at step i with timestep
           t ∈ (450, 930), reuse the *gated* spatial-attention output of spatial units when i % 2 ≠ 0, the temporal
           attention of temporal units when i % 4 ≠ 0, and the cross-attention of every unit when i % 6 ≠ 0 (from
           the last step that computed them); MLP broadcast: at t ∈ {676, 788, 864} blocks 0–4 (spatial and temporal)
           compute and save their MLP output and reuse it for the next ``skip_count`` = 2 steps. The keys are
           Open-Sora's 30-step schedule; ``mlp_match=exact`` (default, faithful) matches int(t) exactly and so never
           fires on other schedules (e.g. qc-ref's linear one); ``nearest`` maps each key to the nearest step.
=========  =======================================================================================================

The gated peers (TeaCache, First-Block Cache, DBCache) decide inside the step, after the probe: their decisions are
``Action.GATED`` with a :class:`~qc_compile.runtime.policy.Gate`; this costs one scalar device-to-host copy per step,
as in the original code. PAB and FORA cache sub-block outputs: their decisions use ``UnitDecision.parts``.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from qc_compile.errors import UserError
from qc_compile.runtime.policy import SUB_BLOCKS, Action, Gate, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.policies.base import BasePolicy, Param

TEACACHE_OPENSORA_COEFFICIENTS = (2.17546007e+02, -1.18329252e+02, 2.68662585e+01, -4.59364272e-02, 4.84426240e-02)


class StaticInterval(BasePolicy):
    name = "interval"
    PARAMS = {
        "interval": Param(2, int, 1, 1000, doc="N: compute every N-th step"),
        "warmup": Param(1, int, 1, 1000),
        "tail": Param(1, int, 0, 1000),
    }

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        if self.in_edges(step, self.warmup, self.tail) or step.index % self.interval == 0:
            return {}
        return {u: UnitDecision(Action.REUSE) for u in self.blocks}


class FORA(BasePolicy):
    name = "fora"
    requires = frozenset({"parts"})
    PARAMS = {"interval": Param(3, int, 1, 1000, doc="N (FORA's cache_threshold)")}

    def full_step(self, step: StepInfo) -> bool:
        r = step.num_steps - 1 - step.index
        return step.index == 0 or r % self.interval == 0

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        parts = () if self.full_step(step) else SUB_BLOCKS
        return {u: UnitDecision(Action.COMPUTE, parts=parts, regate=True) for u in self.blocks}


class TeaCache(BasePolicy):
    name = "teacache"
    requires = frozenset({"gate"})
    PARAMS = {
        "rel_l1_thresh": Param(0.1, float, 0.0, None, doc="0.1 slow, 0.2 fast (published)"),
        "coefficients": Param(list(TEACACHE_OPENSORA_COEFFICIENTS), list, doc="rescale polynomial, highest first"),
    }

    def validate(self) -> None:
        c = self.coefficients
        if not c or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in c):
            try:
                self.params["coefficients"] = [float(x) for x in c]
            except (TypeError, ValueError):
                raise UserError(f"teacache.coefficients = {c!r}: expected a list of numbers.") from None
        self.rescale = np.poly1d([float(x) for x in self.params["coefficients"]])

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        self.acc = 0.0
        self.history: list[dict] = []

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        forced = step.index == 0 or step.index == step.num_steps - 1

        def opens(value: float) -> bool:
            rec = {"step": step.index, "rel_l1": value}
            if forced or math.isinf(value):
                self.acc = 0.0
                rec.update(acc=0.0, reuse=False)
                self.history.append(rec)
                return False
            self.acc += float(self.rescale(value))
            reuse = self.acc < self.rel_l1_thresh
            rec.update(acc=self.acc, reuse=reuse)
            if not reuse:
                self.acc = 0.0
            self.history.append(rec)
            return reuse

        gate = Gate("modulated_input", opens)
        return {u: UnitDecision(Action.GATED, gate=gate) for u in self.blocks}


class DBCache(BasePolicy):
    name = "dbcache"
    requires = frozenset({"gate"})
    PARAMS = {
        "fn": Param(2, int, 1, 10000, doc="first units always computed (the probe)"),
        "bn": Param(0, int, 0, 10000, doc="last units always computed"),
        "threshold": Param(0.08, float, doc="residual_diff_threshold; <= 0 disables caching, >= 1 always caches"),
        "warmup": Param(8, int, 0, 10000, doc="max_warmup_steps: no caching in the first steps"),
        "max_cached_steps": Param(-1, int, -1, 10000),
        "max_continuous_cached_steps": Param(-1, int, -1, 10000),
    }

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        if self.fn + self.bn >= len(self.blocks):
            raise UserError(f"{self.name}.fn + {self.name}.bn = {self.fn + self.bn} leaves no middle units to cache: "
                            f"this model has {len(self.blocks)} block units; expected fn >= 1 and "
                            f"fn + bn <= {len(self.blocks) - 1}.")
        self.cached_steps = 0
        self.continuous = 0
        self.history: list[dict] = []

    def opens(self, step: StepInfo, value: float) -> bool:
        rec = {"step": step.index, "rel_l1": value}
        reuse = True
        if step.index < self.warmup or self.threshold <= 0 or math.isinf(value):
            reuse = False
        elif 0 <= self.max_cached_steps <= self.cached_steps:
            reuse = False
        elif 0 <= self.max_continuous_cached_steps <= self.continuous:
            reuse = False
            self.continuous = 0
        elif self.threshold < 1:
            reuse = value < self.threshold
        if reuse:
            self.cached_steps += 1
            self.continuous += 1
        else:
            self.continuous = 0
        rec["reuse"] = reuse
        self.history.append(rec)
        return reuse

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        gate = Gate("residual", lambda v: self.opens(step, v))
        middle = self.blocks[self.fn: len(self.blocks) - self.bn]
        return {u: UnitDecision(Action.GATED, gate=gate) for u in middle}


class FBCache(DBCache):
    name = "fbcache"
    PARAMS = {
        "threshold": Param(0.06, float, doc="residual_diff_threshold (0.06 video, 0.08 FLUX)"),
        "fn": Param(1, int, 1, 10000),
        "bn": Param(0, int, 0, 10000),
        "warmup": Param(0, int, 0, 10000),
        "max_cached_steps": Param(-1, int, -1, 10000),
        "max_continuous_cached_steps": Param(-1, int, -1, 10000),
    }


class PAB(BasePolicy):
    name = "pab"
    requires = frozenset({"parts"})
    PARAMS = {
        "spatial_range": Param(2, int, 1, 1000),
        "temporal_range": Param(4, int, 1, 1000),
        "cross_range": Param(6, int, 1, 1000),
        "t_low": Param(450.0, float, 0.0, 1000.0),
        "t_high": Param(930.0, float, 0.0, 1000.0),
        "mlp": Param(True, bool, doc="MLP broadcast"),
        "mlp_steps": Param([676, 788, 864], list, doc="timesteps that save the MLP output"),
        "mlp_blocks": Param([0, 1, 2, 3, 4], list, doc="block indices (spatial and temporal) of MLP broadcast"),
        "mlp_skip_count": Param(2, int, 0, 1000),
        "mlp_match": Param("exact", str, choices=("exact", "nearest")),
    }

    def validate(self) -> None:
        if self.t_low >= self.t_high:
            raise UserError(f"pab.t_low = {self.t_low:g} must be below pab.t_high = {self.t_high:g}.")
        try:
            self.params["mlp_steps"] = [int(float(x)) for x in self.mlp_steps]
            self.params["mlp_blocks"] = [int(x) for x in self.mlp_blocks]
        except (TypeError, ValueError):
            raise UserError("pab.mlp_steps and pab.mlp_blocks must be lists of integers.") from None

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        self.timesteps: list[float] = []
        self.saved_at: int | None = None

    def mlp_state(self, step: StepInfo) -> tuple[bool, bool]:
        """(save_now, reuse_now) of the MLP broadcast at this step."""
        if not self.mlp:
            return False, False
        if self.mlp_match == "exact":  # VideoSys: int(t) must be one of the keys
            save = int(step.t) in self.mlp_steps
        else:  # the step whose timestep is nearest to a key (t_{i+1} = t_i - 1000·dt)
            t, t_next = step.t, step.t - 1000.0 * step.dt
            t_prev = self.timesteps[-1] if self.timesteps else math.inf
            save = any((t >= k > t_next and t - k <= k - t_next) or (t_prev >= k > t and k - t < t_prev - k)
                       for k in self.mlp_steps)
        if save:
            self.saved_at = step.index
            return True, False
        reuse = self.saved_at is not None and 0 < step.index - self.saved_at <= self.mlp_skip_count
        return False, reuse

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        i, t = step.index, int(step.t)
        window = self.t_low < t < self.t_high
        save, mlp_reuse = self.mlp_state(step)
        self.timesteps.append(step.t)
        out = {}
        for u in self.blocks:
            kind, idx = u.rsplit("_", 1)
            reuse = []
            # a full 3-D attention block (diffusers families, ``block_<i>``) broadcasts like a spatial one, as
            # diffusers' own PAB configures CogVideoX and Wan (spatial_attention_block_skip_range)
            attn_range = self.temporal_range if kind == "temporal" else self.spatial_range
            if window and i % attn_range != 0:
                reuse.append("attn")
            if window and i % self.cross_range != 0:
                reuse.append("cross")
            if mlp_reuse and int(idx) in self.mlp_blocks:
                reuse.append("mlp")
            out[u] = UnitDecision(Action.COMPUTE, parts=tuple(reuse))
        return out
