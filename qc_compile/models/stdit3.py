"""STDiT3 (Open-Sora 1.2), with the per-unit split as a first-class API.

A *unit* is what one engine runs (DESIGN.md §1): ``embed``, ``spatial_<i>``, ``temporal_<i>``, ``final``.
:meth:`STDiT3.forward` is the monolithic Open-Sora forward (packed captions, block-diagonal cross-attention);
:meth:`STDiT3.run_unit` / :meth:`STDiT3.unit_module` run one unit at a time on padded captions with a bool mask
(fixed shapes, what ONNX/TensorRT want). The two are tested to agree.

Unit I/O (B = batch, N = T·S tokens, C = hidden, L = caption length):

=============  ======================================================  =========================================
unit           inputs                                                  outputs
=============  ======================================================  =========================================
embed          x (B,Cin,Tx,Hx,Wx), timestep (B,), y (B,1,L,Cy),        x (B,N,C), t (B,C), t_mlp (B,6C),
               mask (B,L) bool, fps (B,)                               y (B,L,C)
spatial_i      x (B,N,C), t_mlp (B,6C), y (B,L,C), mask (B,L)          x (B,N,C)
temporal_i     same as spatial_i                                       x (B,N,C)
final          x (B,N,C), t (B,C)                                      v (B,Cout,Tx,Hx,Wx) float32
=============  ======================================================  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import nn

from qc_compile.errors import UserError
from qc_compile.models.config import STDiT3Config
from qc_compile.models.units import PatchGrid, unit_kind  # noqa: F401  (unit_kind re-exported: the one rule)
from qc_compile.models.layers import (Attention, CaptionEmbedder, Mlp, MultiHeadCrossAttention, PatchEmbed3D,
                                      PositionEmbedding2D, RotaryEmbedding, SizeEmbedder, TimestepEmbedder,
                                      t2i_modulate)

UNIT_INPUTS: dict[str, tuple[str, ...]] = {
    "embed": ("x", "timestep", "y", "mask", "fps"),
    "block": ("x", "t_mlp", "y", "mask"),
    "final": ("x", "t"),
}
UNIT_OUTPUTS: dict[str, tuple[str, ...]] = {
    "embed": ("x", "t", "t_mlp", "y"),
    "block": ("x",),
    "final": ("v",),
}


@dataclass(frozen=True)
class Geometry(PatchGrid):
    """Sizes of one resolution/frames profile: the model input (Tx, Hx, Wx), the patch grid and the pixel size
    that sets the position-embedding scale."""

    frames: int  # Tx: input frames (latent frames for Open-Sora, pixel frames for qc-ref)
    height: int  # Hx
    width: int  # Wx
    patch_size: tuple[int, int, int]
    height_px: int  # pixel height used for the pos-embed scale (Open-Sora passes the video's pixel size)
    width_px: int

    @classmethod
    def for_model(cls, cfg: STDiT3Config, frames: int, height: int, width: int) -> "Geometry":
        """Geometry from a *video* size in pixels: latent sizes for Open-Sora (VAE /8 spatial, temporal per §6),
        the pixel sizes themselves for pixel-space models, which must divide by the patch size."""
        for name, v in (("frames", frames), ("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"{name} must be a positive integer, got {v!r}.")
        if cfg.space == "pixel":
            pt, ph, pw = cfg.patch_size
            bad = [f"{n}={v} (patch {p})" for n, v, p in (("frames", frames, pt), ("height", height, ph),
                                                           ("width", width, pw)) if v % p]
            if bad:
                raise UserError(f"video size does not divide by {cfg.name}'s patch size {cfg.patch_size}: "
                                f"{', '.join(bad)}. Choose sizes that are multiples of the patch size.")
            return cls(frames, height, width, cfg.patch_size, height, width)
        t_lat = 5 * (frames // 17) + -(-(frames % 17) // 4) if frames > 1 else 1
        if height < 16 or width < 16:
            raise UserError(f"height and width must be at least 16 pixels for {cfg.name}, got {height}x{width}.")
        return cls(t_lat, height // 8, width // 8, cfg.patch_size, height, width)


class Modulation(NamedTuple):
    """adaLN-Zero modulation of one block for one step (each (B, 1, C))."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor


