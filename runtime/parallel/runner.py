"""A unit runner that runs one video over a :class:`~.mesh.Mesh`: CFG halves and token shards around an inner runner.

``ShardedRunner(inner, geometry, mesh)`` satisfies :class:`~qc_compile.runtime.protocols.UnitRunner`, so the step
executor, its caches, gates and statistics and the policies stay as they are; what they see is this rank's part:

* ``embed`` runs the inner embed on this rank's CFG half (cond or null) and keeps the S-layout token shard
  (:mod:`.layout`); its outputs carry the half's caption ``mask``;
* temporal blocks run the inner block on the shard (``TokenGrid(T, S_r)``); spatial blocks switch to the T-layout
  (one all-to-all), run on ``TokenGrid(T_r, S)`` and switch back; token-wise sub-steps (cross-attention, MLP, the
  adaLN-modulated input a gate probes) run on the shard as they are;
* ``final`` gathers the shards (all_gather over the sequence group), runs the inner final and gathers the two CFG
  halves of the velocity, so every rank returns the whole ``v`` and samples the same latent;
* :attr:`reducer` combines the step's statistics over every rank (one all_gather of the partials per step, on the
  device; see :mod:`~qc_compile.runtime.step_stats`), so every rank takes the same decisions. Caches stay shards.

The inner runner must offer ``"shards"`` (run blocks on a ``geometry=`` token grid): torch and torch-fast do; the
ONNX / TensorRT runners run graphs built for the whole video.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist

from qc_compile.errors import UserError
from qc_compile.models.units import is_block
from qc_compile.runtime.parallel import layout as L
from qc_compile.runtime.parallel.mesh import Mesh
from qc_compile.runtime.step_stats import combine


class GroupReducer:
    """:class:`~qc_compile.runtime.protocols.StatsReducer` over every rank of the mesh: all_gather, then combine in
    rank order (the same bits on every rank)."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.mesh.world_size)]
        with self.mesh.timer.span():
            dist.all_gather(out, t)
        return torch.stack(out)

    def partials(self, p: torch.Tensor) -> torch.Tensor:
        return combine(self._gather(p))

    def sums(self, t: torch.Tensor) -> torch.Tensor:
        g = self._gather(t)
        total = g[0]
        for r in range(1, g.shape[0]):
            total = total + g[r]
        return total


