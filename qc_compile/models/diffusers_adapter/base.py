"""What every diffusers adapter shares: unit names and kinds, the block list, and the unit-by-unit forward.

The model-side protocol (the same one :class:`qc_compile.models.stdit3.STDiT3` follows):

* ``unit_names()`` -> ``["embed", "block_0", ..., "block_{L-1}", "final"]``; ``unit_kind(name)`` -> ``"embed" |
  "block" | "final"``;
* ``run_unit(name, inputs, geometry) -> dict``: ``embed`` takes the latent ``x``, ``timestep`` and text features
  ``y`` (plus family-specific optional inputs) and returns ``{"x": tokens, ...}`` with everything the blocks and
  ``final`` need; a block takes ``{**embed_outputs, "x": h}`` and returns ``{"x": new h}``; ``final`` takes
  ``{**embed_outputs, "x": h}`` and returns ``{"v": model output in the latent layout}``. Unknown input keys are
  ignored, so a step executor may pass one dict to every unit.
* sub-block hooks (for PAB / FORA style caches), with ``ctx`` = the embed outputs:
  ``block_modulation(name, ctx) -> mods``; ``block_self_attention(name, x, mods, ctx) -> (out, gate)``;
  ``block_cross_attention(name, x, ctx) -> out``; ``block_mlp(name, x, mods, ctx) -> (out, gate)``. Composition::

      mods = block_modulation(name, ctx)
      out, gate = block_self_attention(name, x, mods, ctx);  x = add_gated(x, out, gate)
      x = x + block_cross_attention(name, x, ctx)             # only if "cross" in sub_blocks
      out, gate = block_mlp(name, x, mods, ctx);              x = add_gated(x, out, gate)

  equals the block's own forward (:meth:`block_forward_parts` does exactly this and is tested against it).
  ``add_gated`` is the adapter's method: the same expression as the family's diffusers block (Wan adds in fp32 and
  casts back, CogVideoX in the model dtype), so the composition is exact in every dtype; in fp32 both are
  ``x + gate * out``. A reused output may be multiplied by the current step's gate (FORA) or its own (PAB).
* ``block_modulated_input(name, x, ctx)``: the adaLN-modulated input of a block's self-attention (TeaCache's probe).
* ``block_steps(name, ctx, geometry)``: the same hooks bound to one step, as the step executor's
  :class:`~qc_compile.runtime.protocols.BlockSteps` (what STDiT3 offers too).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch
from torch import nn

from qc_compile.models.units import unit_kind as _unit_kind

SUB_BLOCKS_ALL = ("attn", "cross", "mlp")


class AdapterBlockSteps:
    """The runtime's ``BlockSteps`` over an adapter's sub-block hooks, for one block and one step.

    The step executor composes ``x + gate_attn * self_attention(x)``, ``+ cross_attention(x)``,
    ``+ gate_mlp * feed_forward(x)`` in the model dtype, so the gates are given in ``x``'s dtype (Wan keeps them in
    fp32 and adds in fp32: with a bf16 model the sub-block path rounds the gate to bf16; fp32 is exact). A family
    without cross-attention (CogVideoX) returns a zero scalar for it.
    """

    def __init__(self, adapter: "DiffusersAdapter", name: str, ctx: dict[str, torch.Tensor]) -> None:
        self.adapter, self.name, self.ctx = adapter, name, ctx
        self.mods = adapter.block_modulation(name, ctx)
        dtype = ctx["x"].dtype
        self.gate_attn = self.mods["gate_msa"].to(dtype)
        self.gate_mlp = self.mods["gate_mlp"].to(dtype)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.block_modulated_input(self.name, x, self.ctx, self.mods)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.block_self_attention(self.name, x, self.mods, self.ctx)[0]

    def cross_attention(self, x: torch.Tensor) -> torch.Tensor:
        if "cross" not in self.adapter.sub_blocks:
            return x.new_zeros(())
        return self.adapter.block_cross_attention(self.name, x, self.ctx)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.block_mlp(self.name, x, self.mods, self.ctx)[0]


class DiffusersAdapter(nn.Module, ABC):
    """Base class (abstract: each family implements the marked parts): wraps a diffusers transformer (kept as ``self.transformer``, weights shared, never copied)."""

    family: str = ""
    sub_blocks: tuple[str, ...] = SUB_BLOCKS_ALL
    # VAE compression ratios of the family's pipelines (latent frames = (frames - 1) // t + 1, size // s)
    temporal_ratio: int = 4
    spatial_ratio: int = 8

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    # ------------------------------------------------------------------------------------------------- protocol
    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The family's transformer blocks, in execution order."""

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the blocks' linear layers (diffusers keeps some modules in fp32)."""
        return next(m.weight.dtype for m in self.blocks.modules() if isinstance(m, nn.Linear))

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def unit_names(self) -> list[str]:
        return ["embed"] + [f"block_{i}" for i in range(len(self.blocks))] + ["final"]

    @staticmethod
    def unit_kind(name: str) -> str:
        """'embed' | 'block' | 'final' for a unit name (the shared rule of :mod:`qc_compile.models.units`)."""
        return _unit_kind(name)

    def block(self, name: str) -> nn.Module:
        """The diffusers block module of block unit ``name``."""
        if not name.startswith("block_") or self.unit_kind(name) != "block" or int(name[6:]) >= len(self.blocks):
            raise KeyError(f"no block unit {name!r}")
        return self.blocks[int(name[6:])]

    def iter_units(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) of the block units in execution order."""
        for i, b in enumerate(self.blocks):
            yield f"block_{i}", b

    def run_unit(self, name: str, inputs: dict[str, torch.Tensor], geometry) -> dict[str, torch.Tensor]:
        kind = self.unit_kind(name)
        if kind == "embed":
            return self.embed(inputs, geometry)
        if kind == "final":
            return {"v": self.final(inputs, geometry)}
        return {"x": self.run_block(name, inputs, geometry)}

    def forward_units(self, inputs: dict[str, torch.Tensor], geometry) -> torch.Tensor:
        """The model's forward unit by unit: what a step executor runs when it computes everything."""
        ctx = self.run_unit("embed", inputs, geometry)
        h = ctx["x"]
        for name in self.unit_names()[1:-1]:
            h = self.run_unit(name, {**ctx, "x": h}, geometry)["x"]
        return self.run_unit("final", {**ctx, "x": h}, geometry)["v"]

    def block_steps(self, name: str, ctx: dict[str, torch.Tensor], g=None) -> AdapterBlockSteps:
        """Block ``name``'s sub-steps bound to this step's embed outputs ``ctx`` (the runtime's BlockSteps)."""
        return AdapterBlockSteps(self, name, ctx)

    @staticmethod
    def add_gated(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """x + gate·out in the model dtype (families that add in fp32 override this)."""
        return x + gate * out

    def block_forward_parts(self, name: str, x: torch.Tensor, ctx: dict[str, torch.Tensor]) -> torch.Tensor:
        """One block composed from its sub-block hooks (see the module docstring); equals :meth:`run_block`."""
        mods = self.block_modulation(name, ctx)
        out, gate = self.block_self_attention(name, x, mods, ctx)
        x = self.add_gated(x, out, gate)
        if "cross" in self.sub_blocks:
            x = x + self.block_cross_attention(name, x, ctx)
        out, gate = self.block_mlp(name, x, mods, ctx)
        return self.add_gated(x, out, gate)

    # ----------------------------------------------------------------------------------- family-specific parts
    @abstractmethod
    def geometry_of(self, latent: torch.Tensor, **kw):
        ...

    @abstractmethod
    def embed(self, inputs: dict[str, torch.Tensor], g) -> dict[str, torch.Tensor]:
        ...

    @abstractmethod
    def run_block(self, name: str, inputs: dict[str, torch.Tensor], g) -> torch.Tensor:
        ...

    @abstractmethod
    def final(self, inputs: dict[str, torch.Tensor], g) -> torch.Tensor:
        ...

    @abstractmethod
    def block_modulation(self, name: str, ctx: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ...

    @abstractmethod
    def block_modulated_input(self, name: str, x: torch.Tensor, ctx: dict[str, torch.Tensor]) -> torch.Tensor:
        ...

    @abstractmethod
    def block_self_attention(self, name: str, x: torch.Tensor, mods: dict[str, torch.Tensor],
                             ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def block_cross_attention(self, name: str, x: torch.Tensor, ctx: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{self.family} blocks have no cross-attention sub-block (sub_blocks = "
                                  f"{self.sub_blocks})")

    @abstractmethod
    def block_mlp(self, name: str, x: torch.Tensor, mods: dict[str, torch.Tensor],
                  ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ...
