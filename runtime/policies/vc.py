"""VC — Q&C's variance compensation, applied to the latent after each step.

    x̃_t = μ_t + K_t ⊙ (x̂_t − μ_t)

with one factor per step and channel, K ∈ R^{S×C}, fitted offline by calibration (closed form, against the reference
samples) and stored in the plan: ``plan["policy"]["vc"] = {"factors": [[K_c for each channel] for each step]}``.
μ_t is the per-sample, per-channel mean of the latent over (frames, height, width) — the exposure bias Q&C corrects
is a drift of the variance, not of the mean, so the mean is kept. Step i's factors apply to the latent produced by
step i (through the sampler's ``post_step`` hook); a factor of 1 is the identity.
"""

from __future__ import annotations

from typing import Mapping

import torch

from qc_compile.errors import UserError
from qc_compile.runtime.policy import StepInfo, UnitDecision
from qc_compile.runtime.policies.base import BasePolicy, Param


class VarianceCompensation(BasePolicy):
    name = "vc"
    PARAMS = {
        "factors": Param(None, list, nullable=True, doc="K: steps x channels"),
    }

    def validate(self) -> None:
        f = self.factors
        if f is None:
            raise UserError("policy vc needs per-step, per-channel factors: the plan's policy.vc.factors "
                            "(steps x channels, from `qc-compile calibrate`); none were given.")
        if not f or not all(isinstance(row, (list, tuple)) and row and
                            all(isinstance(k, (int, float)) and not isinstance(k, bool) and k > 0 for k in row)
                            for row in f):
            raise UserError("vc.factors: expected a non-empty list (one per step) of non-empty lists of positive "
                            "numbers (one per latent channel).")
        if len({len(row) for row in f}) != 1:
            raise UserError("vc.factors: every step must have the same number of channel factors.")

    def reset(self, unit_names, num_steps) -> None:
        super().reset(unit_names, num_steps)
        if len(self.factors) != num_steps:
            raise UserError(f"vc.factors has {len(self.factors)} steps but this run has {num_steps}; the plan was "
                            "calibrated for another step count.")
        self.k = torch.tensor(self.factors, dtype=torch.float32)

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        return {}

    def post_step(self, z: torch.Tensor, step: StepInfo) -> torch.Tensor:
        k = self.k[step.index]
        if k.numel() != z.shape[1]:
            raise UserError(f"vc.factors has {k.numel()} channels but the latent has {z.shape[1]}; the plan belongs "
                            "to another model.")
        k = k.to(z.device).view(1, -1, *([1] * (z.dim() - 2)))
        mu = z.mean(dim=tuple(range(2, z.dim())), keepdim=True)
        return mu + k * (z - mu)
