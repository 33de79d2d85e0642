"""Units and sub-block hooks for diffusers' ``WanTransformer3DModel`` (Wan 2.1, Wan 2.2 A14B and TI2V 5B layouts).

Unit I/O (B = batch, N = T·H·W video tokens, C = hidden, L = text length):

=========  =======================================================  ==============================================
unit       inputs                                                   outputs
=========  =======================================================  ==============================================
embed      x (B,Cin,F,H,W) latent, timestep (B,) or (B,N) (TI2V),   x (B,N,C), temb (B,C) or (B,N,C),
           y (B,L,text_dim) T5 features; optional y_image           timestep_proj (B,6,C) or (B,N,6,C),
           (B,Li,image_dim) (I2V image features)                    y (B,L',C), rope_cos / rope_sin (1,N,1,D)
block_i    x, y, timestep_proj, rope_cos, rope_sin                  x (B,N,C)
final      x, temb                                                  v (B,Cout,F,H,W)
=========  =======================================================  ==============================================

Each unit runs diffusers' own modules in the order of ``WanTransformer3DModel.forward`` (the block units call the
``WanTransformerBlock`` itself), so unit-by-unit execution equals the whole forward.
"""

from __future__ import annotations

import torch
from torch import nn

from qc_compile.models.diffusers_adapter.base import DiffusersAdapter
from qc_compile.models.diffusers_adapter.geometry import DiffusersGeometry

MOD_NAMES = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")


class WanAdapter(DiffusersAdapter):
    family = "wan"
    sub_blocks = ("attn", "cross", "mlp")
    temporal_ratio = 4  # AutoencoderKLWan (Wan 2.1 / 2.2 A14B); the TI2V 5B VAE is 4 x 16
    spatial_ratio = 8

    def __init__(self, transformer: nn.Module) -> None:
        from diffusers import WanTransformer3DModel

        if not isinstance(transformer, WanTransformer3DModel):
            raise TypeError(f"WanAdapter wraps a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
        super().__init__(transformer)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    @property
    def config(self):
        return self.transformer.config

    # ------------------------------------------------------------------------------------------------ geometry
    def geometry_of(self, latent: torch.Tensor, **_) -> DiffusersGeometry:
        _, _, f, h, w = latent.shape
        return DiffusersGeometry(f, h, w, tuple(self.config.patch_size))

    def geometry_for_video(self, frames: int, height: int, width: int) -> DiffusersGeometry:
        return DiffusersGeometry.from_video(frames, height, width, patch_size=tuple(self.config.patch_size),
                                            temporal_ratio=self.temporal_ratio, spatial_ratio=self.spatial_ratio)

    # ------------------------------------------------------------------------------------------------ units
    def embed(self, inputs: dict[str, torch.Tensor], g: DiffusersGeometry) -> dict[str, torch.Tensor]:
        m = self.transformer
        x = inputs["x"]
        rope_cos, rope_sin = m.rope(x)
        h = m.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        timestep = inputs["timestep"]
        ts_seq_len = None
        if timestep.ndim == 2:  # Wan 2.2 TI2V: one timestep per token
            ts_seq_len = timestep.shape[1]
            timestep = timestep.flatten()
        temb, timestep_proj, y, y_image = m.condition_embedder(timestep, inputs["y"], inputs.get("y_image"),
                                                                timestep_seq_len=ts_seq_len)
        timestep_proj = timestep_proj.unflatten(2 if ts_seq_len is not None else 1, (6, -1))
        if y_image is not None:
            y = torch.concat([y_image, y], dim=1)
        return {"x": h, "temb": temb, "timestep_proj": timestep_proj, "y": y, "rope_cos": rope_cos,
                "rope_sin": rope_sin}

    def run_block(self, name: str, inputs: dict[str, torch.Tensor], g: DiffusersGeometry) -> torch.Tensor:
        return self.block(name)(inputs["x"], inputs["y"], inputs["timestep_proj"],
                                (inputs["rope_cos"], inputs["rope_sin"]))

    def final(self, inputs: dict[str, torch.Tensor], g: DiffusersGeometry) -> torch.Tensor:
        m = self.transformer
        h, temb = inputs["x"], inputs["temb"]
        if temb.ndim == 3:  # TI2V: per-token temb
            shift, scale = (m.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (m.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        h = (m.norm_out(h.float()) * (1 + scale.to(h.device)) + shift.to(h.device)).type_as(h)
        h = m.proj_out(h)
        pt, ph, pw = g.patch_size
        T, H, W = g.grid
        h = h.reshape(h.shape[0], T, H, W, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    # ------------------------------------------------------------------------------------------ sub-block hooks
    @staticmethod
    def add_gated(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """(x.float() + out·gate).type_as(x): WanTransformerBlock adds its gated outputs in fp32."""
        return (x.float() + out.float() * gate).type_as(x)

    def block_modulation(self, name: str, ctx: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The six adaLN vectors (fp32) of block ``name``: scale_shift_table + timestep_proj, as diffusers chunks it
        (the attention and MLP shift/scale/gate; diffusers calls the MLP ones c_shift_msa/c_scale_msa/c_gate_msa)."""
        b = self.block(name)
        temb = ctx["timestep_proj"]
        if temb.ndim == 4:  # (B, N, 6, C)
            parts = [p.squeeze(2) for p in (b.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
        else:  # (B, 6, C)
            parts = list((b.scale_shift_table + temb.float()).chunk(6, dim=1))
        return dict(zip(MOD_NAMES, parts))

    def block_modulated_input(self, name: str, x: torch.Tensor, ctx: dict[str, torch.Tensor],
                              mods: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        mods = mods if mods is not None else self.block_modulation(name, ctx)
        b = self.block(name)
        return (b.norm1(x.float()) * (1 + mods["scale_msa"]) + mods["shift_msa"]).type_as(x)

    def block_self_attention(self, name: str, x: torch.Tensor, mods: dict[str, torch.Tensor],
                             ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.block_modulated_input(name, x, ctx, mods)
        return self.block(name).attn1(h, None, None, (ctx["rope_cos"], ctx["rope_sin"])), mods["gate_msa"]

    def block_cross_attention(self, name: str, x: torch.Tensor, ctx: dict[str, torch.Tensor]) -> torch.Tensor:
        b = self.block(name)
        return b.attn2(b.norm2(x.float()).type_as(x), ctx["y"], None, None)

    def block_mlp(self, name: str, x: torch.Tensor, mods: dict[str, torch.Tensor],
                  ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.block(name)
        h = (b.norm3(x.float()) * (1 + mods["scale_mlp"]) + mods["shift_mlp"]).type_as(x)
        return b.ffn(h), mods["gate_mlp"]

    # ------------------------------------------------------------------------------------------ calling helpers
    def call_inputs(self, args: dict) -> tuple[dict[str, torch.Tensor], DiffusersGeometry]:
        """Embed inputs and geometry from the (bound) arguments of ``WanTransformer3DModel.forward``."""
        x = args["hidden_states"]
        inputs = self.forward_inputs(x, args["timestep"], args["encoder_hidden_states"],
                                     args.get("encoder_hidden_states_image"))
        return inputs, self.geometry_of(x)

    def forward_inputs(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       encoder_hidden_states_image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The embed inputs for the arguments of ``WanTransformer3DModel.forward``."""
        d = {"x": hidden_states, "timestep": timestep, "y": encoder_hidden_states}
        if encoder_hidden_states_image is not None:
            d["y_image"] = encoder_hidden_states_image
        return d