class STDiT3Block(nn.Module):
    """One spatial or temporal block. Rows of the modulation table: shift/scale/gate for attention, then MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool,
                 rope: RotaryEmbedding | None) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, rope=rope if temporal else None)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    # The block's sub-steps, public so that the step executor's sub-block caches (PAB, FORA) and the fast path
    # compose the same pieces the forward does. ``x`` is the block's residual stream; the attention and MLP parts
    # return their output *before* the adaLN gate (``mods.gate_msa`` / ``mods.gate_mlp``), the cross part after.
    def modulation(self, t_mlp: torch.Tensor) -> "Modulation":
        B = t_mlp.shape[0]
        return Modulation(*(self.scale_shift_table[None] + t_mlp.reshape(B, 6, -1)).chunk(6, dim=1))

    def attention_input(self, x: torch.Tensor, mods: "Modulation") -> torch.Tensor:
        """The adaLN-modulated input of self-attention (TeaCache's indicator reads it)."""
        return t2i_modulate(self.norm1(x), mods.shift_msa, mods.scale_msa)

    def self_attention(self, x: torch.Tensor, mods: "Modulation", T: int, S: int) -> torch.Tensor:
        return self.attend(self.attention_input(x, mods), T, S)

    def cross_attention(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                        y_lens: list[int] | None = None) -> torch.Tensor:
        return self.cross_attn(x, y, mask, y_lens)

    def feed_forward(self, x: torch.Tensor, mods: "Modulation") -> torch.Tensor:
        return self.mlp(t2i_modulate(self.norm2(x), mods.shift_mlp, mods.scale_mlp))

    def attend(self, h: torch.Tensor, T: int, S: int) -> torch.Tensor:
        """Self-attention over frames (temporal) or over the tokens of each frame (spatial) of a modulated ``h``."""
        B, N, C = h.shape
        if self.temporal:  # attend over the T frames at each spatial location
            h = h.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
            h = self.attn(h)
            return h.view(B, S, T, C).transpose(1, 2).reshape(B, N, C)
        h = self.attn(h.reshape(B * T, S, C))  # attend over the S tokens of each frame
        return h.view(B, N, C)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_mlp: torch.Tensor, T: int, S: int,
                mask: torch.Tensor | None = None, y_lens: list[int] | None = None,
                x_mask: torch.Tensor | None = None, t0_mlp: torch.Tensor | None = None) -> torch.Tensor:
        mods = self.modulation(t_mlp)
        if x_mask is None:
            x = x + mods.gate_msa * self.self_attention(x, mods, T, S)
            x = x + self.cross_attention(x, y, mask, y_lens)
            return x + mods.gate_mlp * self.feed_forward(x, mods)
        # conditioning frames (i2v/extension) are modulated with the t=0 embedding
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        z = self.modulation(t0_mlp)
        B, N, C = x.shape

        def pick(a, b, v: torch.Tensor, fn) -> torch.Tensor:
            va, vb = fn(v, a), fn(v, b)
            m = x_mask[:, :, None, None]
            return torch.where(m, va.view(B, T, S, C), vb.view(B, T, S, C)).view(B, N, C)
        h = pick((shift_msa, scale_msa), (z[0], z[1]), self.norm1(x), lambda v, p: t2i_modulate(v, *p))
        h = self.attend(h, T, S)
        x = x + pick(gate_msa, z[2], h, lambda v, g: g * v)
        x = x + self.cross_attention(x, y, mask, y_lens)
        h = pick((shift_mlp, scale_mlp), (z[3], z[4]), self.norm2(x), lambda v, p: t2i_modulate(v, *p))
        h = self.mlp(h)
        return x + pick(gate_mlp, z[5], h, lambda v, g: g * v)


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # raw t, not t_mlp
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class STDiT3(nn.Module):
    def __init__(self, config: STDiT3Config) -> None:
        super().__init__()
        c = config
        self.config = c
        C = c.hidden_size
        self.pos_embed = PositionEmbedding2D(C)
        self.rope = RotaryEmbedding(c.head_dim)
        self.x_embedder = PatchEmbed3D(c.patch_size, c.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = SizeEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C, bias=True))
        self.y_embedder = CaptionEmbedder(c.caption_channels, C, c.model_max_length)
        if c.temporal_pos_max:
            self.temporal_pos_embed = nn.Parameter(torch.zeros(c.temporal_pos_max, C))
        self.spatial_blocks = nn.ModuleList(
            STDiT3Block(C, c.num_heads, c.mlp_ratio, c.qk_norm, temporal=False, rope=None) for _ in range(c.depth))
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(C, c.num_heads, c.mlp_ratio, c.qk_norm, temporal=True, rope=self.rope)
            for _ in range(c.depth))
        pt, ph, pw = c.patch_size
        self.final_layer = T2IFinalLayer(C, pt * ph * pw, c.out_channels)

    def initialize_weights(self) -> None:
        """Open-Sora's training init: xavier Linear layers with zero bias, N(0, 0.02) embedders, and the temporal
        blocks' output projections at zero (so each temporal block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.fps_embedder.mlp[0],
                    self.fps_embedder.mlp[2], self.t_block[1], self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        for b in self.temporal_blocks:
            for lin in (b.attn.proj, b.cross_attn.proj, b.mlp.fc2):
                nn.init.zeros_(lin.weight)

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def unit_names(self) -> list[str]:
        names = ["embed"]
        for i in range(self.config.depth):
            names += [f"spatial_{i}", f"temporal_{i}"]
        return names + ["final"]

    def block(self, name: str) -> STDiT3Block:
        kind, i = name.rsplit("_", 1)
        blocks = {"spatial": self.spatial_blocks, "temporal": self.temporal_blocks}.get(kind)
        if blocks is None or not i.isdigit() or int(i) >= len(blocks):
            raise KeyError(f"no block unit {name!r}")
        return blocks[int(i)]

    def pos_embedding(self, g: Geometry, device=None) -> torch.Tensor:
        _, H, W = g.grid
        S = H * W
        scale = (g.height_px * g.width_px) ** 0.5 / self.config.input_sq_size
        return self.pos_embed(H, W, scale=scale, base_size=round(S ** 0.5), device=device, dtype=self.dtype)

    def add_positions(self, x: torch.Tensor, g: Geometry) -> torch.Tensor:
        """Add the 2-D spatial embedding (and qc-ref's absolute frame embedding) to patch tokens (B, N, C)."""
        B, N, C = x.shape
        x = x.view(B, g.T, g.S, C) + self.pos_embedding(g, x.device)[:, None]
        if self.config.temporal_pos_max:
            if g.T > self.config.temporal_pos_max:
                raise UserError(f"{self.config.name} supports at most {self.config.temporal_pos_max} latent frames, "
                                f"got {g.T}.")
            x = x + self.temporal_pos_embed[: g.T].to(x.dtype)[None, :, None, :]
        return x.reshape(B, N, C)

    def embed_time(self, timestep: torch.Tensor, fps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = timestep.shape[0]
        t = self.t_embedder(timestep.to(self.dtype)) + self.fps_embedder(fps.to(self.dtype), B)
        return t, self.t_block(t)

    def unpatchify(self, x: torch.Tensor, g: Geometry) -> torch.Tensor:
        T, H, W = g.grid
        pt, ph, pw = g.patch_size
        B = x.shape[0]
        co = self.config.out_channels
        x = x.view(B, T, H, W, pt, ph, pw, co).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(B, co, T * pt, H * ph, W * pw)
        return x[:, :, :g.frames, :g.height, :g.width]

    def geometry_of(self, x: torch.Tensor, height: int | None = None, width: int | None = None) -> Geometry:
        _, _, Tx, Hx, Wx = x.shape
        return Geometry(Tx, Hx, Wx, self.config.patch_size, height or Hx, width or Wx)

    # ----------------------------------------------------------------------------------------------- units
    def embed(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
              fps: torch.Tensor, g: Geometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.add_positions(self.x_embedder(x.to(self.dtype)), g)
        t, t_mlp = self.embed_time(timestep, fps)
        y = self.y_embedder(y.to(self.dtype)).squeeze(1)  # (B, L, C)
        return x, t, t_mlp, y

    def run_block(self, name: str, x: torch.Tensor, t_mlp: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                  g: Geometry) -> torch.Tensor:
        return self.block(name)(x, y, t_mlp, g.T, g.S, mask=mask)

    def final(self, x: torch.Tensor, t: torch.Tensor, g: Geometry) -> torch.Tensor:
        return self.unpatchify(self.final_layer(x, t), g).float()

    def run_unit(self, name: str, inputs: dict[str, torch.Tensor], g: Geometry) -> dict[str, torch.Tensor]:
        """Run one unit on named inputs (see the module docstring) and return named outputs."""
        kind = unit_kind(name)
        if kind == "embed":
            x, t, t_mlp, y = self.embed(*(inputs[k] for k in UNIT_INPUTS["embed"]), g)
            return {"x": x, "t": t, "t_mlp": t_mlp, "y": y}
        if kind == "final":
            return {"v": self.final(inputs["x"], inputs["t"], g)}
        return {"x": self.run_block(name, *(inputs[k] for k in UNIT_INPUTS["block"]), g)}

    def block_steps(self, name: str, ctx: dict[str, torch.Tensor], g: Geometry) -> "BlockSteps":
        """The sub-steps of block unit ``name`` bound to this step's embed outputs ``ctx`` (``t_mlp``, ``y``,
        ``mask``): what the step executor's sub-block caches run (the model-family protocol)."""
        return BlockSteps(self.block(name), ctx, g)

    def unit_module(self, name: str, g: Geometry) -> nn.Module:
        """An ``nn.Module`` whose forward takes the unit's inputs positionally (for ONNX export and tracing)."""
        return _UnitModule(self, name, g)

    def iter_units(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, module holding that unit's parameters) in execution order."""
        for name in self.unit_names():
            if unit_kind(name) == "block":
                yield name, self.block(name)
        # embed/final parameters are spread over several submodules; callers that need them use named_parameters.

    # ----------------------------------------------------------------------------------------------- whole model
    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                x_mask: torch.Tensor | None = None, fps: torch.Tensor | None = None,
                height: torch.Tensor | None = None, width: torch.Tensor | None = None) -> torch.Tensor:
        """Open-Sora's STDiT3.forward: packed captions with block-diagonal cross-attention, optional x_mask."""
        B = x.shape[0]
        x = x.to(self.dtype)
        hp = int(height.reshape(-1)[0].item()) if height is not None else None
        wp = int(width.reshape(-1)[0].item()) if width is not None else None
        g = self.geometry_of(x, hp, wp)
        fps = fps if fps is not None else torch.full((B,), float(self.config.default_fps), device=x.device)
        t, t_mlp = self.embed_time(timestep, fps)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0, t0_mlp = self.embed_time(torch.zeros_like(timestep), fps)
        # caption: project then pack the valid tokens of every sample into one sequence
        yp = self.y_embedder(y.to(self.dtype))  # (B, 1, L, C)
        if mask is None:
            mask = torch.ones(yp.shape[0], yp.shape[2], dtype=torch.bool, device=x.device)
        if mask.shape[0] != yp.shape[0]:
            mask = mask.repeat(yp.shape[0] // mask.shape[0], 1)
        mask = mask.bool()
        y_lens = mask.sum(dim=1).tolist()
        y_packed = yp.squeeze(1)[mask][None]  # (1, ΣL, C)
        h = self.add_positions(self.x_embedder(x), g)
        N = h.shape[1]
        for sb, tb in zip(self.spatial_blocks, self.temporal_blocks):
            h = sb(h, y_packed, t_mlp, g.T, g.S, y_lens=y_lens, x_mask=x_mask, t0_mlp=t0_mlp)
            h = tb(h, y_packed, t_mlp, g.T, g.S, y_lens=y_lens, x_mask=x_mask, t0_mlp=t0_mlp)
        if x_mask is None:
            out = self.final_layer(h, t)
        else:
            out_t, out_0 = self.final_layer(h, t), self.final_layer(h, t0)
            m = x_mask[:, :, None, None]
            out = torch.where(m, out_t.view(B, g.T, g.S, -1), out_0.view(B, g.T, g.S, -1)).view(B, N, -1)
        return self.unpatchify(out, g).float()

    def forward_units(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                      fps: torch.Tensor, g: Geometry) -> torch.Tensor:
        """The same computation unit by unit (padded captions): what executors and engines run."""
        state = self.run_unit("embed", {"x": x, "timestep": timestep, "y": y, "mask": mask, "fps": fps}, g)
        h = state["x"]
        for name in self.unit_names()[1:-1]:
            h = self.run_unit(name, {"x": h, "t_mlp": state["t_mlp"], "y": state["y"], "mask": mask}, g)["x"]
        return self.run_unit("final", {"x": h, "t": state["t"]}, g)["v"]


class BlockSteps:
    """One block's sub-steps for one step: modulation computed once, parts callable on the residual stream ``x``.

    ``x + gate_attn * self_attention(x)``, then ``+ cross_attention``, then ``+ gate_mlp * feed_forward`` is the
    block's forward (tested equal)."""

    def __init__(self, block: STDiT3Block, ctx: dict[str, torch.Tensor], g: Geometry) -> None:
        self.block, self.ctx, self.g = block, ctx, g
        self.mods = block.modulation(ctx["t_mlp"])

    @property
    def gate_attn(self) -> torch.Tensor:
        return self.mods.gate_msa

    @property
    def gate_mlp(self) -> torch.Tensor:
        return self.mods.gate_mlp

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.attention_input(x, self.mods)

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.self_attention(x, self.mods, self.g.T, self.g.S)

    def cross_attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.cross_attention(x, self.ctx["y"], self.ctx.get("mask"))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.feed_forward(x, self.mods)


class _UnitModule(nn.Module):
    def __init__(self, model: STDiT3, name: str, g: Geometry) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.kind = unit_kind(name)
        self.g = g

    def input_names(self) -> tuple[str, ...]:
        return UNIT_INPUTS[self.kind]

    def output_names(self) -> tuple[str, ...]:
        return UNIT_OUTPUTS[self.kind]

    def forward(self, *args: torch.Tensor):
        out = self.model.run_unit(self.name, dict(zip(self.input_names(), args)), self.g)
        vals = tuple(out[k] for k in self.output_names())
        return vals[0] if len(vals) == 1 else vals
