"""One model evaluation of any unit-protocol model under per-unit decisions: the step driver behind
``qc_compile.enable`` until the shared step executor takes over.

:func:`run_step` is the whole driver and deliberately one function: it takes a model that follows the unit protocol
(``unit_names`` / ``unit_kind`` / ``run_unit`` and the sub-block hooks, see
:mod:`qc_compile.models.diffusers_adapter.base`), runs ``embed``, every block unit as its decision says (compute,
REUSE of the residual cached at the unit's last computation, PRUNE = identity, sub-block ``parts`` from the cache,
GATED with an in-step probe) and ``final``, and returns the output with the statistics tensor
(:data:`~qc_compile.runtime.policy.STAT_NAMES`) that policies observe. It mirrors ``TorchExecutor.step``; at merge
the shared step executor replaces it behind the same call.

A :class:`BranchCache` holds what one *branch* of a step needs from earlier steps (residuals, sub-block outputs,
the previous latent, the gate references). Pipelines that run classifier-free guidance as two calls per step
(Wan: ``cond`` then ``uncond``) keep one cache per branch; batched CFG (CogVideoX) has one branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from qc_compile.runtime.policy import ACTION_CODES, COMPUTE, STAT_INDEX, STAT_NAMES, Action, UnitDecision


@dataclass
class BranchCache:
    residuals: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = field(default_factory=dict)
    prev_z: torch.Tensor | None = None
    prev_mod: torch.Tensor | None = None
    gate_ref: torch.Tensor | None = None


def _rel_l1(cur: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor | float:
    if ref is None or ref.shape != cur.shape:
        return math.inf
    return (cur.float() - ref.float()).abs().mean() / ref.float().abs().mean().clamp_min(1e-12)


_CODES: dict[torch.device, torch.Tensor] = {}
_CODE_INDEX = {k: i for i, k in enumerate(ACTION_CODES)}


def _set_action(row: torch.Tensor, kind: str) -> None:
    """Record what ran by a device-to-device copy (a Python scalar into a CUDA tensor would synchronise)."""
    codes = _CODES.get(row.device)
    if codes is None:
        codes = _CODES[row.device] = torch.tensor(list(ACTION_CODES.values()), device=row.device)
    row[STAT_INDEX["action"]] = codes[_CODE_INDEX[kind]]


def _unit_stats(row: torch.Tensor, cache: BranchCache, name: str, h: torch.Tensor, out: torch.Tensor,
                has_prev: bool, g: Any) -> None:
    """Fill ``row`` for a computed unit and cache its residual (same statistics as ``TorchExecutor``; the motion
    term is taken over the video tokens only)."""
    S = STAT_INDEX
    hf = h.float()
    res = (out - h).float()
    row[S["in_norm"]] = hf.norm()
    row[S["res_norm"]] = res.norm()
    cached = cache.residuals.get(name)
    if cached is not None:
        row[S["res_rel_l1"]] = (res - cached.float()).abs().sum() / cached.float().abs().sum().clamp_min(1e-12)
    if has_prev:
        row[S["cos_prev"]] = torch.nn.functional.cosine_similarity(out.float().flatten(), hf.flatten(), dim=0)
    habs = hf.abs()
    res_l1 = res.abs().sum()
    row[S["in_out_rel_l1"]] = res_l1 / habs.sum().clamp_min(1e-12)
    row[S["in_outlier"]] = habs.max() / habs.mean().clamp_min(1e-12)
    if g.T > 1:
        rv = g.video_tokens(res)
        r4 = rv.reshape(rv.shape[0], g.T, g.S, -1)
        row[S["motion"]] = (r4[:, 1:] - r4[:, :-1]).abs().sum() / rv.abs().sum().clamp_min(1e-12)
    cache.residuals[name] = res.to(out.dtype)


def _run_parts(model: Any, name: str, x: torch.Tensor, ctx: dict, cache: BranchCache, reuse: tuple[str, ...],
               regate: bool) -> torch.Tensor:
    """A block from its sub-block hooks; the ``reuse`` sub-blocks come from the cache filled at the unit's last
    sub-block-wise run. Self-attention / MLP are cached un-gated with the gate they had, so a reuse applies either
    that gate (PAB) or the current one (``regate``, FORA)."""
    store = cache.parts.setdefault(name, {})
    reuse = tuple(p for p in reuse if p in model.sub_blocks)
    missing = [p for p in reuse if p not in store]
    if missing:
        raise RuntimeError(f"policy asked to reuse {missing} of {name} before they were ever computed")
    mods = model.block_modulation(name, ctx)
    if "attn" not in reuse:
        store["attn"] = model.block_self_attention(name, x, mods, ctx)
    out, gate = store["attn"]
    x = model.add_gated(x, out, mods["gate_msa"] if regate else gate)
    if "cross" in model.sub_blocks:
        if "cross" not in reuse:
            store["cross"] = (model.block_cross_attention(name, x, ctx), None)
        x = x + store["cross"][0]
    if "mlp" not in reuse:
        store["mlp"] = model.block_mlp(name, x, mods, ctx)
    out, gate = store["mlp"]
    return model.add_gated(x, out, mods["gate_mlp"] if regate else gate)


@torch.no_grad()
def run_step(model: Any, g: Any, inputs: dict[str, torch.Tensor], decisions: Mapping[str, UnitDecision],
             cache: BranchCache, gate_open: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, bool | None]:
    """One model evaluation. Returns ``(v, stats, gate_open)``: the final unit's ``v``, a (units, len(STAT_NAMES))
    statistics tensor on the device (NaN where not measured), and the outcome of a GATED decision's gate (pass it
    back for the other branches of the same step so that every branch takes the same decision).

    Decisions name precision variants too; this driver runs the model as given (the variant is only recorded).
    """
    S = STAT_INDEX
    names = list(model.unit_names())
    blocks = [n for n in names if model.unit_kind(n) == "block"]
    z = inputs["x"]
    stats = torch.full((len(names), len(STAT_NAMES)), float("nan"), device=z.device)
    ctx = model.run_unit("embed", inputs, g)
    h = h0 = ctx["x"]
    zf = z.float()
    if cache.prev_z is not None and cache.prev_z.shape == zf.shape:
        stats[0, S["latent_rel_l1"]] = (zf - cache.prev_z).abs().sum() / cache.prev_z.abs().sum().clamp_min(1e-12)
    cache.prev_z = zf
    gates = {id(d.gate): d.gate for d in decisions.values() if d.action is Action.GATED}
    if len(gates) > 1 or (gates and None in gates.values()):
        raise RuntimeError("GATED decisions of one step must share one Gate")
    gate = next(iter(gates.values()), None)
    if gate is not None and gate.probe == "modulated_input":
        mod = model.block_modulated_input(blocks[0], h, ctx)
        val = _rel_l1(mod, cache.prev_mod)
        cache.prev_mod = mod
        stats[0, S["gate_rel_l1"]] = val
        stats[1, S["mod_rel_l1"]] = val
        if gate_open is None:
            gate_open = bool(gate.opens(float(val)))
    elif gate is not None and gate.probe != "residual":
        raise RuntimeError(f"unknown gate probe {gate.probe!r}")
    probed = False
    has_prev = False
    for i, name in enumerate(blocks, start=1):
        d = decisions.get(name, COMPUTE)
        action = d.action
        row = stats[i]
        if action is Action.GATED:
            if gate.probe == "residual" and not probed:  # at the first gated unit
                probed = True
                probe = h - h0
                val = _rel_l1(probe, cache.gate_ref)
                stats[0, S["gate_rel_l1"]] = val
                if gate_open is None:
                    gate_open = bool(gate.opens(float(val)))
                if not gate_open:
                    cache.gate_ref = probe
            action = Action.REUSE if gate_open and name in cache.residuals else Action.COMPUTE
        if action is Action.PRUNE:
            _set_action(row, "prune")
            continue
        if action is Action.REUSE:
            if name not in cache.residuals:
                raise RuntimeError(f"policy asked to reuse {name} before it was ever computed")
            h = h + cache.residuals[name]
            has_prev = True
            _set_action(row, "reuse")
            continue
        bctx = {**ctx, "x": h}
        if d.parts is None:
            out = model.run_unit(name, bctx, g)["x"]
        else:
            out = _run_parts(model, name, h, bctx, cache, tuple(d.parts), d.regate)
        if d.parts and set(d.parts) >= set(model.sub_blocks):  # nothing heavy ran: a reuse of the sub-block caches
            _set_action(row, "reuse")
            h, has_prev = out, True
            continue
        _set_action(row, "partial" if d.parts else "compute")
        _unit_stats(row, cache, name, h, out, has_prev, g)
        h, has_prev = out, True
    v = model.run_unit("final", {**ctx, "x": h}, g)["v"]
    return v, stats, gate_open
