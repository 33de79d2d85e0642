"""Replay chosen calibration samples (prompt, step) through the model unit by unit.

Why: sensitivity, smoothing search and the predictor all need "the FP inputs of unit u at sample i" and "what
happens downstream if only layer l changes". A :class:`Replay` holds the samples as one CFG batch, the FP unit
inputs/outputs, and re-runs any unit (and everything after it) on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qc_compile.calib.collect import Captions, StatsStore
from qc_compile.models.units import block_units
from qc_compile.runtime.protocols import Conditioning


@dataclass
class Replay:
    model: object
    g: object
    units: list[str]
    z: torch.Tensor  # (n, C, T, H, W) latents before the step
    timestep: torch.Tensor  # (2n,)
    sigma: torch.Tensor  # (n,) t / 1000: x0 = z + sigma * v
    cond: Conditioning
    cfg: float
    emb: dict  # embed outputs
    block_in: dict  # unit -> input x
    final_in: torch.Tensor
    v: torch.Tensor  # (n, C, ...) CFG-combined velocity (FP)

    @classmethod
    def build(cls, loaded, g, store: StatsStore, captions: Captions, samples: Sequence[tuple[int, int]],
              cfg: float, fps: int) -> "Replay":
        dev = loaded.model.x_embedder.proj.weight.device
        n = len(samples)
        z = torch.stack([store.sample(p, s, "z_in") for p, s in samples]).to(dev)
        t = torch.tensor([store.timesteps[s] for _, s in samples], dtype=torch.float32, device=dev)
        cap = captions.take([p for p, _ in samples])
        cond = Conditioning(y=torch.cat([cap.y, cap.y_null]).to(dev), mask=torch.cat([cap.mask, cap.mask]).to(dev),
                            fps=torch.full((2 * n,), float(fps), device=dev))
        r = cls(loaded.model, g, list(loaded.model.unit_names()), z, torch.cat([t, t]), t / 1000.0, cond, cfg,
                {}, {}, None, None)
        with torch.no_grad():
            r.emb, r.block_in, r.final_in, r.v = r.forward()
        return r

    def _cfg(self, v: torch.Tensor) -> torch.Tensor:
        v = v[:, : self.z.shape[1]].float()
        vc, vu = v.chunk(2)
        return vu + self.cfg * (vc - vu)

    def forward(self, model=None, start: str = "embed", h: torch.Tensor | None = None):
        """Run from unit ``start`` (its input ``h``; default the FP input) to the end. Returns (emb, block inputs,
        final input, CFG velocity)."""
        m = model or self.model
        g = self.g
        if start == "embed":
            emb = m.run_unit("embed", {"x": torch.cat([self.z, self.z]), "timestep": self.timestep,
                                       "y": self.cond.y, "mask": self.cond.mask, "fps": self.cond.fps}, g)
            h = emb["x"]
            blocks = list(block_units(self.units))
        else:
            emb = self.emb
            blocks = [] if start == "final" else self.units[self.units.index(start):-1]
            if h is None:
                h = self.final_in if start == "final" else self.block_in[start]
        ins = {}
        for u in blocks:
            ins[u] = h
            h = m.run_unit(u, {"x": h, "t_mlp": emb["t_mlp"], "y": emb["y"], "mask": self.cond.mask}, g)["x"]
        v = m.run_unit("final", {"x": h, "t": emb["t"]}, g)["v"]
        return emb, ins, h, self._cfg(v)

    def unit_output(self, unit: str, model=None) -> torch.Tensor:
        """The output of one unit on its FP input (embed: its x output)."""
        m = model or self.model
        if unit == "embed":
            return m.run_unit("embed", {"x": torch.cat([self.z, self.z]), "timestep": self.timestep,
                                        "y": self.cond.y, "mask": self.cond.mask, "fps": self.cond.fps}, self.g)["x"]
        if unit == "final":
            return m.run_unit("final", {"x": self.final_in, "t": self.emb["t"]}, self.g)["v"]
        return m.run_unit(unit, {"x": self.block_in[unit], "t_mlp": self.emb["t_mlp"], "y": self.emb["y"],
                                 "mask": self.cond.mask}, self.g)["x"]

    def x0_error(self, v: torch.Tensor) -> float:
        """Relative L2 error of the x0 prediction (x0 = z + sigma v) against FP: the perceptual proxy."""
        s = self.sigma.view(-1, *([1] * (self.z.dim() - 1)))
        x0 = self.z + s * self.v
        return float((s * (v - self.v)).norm() / x0.norm().clamp_min(1e-12))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
