"""Unit executors: run the model unit by unit under per-unit decisions and compute step statistics on the device."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from qc_compile.models.layers import t2i_modulate
from qc_compile.models.stdit3 import STDiT3, Geometry, unit_kind
from qc_compile.runtime.policy import (ACTION_CODES, COMPUTE, STAT_INDEX, STAT_NAMES, SUB_BLOCKS, Action,
                                      UnitDecision)

_ACTION_ORDER = {k: i for i, k in enumerate(ACTION_CODES)}


@dataclass
class Conditioning:
    """Everything a step needs besides the latent and the timestep, already in CFG layout (batch 2n)."""

    y: torch.Tensor  # (2n, 1, L, Cy) caption features: [cond; null]
    mask: torch.Tensor  # (2n, L) bool
    fps: torch.Tensor  # (2n,)


class TorchExecutor:
    """Runs units with torch on any device; keeps each block unit's last residual for REUSE decisions.

    Beyond plain compute / reuse / prune it supports what the step policies need (``runtime/policies``):

    * ``UnitDecision.parts``: run a block sub-block by sub-block (self-attention, cross-attention, MLP, each with its
      gate applied), taking the listed sub-blocks' outputs from the cache filled at the unit's last sub-block-wise run
      (PAB, FORA). ``parts=()`` computes everything and fills that cache.
    * ``Action.GATED`` with a :class:`~qc_compile.runtime.policy.Gate`: the compute-or-reuse test is evaluated inside
      the step (TeaCache, First-Block Cache, DBCache), at the cost of one scalar device-to-host copy.
    * ``variant_models``: optional ``{variant: STDiT3}`` whose blocks run a unit when its decision names that variant
      (e.g. a fake-quantized copy); variants not listed run on ``model``. The plain FP executor ignores variants.

    All statistics stay on the device until the sampler's one copy per step (apart from a gate's scalar).
    """

    supports = frozenset({"parts", "gate"})

    def __init__(self, model: STDiT3, geometry: Geometry,
                 variant_models: Mapping[str, STDiT3] | None = None) -> None:
        self.model = model
        self.g = geometry
        self.unit_names = tuple(model.unit_names())
        self.block_units = tuple(n for n in self.unit_names if unit_kind(n) == "block")
        self.variant_models = dict(variant_models or {})
        self.residuals: dict[str, torch.Tensor] = {}
        self.parts: dict[str, dict[str, torch.Tensor]] = {}  # unit -> sub-block -> last computed output
        self._prev_z: torch.Tensor | None = None
        self._prev_mod: torch.Tensor | None = None
        self._gate_ref: torch.Tensor | None = None
        self._codes: dict[torch.device, torch.Tensor] = {}

    def reset(self) -> None:
        self.residuals.clear()
        self.parts.clear()
        self._prev_z = self._prev_mod = self._gate_ref = None

    # ----------------------------------------------------------------------------------------------- helpers
    def _model_for(self, variant: str) -> STDiT3:
        return self.variant_models.get(variant, self.model)

    @staticmethod
    def _rel_l1(cur: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor | float:
        if ref is None or ref.shape != cur.shape:
            return math.inf
        return (cur.float() - ref.float()).abs().mean() / ref.float().abs().mean().clamp_min(1e-12)

    def _modulated_input(self, x: torch.Tensor, t_mlp: torch.Tensor) -> torch.Tensor:
        block = self.model.block(self.block_units[0])
        shift, scale = block.modulation(t_mlp)[:2]
        return t2i_modulate(block.norm1(x), shift, scale)

    def _run_parts(self, model: STDiT3, name: str, x: torch.Tensor, emb: dict, mask: torch.Tensor,
                   reuse: tuple[str, ...], regate: bool) -> torch.Tensor:
        """STDiT3Block.forward (no x_mask) split into its three sub-blocks; the ``reuse`` ones come from the cache.

        The cache keeps the self-attention and MLP outputs *before* their adaLN gate together with the gate used, so
        a reuse can apply either the gate of the step that computed them (``regate=False``: PAB's gated output) or
        the current step's gate (``regate=True``: FORA).
        """
        block, g = model.block(name), self.g
        cache = self.parts.setdefault(name, {})
        missing = [p for p in reuse if p not in cache]
        if missing:
            raise RuntimeError(f"policy asked to reuse {missing} of {name} before they were ever computed")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(emb["t_mlp"])
        if "attn" not in reuse:
            h = t2i_modulate(block.norm1(x), shift_msa, scale_msa)
            cache["attn"] = (block._self_attention(h, g.T, g.S), gate_msa)
        out, gate = cache["attn"]
        x = x + (gate_msa if regate else gate) * out
        if "cross" not in reuse:
            cache["cross"] = (block.cross_attn(x, emb["y"], mask), None)
        x = x + cache["cross"][0]
        if "mlp" not in reuse:
            cache["mlp"] = (block.mlp(t2i_modulate(block.norm2(x), shift_mlp, scale_mlp)), gate_mlp)
        out, gate = cache["mlp"]
        return x + (gate_mlp if regate else gate) * out

    # ------------------------------------------------------------------------------- hooks (FastExecutor overrides)
    def _begin_step(self, h: torch.Tensor, emb: dict, mask: torch.Tensor) -> None:
        """Called once per step after the embed unit (the fast path refreshes its CUDA-graph inputs here)."""

    def _run_block(self, model: STDiT3, variant: str, name: str, h: torch.Tensor, emb: dict,
                   mask: torch.Tensor) -> torch.Tensor:
        return model.run_unit(name, {"x": h, "t_mlp": emb["t_mlp"], "y": emb["y"], "mask": mask}, self.g)["x"]

    def _set_action(self, row: torch.Tensor, kind: str) -> None:
        """Record what ran, by a device-to-device copy: a Python scalar assigned into a CUDA tensor is a
        host-to-device copy, which would synchronise inside the step."""
        codes = self._codes.get(row.device)
        if codes is None:
            codes = self._codes[row.device] = torch.tensor(list(ACTION_CODES.values()), device=row.device)
        row[STAT_INDEX["action"]] = codes[_ACTION_ORDER[kind]]

    def _unit_stats(self, row: torch.Tensor, name: str, h: torch.Tensor, out: torch.Tensor, has_prev: bool) -> None:
        """Fill ``row`` for a computed unit and cache its residual. The previous unit's output is ``h``."""
        S, g = STAT_INDEX, self.g
        hf = h.float()
        res = (out - h).float()
        row[0] = hf.norm()
        row[1] = res.norm()
        cached = self.residuals.get(name)
        if cached is not None:
            row[2] = (res - cached.float()).abs().sum() / cached.float().abs().sum().clamp_min(1e-12)
        if has_prev:
            row[3] = torch.nn.functional.cosine_similarity(out.float().flatten(), hf.flatten(), dim=0)
        habs = hf.abs()
        res_l1 = res.abs().sum()
        row[S["in_out_rel_l1"]] = res_l1 / habs.sum().clamp_min(1e-12)
        row[S["in_outlier"]] = habs.max() / habs.mean().clamp_min(1e-12)
        if g.T > 1:
            r4 = res.view(res.shape[0], g.T, g.S, -1)
            row[S["motion"]] = (r4[:, 1:] - r4[:, :-1]).abs().sum() / res_l1.clamp_min(1e-12)
        self.residuals[name] = res.to(out.dtype)

    @torch.no_grad()
    def step(self, z: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
             decisions: Mapping[str, UnitDecision]) -> tuple[torch.Tensor, torch.Tensor]:
        """One model evaluation. Returns the velocity and a (units, len(STAT_NAMES)) stats tensor on the device."""
        m, g = self.model, self.g
        S = STAT_INDEX
        stats = torch.full((len(self.unit_names), len(STAT_NAMES)), float("nan"), device=z.device)
        emb = m.run_unit("embed", {"x": z, "timestep": timestep, "y": cond.y, "mask": cond.mask, "fps": cond.fps}, g)
        h = h0 = emb["x"]
        zf = z.float()
        if self._prev_z is not None and self._prev_z.shape == zf.shape:
            stats[0, S["latent_rel_l1"]] = ((zf - self._prev_z).abs().sum()
                                            / self._prev_z.abs().sum().clamp_min(1e-12))
        self._prev_z = zf
        gates = {id(d.gate): d.gate for d in decisions.values() if d.action is Action.GATED}
        if len(gates) > 1 or (gates and None in gates.values()):
            raise RuntimeError("GATED decisions of one step must share one Gate")
        gate = next(iter(gates.values()), None)
        gate_open: bool | None = None
        if gate is not None and gate.probe == "modulated_input":
            mod = self._modulated_input(h, emb["t_mlp"])
            val = self._rel_l1(mod, self._prev_mod)
            self._prev_mod = mod
            stats[0, S["gate_rel_l1"]] = val
            stats[1, S["mod_rel_l1"]] = val
            gate_open = bool(gate.opens(float(val)))
        elif gate is not None and gate.probe != "residual":
            raise RuntimeError(f"unknown gate probe {gate.probe!r}")
        self._begin_step(h, emb, cond.mask)
        has_prev = False
        for i, name in enumerate(self.block_units, start=1):
            d = decisions.get(name, COMPUTE)
            action = d.action
            row = stats[i]
            if action is Action.GATED:
                if gate_open is None:  # residual probe, at the first gated unit
                    probe = h - h0
                    val = self._rel_l1(probe, self._gate_ref)
                    stats[0, S["gate_rel_l1"]] = val
                    gate_open = bool(gate.opens(float(val)))
                    if not gate_open:
                        self._gate_ref = probe
                action = Action.REUSE if gate_open and name in self.residuals else Action.COMPUTE
            if action is Action.PRUNE:
                self._set_action(row, "prune")
                continue
            if action is Action.REUSE:
                if name not in self.residuals:
                    raise RuntimeError(f"policy asked to reuse {name} before it was ever computed")
                h = h + self.residuals[name]
                has_prev = True
                self._set_action(row, "reuse")
                continue
            model = self._model_for(d.variant)
            if d.parts is None:
                out = self._run_block(model, d.variant, name, h, emb, cond.mask)
            else:
                out = self._run_parts(model, name, h, emb, cond.mask, tuple(d.parts), d.regate)
            if d.parts and set(d.parts) >= set(SUB_BLOCKS):  # nothing heavy ran: a reuse of the sub-block caches
                self._set_action(row, "reuse")
                h, has_prev = out, True
                continue
            self._set_action(row, "partial" if d.parts else "compute")
            self._unit_stats(row, name, h, out, has_prev)
            h, has_prev = out, True
        v = m.run_unit("final", {"x": h, "t": emb["t"]}, g)["v"]
        return v, stats
