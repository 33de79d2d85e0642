"""The two written contracts of the runtime (polygraphy's layering: loaders -> runners -> the step executor).

* :class:`UnitRunner` — one backend (torch, torch-fast, onnxruntime, tensorrt): runs one unit in one precision
  variant on named inputs, on the runner's device and stream. Built by the backend's loader
  (:mod:`qc_compile.runtime.runners`). Knows nothing about steps, caches or policies.
* :class:`Executor` — what the sampler drives: one model evaluation per step under per-unit decisions, returning the
  velocity and the statistics tensor (on the device). :class:`~qc_compile.runtime.step_executor.StepExecutor` is the
  one implementation, over any runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from qc_compile.runtime.policy import UnitDecision


@dataclass
class Conditioning:
    """Everything a step needs besides the latent and the timestep, already in CFG layout (batch 2n)."""

    y: torch.Tensor  # (2n, 1, L, Cy) caption features: [cond; null]
    mask: torch.Tensor  # (2n, L) bool
    fps: torch.Tensor  # (2n,)
    caption_cut: tuple[int, bool] | None = None
    """(caption tokens up to the last one any sample keeps, whether all of those are kept in every sample), read
    from the mask while it is still on the host (:func:`caption_cut`), so a runner can drop padded caption keys
    without a device-to-host read; None: not known."""


def caption_cut(mask: torch.Tensor) -> tuple[int, bool]:
    """:attr:`Conditioning.caption_cut` of a ``(B, L)`` mask (call it on a host tensor: it reads the values)."""
    keep = mask.bool()
    cols = keep.any(0)
    n = int(cols.nonzero().max()) + 1 if bool(cols.any()) else keep.shape[1]
    return n, bool(keep[:, :n].all())


@runtime_checkable
class BlockSteps(Protocol):
    """One block's sub-steps for one step (``model.block_steps(name, ctx, geometry)``): the attention and
    feed-forward parts return their output before the gate; composing ``x + gate_attn * self_attention(x)``,
    ``+ cross_attention``, ``+ gate_mlp * feed_forward`` is the block."""

    gate_attn: torch.Tensor
    gate_mlp: torch.Tensor

    def attention_input(self, x: torch.Tensor) -> torch.Tensor: ...

    def self_attention(self, x: torch.Tensor) -> torch.Tensor: ...

    def cross_attention(self, x: torch.Tensor) -> torch.Tensor: ...

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class UnitRunner(Protocol):
    """Runs units of one model on one backend.

    ``run_unit("embed", v, {x, timestep, y, mask, fps})`` returns the embed outputs (``x`` plus what blocks and
    ``final`` read); a block unit gets ``{**embed_outputs, "mask": ..., "x": h}`` and returns ``{"x": ...}``;
    ``final`` gets the same and returns ``{"v": ...}``. An unknown ``variant`` runs the default one.
    ``supports`` lists what the runner offers beyond whole units: ``"parts"`` (``block_steps``, sub-block caches),
    ``"gate"`` (in-step cache tests, which need ``block_steps`` of the first block) and ``"shards"`` (``run_unit`` /
    ``block_steps`` of a block take ``geometry=``, the token grid of a shard: :mod:`qc_compile.runtime.parallel`). ``stats`` names the
    statistics implementation the step executor uses with it (:data:`~qc_compile.runtime.step_stats.STATS_IMPLS`).
    """

    backend: str
    unit_names: tuple[str, ...]
    supports: frozenset[str]
    stats: str

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def block_steps(self, unit: str, variant: str, ctx: Mapping[str, torch.Tensor]) -> BlockSteps: ...

    def begin_step(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class StatsReducer(Protocol):
    """Combines what the processes sharing one video measured (:mod:`qc_compile.runtime.parallel`), on the device
    and without a host sync, so that every process decides from the statistics of the whole video. A runner whose
    units see a part of the video (a batch half, a token shard) carries one as ``runner.reducer``."""

    def partials(self, p: torch.Tensor) -> torch.Tensor:
        """The step's partials ``(units, K)`` of every process combined (:func:`..step_stats.combine`): one
        collective per step."""
        ...

    def sums(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (a gate probe's two sums)."""
        ...


@runtime_checkable
class Executor(Protocol):
    """What the sampler needs: the unit names, a reset between videos, and one evaluation per step."""

    unit_names: tuple[str, ...]

    def reset(self) -> None: ...

    def step(self, z: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
             decisions: Mapping[str, UnitDecision]) -> tuple[torch.Tensor, torch.Tensor]: ...
