"""The one step executor: drives any :class:`~qc_compile.runtime.protocols.UnitRunner` through a denoising step.

It owns everything that is about *steps* rather than about a backend: compute / reuse / prune per block unit,
residual caches, the sub-block caches (``UnitDecision.parts``: PAB, FORA), in-step gates (``Action.GATED``:
TeaCache, First-Block Cache, DBCache), and the per-unit statistics (one row per unit, on the device, copied to the
host by the sampler once per step). The runner only runs units.

What runs where:

* ``parts``: the block is run sub-block by sub-block through ``runner.block_steps`` (self-attention, cross-attention,
  MLP); the listed sub-blocks come from the cache filled at the unit's last sub-block-wise run. The cache keeps the
  attention and MLP outputs *before* their adaLN gate together with the gate used, so a reuse applies either the
  gate of the step that computed them (``regate=False``: PAB) or the current step's gate (``regate=True``: FORA).
* gates: ``"modulated_input"`` probes the first block's adaLN-modulated input right after ``embed``;
  ``"residual"`` the residual from the stack input to the first gated unit. One scalar device-to-host copy, as in
  the original methods.
* the ``action`` statistic records what was actually done, written device-to-device (a Python scalar assigned into
  a CUDA tensor would be a host-to-device copy and synchronise inside the step).
* the statistics level (``stats``: full / cache / none) follows the policy by default (its ``reads_stats``, set by
  the sampler through :meth:`StepExecutor.use_policy`): policy none computes no statistics and keeps no residuals;
  a reuse asked for under ``"none"`` raises rather than reuse nothing.
* statistics are kept as partial sums (:mod:`~qc_compile.runtime.step_stats`) and turned into ratios at the end of
  the step, after the runner's :class:`~qc_compile.runtime.protocols.StatsReducer` (if it has one) combined them
  over the processes that share the video (:mod:`qc_compile.runtime.parallel`: one collective per step, on the
  device); the gate probes' sums are combined the same way before the gate decides. So every process takes the
  same decisions, from statistics of the whole video.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from qc_compile.models.units import block_units
from qc_compile.runtime.policy import COMPUTE, SUB_BLOCKS, Action, UnitDecision, action_code_tensor
from qc_compile.runtime.protocols import BlockSteps, Conditioning, StatsReducer, UnitRunner
from qc_compile.runtime.step_stats import LOCAL, P, STATS_IMPLS, STATS_LEVELS, finish, new_partials


def _put(slot: torch.Tensor, val: torch.Tensor | float) -> None:
    """Write a statistic without a host synchronisation (``t[i] = python_float`` copies from the host)."""
    if torch.is_tensor(val):
        slot.copy_(val)
    else:
        slot.fill_(val)


class StepExecutor:
    """``StepExecutor(runner, geometry)``: the sampler's :class:`~qc_compile.runtime.protocols.Executor`."""

    def __init__(self, runner: UnitRunner, geometry, *, stats: str | None = None,
                 reducer: StatsReducer | None = None) -> None:
        """``stats``: the statistics level (:data:`~qc_compile.runtime.step_stats.STATS_LEVELS`); ``None`` (the
        default) follows the policy the sampler runs (its ``reads_stats``; ``"full"`` until one is set), an explicit
        level wins over the policy."""
        if stats is not None and stats not in STATS_LEVELS:
            raise ValueError(f"stats must be one of {', '.join(STATS_LEVELS)}, got {stats!r}")
        self.runner = runner
        self.g = geometry
        self.unit_names = tuple(runner.unit_names)
        self.block_units = block_units(self.unit_names)
        self.supports = frozenset(runner.supports)
        self.stats_requested = stats
        self.stats_level = stats or "full"
        self._policy_name = "the policy"
        self._unit_stats = STATS_IMPLS[runner.stats]
        self._prefix = int(getattr(geometry, "prefix_tokens", 0))  # tokens before the video tokens (CogVideoX)
        self.reducer: StatsReducer = reducer or getattr(runner, "reducer", None) or LOCAL
        self.residuals: dict[str, torch.Tensor] = {}
        self.extrapolation = 0.0  # > 0: a reuse extrapolates from the unit's last two residuals (the policy's)
        self._older: dict[str, tuple[int, torch.Tensor]] = {}  # unit -> (step, residual) before the cached one
        self._computed_at: dict[str, int] = {}  # unit -> step index of the cached residual
        self.step_index = 0  # the step being run: counts model evaluations since reset(); a caller may set it
        self.parts: dict[str, dict[str, tuple]] = {}  # unit -> sub-block -> (last output, gate used)
        self._prev_z: torch.Tensor | None = None
        self._prev_mod: torch.Tensor | None = None
        self._gate_ref: torch.Tensor | None = None

    def reset(self) -> None:
        self.residuals.clear()
        self.parts.clear()
        self._older.clear()
        self._computed_at.clear()
        self.step_index = 0
        if hasattr(self.runner, "reset"):  # runners that carry values between calls (TrtRunner: cached_residual)
            self.runner.reset()
        self._prev_z = self._prev_mod = self._gate_ref = None

    def use_policy(self, policy) -> None:
        """Called by the sampler before a run: the level follows what ``policy`` reads unless one was asked for."""
        self._policy_name = f"policy {getattr(policy, 'name', type(policy).__name__)!r}"
        if self.stats_requested is None:
            level = getattr(policy, "reads_stats", "full")
            if level not in STATS_LEVELS:
                raise ValueError(f"{self._policy_name} declares reads_stats={level!r}; expected one of "
                                 f"{', '.join(STATS_LEVELS)}")
            self.stats_level = level
        self.extrapolation = float(getattr(policy, "extrapolation", 0.0))

    def describe(self) -> dict:
        return dict(self.runner.describe(), stats=self.stats_level)

    # ----------------------------------------------------------------------------------------------- helpers
    def _rel_l1(self, cur: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor | float:
        """‖cur - ref‖₁ / ‖ref‖₁ over the whole video (the sums combined over processes); inf without a ref."""
        if ref is None or ref.shape != cur.shape:
            return math.inf
        sums = self.reducer.sums(torch.stack([(cur.float() - ref.float()).abs().sum(), ref.float().abs().sum()]))
        return sums[0] / sums[1].clamp_min(1e-12)

    def _run_parts(self, steps: BlockSteps, name: str, x: torch.Tensor, reuse: tuple[str, ...],
                   regate: bool) -> torch.Tensor:
        cache = self.parts.setdefault(name, {})
        missing = [p for p in reuse if p not in cache]
        if missing:
            raise RuntimeError(f"policy asked to reuse {missing} of {name} before they were ever computed")
        if "attn" not in reuse:
            cache["attn"] = (steps.self_attention(x), steps.gate_attn)
        out, gate = cache["attn"]
        x = x + (steps.gate_attn if regate else gate) * out
        if "cross" not in reuse:
            cache["cross"] = (steps.cross_attention(x), None)
        x = x + cache["cross"][0]
        if "mlp" not in reuse:
            cache["mlp"] = (steps.feed_forward(x), steps.gate_mlp)
        out, gate = cache["mlp"]
        return x + (steps.gate_mlp if regate else gate) * out

    def _reused(self, name: str) -> torch.Tensor:
        """The residual a reuse adds: the cached one, or (``extrapolation`` g > 0, two computations seen) its linear
        extrapolation to this step, r1 + g·k·(r1 − r0) with k = steps since r1 / steps between r0 and r1."""
        r1 = self.residuals[name]
        older = self._older.get(name) if self.extrapolation else None
        if older is None:
            return r1
        s0, r0 = older
        k = self.extrapolation * (self.step_index - self._computed_at[name]) / max(self._computed_at[name] - s0, 1)
        return torch.lerp(r0, r1, 1.0 + k)

    def _no_cache(self, what: str) -> None:
        raise RuntimeError(f"{self._policy_name} {what}, but this executor runs with stats='none': no "
                           f"statistics are measured and no residuals are kept, so a reuse would be silently wrong. "
                           f"Declare what the policy reads (reads_stats = 'cache' or 'full') or build the "
                           f"StepExecutor with stats='cache' / 'full'.")

    def _check(self, name: str, d: UnitDecision) -> None:
        if d.parts is not None and "parts" not in self.supports:
            raise NotImplementedError(f"the {self.runner.backend} runner runs whole unit graphs: sub-block parts "
                                      f"({name}) need a runner with block sub-steps (torch)")
        if d.action is Action.GATED and "gate" not in self.supports:
            raise NotImplementedError(f"the {self.runner.backend} runner has no in-step gates ({name}); use torch")

    # ----------------------------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, z: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
             decisions: Mapping[str, UnitDecision]) -> tuple[torch.Tensor, torch.Tensor]:
        """One model evaluation. Returns the velocity and a (units, len(STAT_NAMES)) stats tensor on the device."""
        run = self.runner
        stats = new_partials(len(self.unit_names), z.device)
        codes = action_code_tensor(z.device)
        emb = run.run_unit("embed", decisions.get("embed", COMPUTE).variant,
                           {"x": z, "timestep": timestep, "y": cond.y, "mask": cond.mask, "fps": cond.fps})
        ctx = {"mask": cond.mask, **emb}  # a sharding runner's embed returns its own batch's mask
        if getattr(cond, "caption_cut", None) is not None:
            ctx["caption_cut"] = cond.caption_cut  # host-side facts about the mask (runners may use them)
        h = h0 = emb["x"]
        measure = self.stats_level != "none"
        if measure:
            zf = z.float()  # the whole latent, on every process
            if self._prev_z is not None and self._prev_z.shape == zf.shape:
                stats[0, P["latent_l1_diff"]] = (zf - self._prev_z).abs().sum()
                stats[0, P["latent_l1_prev"]] = self._prev_z.abs().sum()
            self._prev_z = zf
        gates = {id(d.gate): d.gate for d in decisions.values() if d.action is Action.GATED}
        if len(gates) > 1 or (gates and None in gates.values()):
            raise RuntimeError("GATED decisions of one step must share one Gate")
        gate = next(iter(gates.values()), None)
        gate_open: bool | None = None
        if gate is not None:
            self._check(self.block_units[0], UnitDecision(Action.GATED, gate=gate))
            if not measure:
                self._no_cache("asked for gated (in-step) reuse")
        if gate is not None and gate.probe == "modulated_input":
            mod = run.block_steps(self.block_units[0], "default", ctx).attention_input(h)
            val = self._rel_l1(mod, self._prev_mod)
            self._prev_mod = mod
            _put(stats[0, P["gate_rel_l1"]], val)
            _put(stats[1, P["mod_rel_l1"]], val)
            gate_open = bool(gate.opens(float(val)))
        elif gate is not None and gate.probe != "residual":
            raise RuntimeError(f"unknown gate probe {gate.probe!r}")
        run.begin_step(h, ctx)
        has_prev = False
        for i, name in enumerate(self.block_units, start=1):
            d = decisions.get(name, COMPUTE)
            self._check(name, d)
            action = d.action
            row = stats[i]
            if action is Action.GATED:
                if gate_open is None:  # residual probe, at the first gated unit
                    probe = h - h0
                    val = self._rel_l1(probe, self._gate_ref)
                    _put(stats[0, P["gate_rel_l1"]], val)
                    gate_open = bool(gate.opens(float(val)))
                    if not gate_open:
                        self._gate_ref = probe
                action = Action.REUSE if gate_open and name in self.residuals else Action.COMPUTE
            if action is Action.PRUNE:
                row[P["action"]] = codes["prune"]
                continue
            if action is Action.REUSE:
                if not measure:
                    self._no_cache(f"asked to reuse {name}")
                if name not in self.residuals:
                    raise RuntimeError(f"policy asked to reuse {name} before it was ever computed")
                h = h + self._reused(name)
                has_prev = True
                row[P["action"]] = codes["reuse"]
                continue
            if d.parts is None:
                out = run.run_unit(name, d.variant, {**ctx, "x": h})["x"]
            else:
                out = self._run_parts(run.block_steps(name, d.variant, ctx), name, h, tuple(d.parts), d.regate)
            if d.parts and set(d.parts) >= set(SUB_BLOCKS):  # nothing heavy ran: a reuse of the sub-block caches
                row[P["action"]] = codes["reuse"]
                h, has_prev = out, True
                continue
            row[P["action"]] = codes["partial" if d.parts else "compute"]
            if not measure:  # nothing reads statistics or the residual: no reductions, no cached copy
                h, has_prev = out, True
                continue
            cached = self.residuals.get(name)
            if self.extrapolation and cached is not None:
                self._older[name] = (self._computed_at[name], cached)
            self.residuals[name] = self._unit_stats(row, h, out, cached, has_prev, self.g.T,
                                                    self.stats_level, self._prefix)
            self._computed_at[name] = self.step_index
            h, has_prev = out, True
        v = run.run_unit("final", decisions.get("final", COMPUTE).variant, {**ctx, "x": h})["v"]
        self.step_index += 1
        return v.to(z.device), finish(self.reducer.partials(stats))
