"""Unit executors: run the model unit by unit under per-unit decisions and compute step statistics on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from qc_compile.models.stdit3 import STDiT3, Geometry, unit_kind
from qc_compile.runtime.policy import COMPUTE, STAT_NAMES, Action, UnitDecision


@dataclass
class Conditioning:
    """Everything a step needs besides the latent and the timestep, already in CFG layout (batch 2n)."""

    y: torch.Tensor  # (2n, 1, L, Cy) caption features: [cond; null]
    mask: torch.Tensor  # (2n, L) bool
    fps: torch.Tensor  # (2n,)


class TorchExecutor:
    """Runs units with torch on any device; keeps each block unit's last residual for REUSE decisions."""

    def __init__(self, model: STDiT3, geometry: Geometry) -> None:
        self.model = model
        self.g = geometry
        self.unit_names = tuple(model.unit_names())
        self.block_units = tuple(n for n in self.unit_names if unit_kind(n) == "block")
        self.residuals: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.residuals.clear()

    @torch.no_grad()
    def step(self, z: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
             decisions: Mapping[str, UnitDecision]) -> tuple[torch.Tensor, torch.Tensor]:
        """One model evaluation. Returns the velocity and a (units, len(STAT_NAMES)) stats tensor on the device."""
        m, g = self.model, self.g
        stats = torch.full((len(self.unit_names), len(STAT_NAMES)), float("nan"), device=z.device)
        emb = m.run_unit("embed", {"x": z, "timestep": timestep, "y": cond.y, "mask": cond.mask, "fps": cond.fps}, g)
        h, prev = emb["x"], None
        for i, name in enumerate(self.block_units, start=1):
            d = decisions.get(name, COMPUTE)
            if d.action is Action.PRUNE:
                continue
            if d.action is Action.REUSE:
                if name not in self.residuals:
                    raise RuntimeError(f"policy asked to reuse {name} before it was ever computed")
                h = prev = h + self.residuals[name]
                continue
            out = m.run_unit(name, {"x": h, "t_mlp": emb["t_mlp"], "y": emb["y"], "mask": cond.mask}, g)["x"]
            res = (out - h).float()
            row = stats[i]
            row[0] = h.float().norm()
            row[1] = res.norm()
            cached = self.residuals.get(name)
            if cached is not None:
                row[2] = (res - cached.float()).abs().sum() / cached.float().abs().sum().clamp_min(1e-12)
            if prev is not None:
                row[3] = torch.nn.functional.cosine_similarity(out.float().flatten(), prev.float().flatten(), dim=0)
            self.residuals[name] = res.to(out.dtype)
            h = prev = out
        v = m.run_unit("final", {"x": h, "t": emb["t"]}, g)["v"]
        return v, stats