class _SpatialSteps:
    """Block sub-steps of a spatial unit on an S-layout shard: self-attention in the T-layout, the rest in place."""

    def __init__(self, steps: Any, runner: "ShardedRunner") -> None:
        self.steps, self.r = steps, runner

    @property
    def gate_attn(self) -> torch.Tensor:
        return self.steps.gate_attn

    @property
    def gate_mlp(self) -> torch.Tensor:
        return self.steps.gate_mlp

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps.attention_input(x)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.r.to_s(self.steps.self_attention(self.r.to_t(x)))

    def cross_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps.cross_attention(x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps.feed_forward(x)


class ShardedRunner:
    def __init__(self, inner: Any, geometry: Any, mesh: Mesh) -> None:
        if "shards" not in inner.supports:
            raise UserError(f"--gpus: the {inner.backend} executor runs graphs built for the whole video and cannot "
                            "run a shard of it; run several GPUs with --executor torch or --fast (torch-fast).")
        self.inner, self.g, self.mesh = inner, geometry, mesh
        self.backend = inner.backend
        self.unit_names = tuple(inner.unit_names)
        self.supports = frozenset(inner.supports)
        self.stats = inner.stats
        self.reducer = GroupReducer(mesh)
        P, r = mesh.config.sp_size, mesh.sp_rank
        odd = [u for u in self.unit_names if is_block(u) and not u.startswith(("spatial_", "temporal_"))]
        if P > 1 and odd:
            raise UserError(f"sequence parallelism splits STDiT3's spatial/temporal blocks; this model's block units "
                            f"({odd[0]}, ...) attend over the whole video. Use CFG parallel (--gpus 2 --parallel cfg).")
        self.grid_s = L.TokenGrid(geometry.T, L.split_sizes(geometry.S, P)[r])  # temporal blocks, the executor
        self.grid_t = L.TokenGrid(L.split_sizes(geometry.T, P)[r], geometry.S)  # spatial blocks
        self._batch: int | None = None

    # ----------------------------------------------------------------------------------------- layouts
    def _sp(self) -> tuple:
        m = self.mesh
        return m.sp_group, m.sp_rank, m.config.sp_size, m.timer

    def to_t(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mesh.config.sp_size == 1 else L.s_to_t(x, self.g.T, self.g.S, *self._sp())

    def to_s(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mesh.config.sp_size == 1 else L.t_to_s(x, self.g.T, self.g.S, *self._sp())

    def _half(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's CFG half of every batch-first input (batch [cond; null])."""
        m = self.mesh
        if not m.config.cfg_parallel:
            return dict(inputs)
        B = inputs["x"].shape[0]
        if B % 2:
            raise RuntimeError(f"CFG parallel needs the [cond; null] batch (even), got batch {B}")
        n = B // 2
        return {k: (v.narrow(0, m.cfg_rank * n, n) if torch.is_tensor(v) and v.dim() and v.shape[0] == B else v)
                for k, v in inputs.items()}

    # ----------------------------------------------------------------------------------------- protocol
    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor],
                 geometry: Any = None) -> dict[str, torch.Tensor]:
        m, g = self.mesh, self.g
        if unit == "embed":
            half = self._half(inputs)
            out = self.inner.run_unit(unit, variant, half)
            P = m.config.sp_size
            x = out["x"] if P == 1 else L.shard_s(out["x"], g.T, g.S, m.sp_rank, P)
            return {**out, "x": x, "mask": half["mask"]}
        if unit == "final":
            x = inputs["x"]
            if m.config.sp_size > 1:
                x = L.gather_s(x, g.T, g.S, *self._sp())
            v = self.inner.run_unit(unit, variant, {**inputs, "x": x})["v"]
            if m.config.cfg_parallel:
                n = v.shape[0]
                v = torch.cat(L.all_gather_padded(v, 0, [n, n], m.cfg_group, m.timer), dim=0)
            return {"v": v}
        if not is_block(unit):
            raise KeyError(f"no unit {unit!r}")
        if m.config.sp_size == 1:  # CFG parallel only: whole tokens of one half, any model family
            return self.inner.run_unit(unit, variant, inputs)
        if unit.startswith("spatial_"):
            out = self.inner.run_unit(unit, variant, {**inputs, "x": self.to_t(inputs["x"])}, geometry=self.grid_t)
            return {"x": self.to_s(out["x"])}
        return self.inner.run_unit(unit, variant, inputs, geometry=self.grid_s)

    def block_steps(self, unit: str, variant: str, ctx: Mapping[str, torch.Tensor], geometry: Any = None):
        if self.mesh.config.sp_size == 1:
            return self.inner.block_steps(unit, variant, ctx)
        if unit.startswith("spatial_"):
            return _SpatialSteps(self.inner.block_steps(unit, variant, ctx, geometry=self.grid_t), self)
        return self.inner.block_steps(unit, variant, ctx, geometry=self.grid_s)

    def begin_step(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        self.inner.begin_step(h, ctx)

    def describe(self) -> dict:
        return dict(self.inner.describe(), parallel=self.mesh.describe())


def shard_runner(runner: Any, geometry: Any, mesh: Mesh | None = None) -> Any:
    """``runner`` wrapped for the current mesh (:func:`~.mesh.current_mesh`), or itself in a single-process run."""
    from qc_compile.runtime.parallel.mesh import current_mesh

    mesh = mesh or current_mesh()
    if mesh is None or mesh.world_size == 1:
        return runner
    return ShardedRunner(runner, geometry, mesh)
