"""Units and sub-block hooks for diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX 1.0 2B/5B and 1.5 layouts).

CogVideoX blocks carry two streams, text and video, through joint attention and a joint feed-forward. The hidden
state ``x`` that the block units pass along is the joint sequence ``[text; video]`` (B, L + N, C) — exactly what
diffusers' patch embedding produces before it splits the two — so a block unit is still ``x -> x`` and a cached
residual covers both streams (as diffusers' own first-block cache does). The geometry's ``prefix_tokens`` is L.

Unit I/O:

=========  =============================================================  ===========================================
unit       inputs                                                         outputs
=========  =============================================================  ===========================================
embed      x (B,F,Cin,H,W) latent, timestep (B,), y (B,L,text_dim);       x (B,L+N,C), temb (B,Ct),
           optional timestep_cond, ofs (B,), rope_cos / rope_sin (N,D)    text_len (1,) int64 on the CPU,
           (computed from the geometry as the pipeline does if absent)    rope_cos / rope_sin (N,D) when rotary
block_i    x, temb, text_len, rope_cos / rope_sin                         x (B,L+N,C)
final      x, temb, text_len                                              v (B,F,Cout,H,W)
=========  =============================================================  ===========================================

``text_len`` is a host tensor so the hooks can split the joint sequence without a device-to-host copy.
"""

from __future__ import annotations

import torch
from torch import nn

from qc_compile.models.diffusers_adapter.base import DiffusersAdapter
from qc_compile.models.diffusers_adapter.geometry import DiffusersGeometry



class CogVideoXAdapter(DiffusersAdapter):
    family = "cogvideox"
    sub_blocks = ("attn", "mlp")  # joint self-attention and feed-forward; no cross-attention
    temporal_ratio = 4
    spatial_ratio = 8

    def __init__(self, transformer: nn.Module) -> None:
        from diffusers import CogVideoXTransformer3DModel

        if not isinstance(transformer, CogVideoXTransformer3DModel):
            raise TypeError("CogVideoXAdapter wraps a diffusers CogVideoXTransformer3DModel, got "
                            f"{type(transformer).__name__}")
        super().__init__(transformer)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @property
    def config(self):
        return self.transformer.config

    @property
    def patch_size(self) -> tuple[int, int, int]:
        c = self.config
        return (c.patch_size_t or 1, c.patch_size, c.patch_size)

    # ------------------------------------------------------------------------------------------------ geometry
    def geometry_of(self, latent: torch.Tensor, *, text_len: int | None = None, **_) -> DiffusersGeometry:
        _, f, _, h, w = latent.shape
        return DiffusersGeometry(f, h, w, self.patch_size,
                                 self.config.max_text_seq_length if text_len is None else text_len)

    def geometry_for_video(self, frames: int, height: int, width: int,
                           text_len: int | None = None) -> DiffusersGeometry:
        return DiffusersGeometry.from_video(
            frames, height, width, patch_size=self.patch_size, temporal_ratio=self.temporal_ratio,
            spatial_ratio=self.spatial_ratio,
            prefix_tokens=self.config.max_text_seq_length if text_len is None else text_len)

    def rotary_embedding(self, g: DiffusersGeometry, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3-D rotary table CogVideoXPipeline._prepare_rotary_positional_embeddings builds for this size."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        c = self.config
        p, p_t = c.patch_size, c.patch_size_t
        gh, gw = g.height // p, g.width // p
        base_w, base_h = c.sample_width // p, c.sample_height // p
        if p_t is None:
            crops = get_resize_crop_region_for_grid((gh, gw), base_w, base_h)
            return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                           temporal_size=g.frames, device=device)
        return get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=None, grid_size=(gh, gw),
                                       temporal_size=(g.frames + p_t - 1) // p_t, grid_type="slice",
                                       max_size=(base_h, base_w), device=device)

    # ------------------------------------------------------------------------------------------------ units
    def embed(self, inputs: dict[str, torch.Tensor], g: DiffusersGeometry) -> dict[str, torch.Tensor]:
        m = self.transformer
        x, y = inputs["x"], inputs["y"]
        t_emb = m.time_proj(inputs["timestep"]).to(dtype=x.dtype)
        emb = m.time_embedding(t_emb, inputs.get("timestep_cond"))
        if m.ofs_embedding is not None:
            ofs_emb = m.ofs_proj(inputs["ofs"]).to(dtype=x.dtype)
            emb = emb + m.ofs_embedding(ofs_emb)
        h = m.embedding_dropout(m.patch_embed(y, x))
        out = {"x": h, "temb": emb, "text_len": torch.tensor([y.shape[1]], dtype=torch.int64)}
        if "rope_cos" in inputs:
            out["rope_cos"], out["rope_sin"] = inputs["rope_cos"], inputs["rope_sin"]
        elif self.config.use_rotary_positional_embeddings:
            out["rope_cos"], out["rope_sin"] = self.rotary_embedding(g, device=x.device)
        return out

    def call_inputs(self, args: dict) -> tuple[dict[str, torch.Tensor], DiffusersGeometry]:
        """Embed inputs and geometry from the (bound) arguments of ``CogVideoXTransformer3DModel.forward``."""
        x, y = args["hidden_states"], args["encoder_hidden_states"]
        t = args["timestep"]
        if not isinstance(t, torch.Tensor):
            t = torch.tensor([t] * x.shape[0], device=x.device)
        inputs = {"x": x, "timestep": t, "y": y}
        for k in ("timestep_cond", "ofs"):
            if args.get(k) is not None:
                inputs[k] = args[k]
        if args.get("image_rotary_emb") is not None:
            inputs["rope_cos"], inputs["rope_sin"] = args["image_rotary_emb"]
        return inputs, self.geometry_of(x, text_len=y.shape[1])

    @staticmethod
    def _rope(ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (ctx["rope_cos"], ctx["rope_sin"]) if "rope_cos" in ctx else None

    @staticmethod
    def _L(ctx: dict[str, torch.Tensor]) -> int:
        return int(ctx["text_len"][0])

    def run_block(self, name: str, inputs: dict[str, torch.Tensor], g: DiffusersGeometry) -> torch.Tensor:
        L, x = self._L(inputs), inputs["x"]
        h, e = self.block(name)(hidden_states=x[:, L:], encoder_hidden_states=x[:, :L], temb=inputs["temb"],
                                image_rotary_emb=self._rope(inputs))
        return torch.cat([e, h], dim=1)

    def final(self, inputs: dict[str, torch.Tensor], g: DiffusersGeometry) -> torch.Tensor:
        m = self.transformer
        h = m.norm_final(inputs["x"][:, self._L(inputs):])
        h = m.proj_out(m.norm_out(h, temb=inputs["temb"]))
        B = h.shape[0]
        p, p_t = self.config.patch_size, self.config.patch_size_t
        if p_t is None:
            out = h.reshape(B, g.frames, g.height // p, g.width // p, -1, p, p)
            return out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        out = h.reshape(B, (g.frames + p_t - 1) // p_t, g.height // p, g.width // p, -1, p_t, p, p)
        return out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)

    # ------------------------------------------------------------------------------------------ sub-block hooks
    def block_modulation(self, name: str, ctx: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """adaLN vectors of both CogVideoXLayerNormZero norms: ``parts_msa`` / ``parts_mlp`` (6, B, C) in diffusers'
        order (shift, scale, gate, enc_shift, enc_scale, enc_gate), and the per-token gates ``gate_msa`` /
        ``gate_mlp`` (B, L+N, C) that multiply the joint sub-block outputs: text tokens take ``enc_gate``, video
        tokens ``gate`` (the token count comes from ``ctx["x"]``)."""
        b, L = self.block(name), self._L(ctx)
        n_video = ctx["x"].shape[1] - L
        out: dict[str, torch.Tensor] = {}
        for norm, suffix in ((b.norm1, "msa"), (b.norm2, "mlp")):
            parts = torch.stack(norm.linear(norm.silu(ctx["temb"])).chunk(6, dim=1))
            out[f"parts_{suffix}"] = parts
            out[f"gate_{suffix}"] = torch.cat([parts[5][:, None].expand(-1, L, -1),
                                               parts[2][:, None].expand(-1, n_video, -1)], dim=1)
        return out

    def _norm_mod(self, norm: nn.Module, x: torch.Tensor, parts: torch.Tensor, L: int) -> torch.Tensor:
        shift, scale, _, e_shift, e_scale, _ = parts.unbind(0)
        h = norm.norm(x[:, L:]) * (1 + scale)[:, None, :] + shift[:, None, :]
        e = norm.norm(x[:, :L]) * (1 + e_scale)[:, None, :] + e_shift[:, None, :]
        return torch.cat([e, h], dim=1)

    def block_modulated_input(self, name: str, x: torch.Tensor, ctx: dict[str, torch.Tensor],
                              mods: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        b = self.block(name)
        L = self._L(ctx)
        parts = mods["parts_msa"] if mods is not None else torch.stack(b.norm1.linear(b.norm1.silu(ctx["temb"]))
                                                                         .chunk(6, dim=1))
        return self._norm_mod(b.norm1, x, parts, L)

    def block_self_attention(self, name: str, x: torch.Tensor, mods: dict[str, torch.Tensor],
                             ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        b, L = self.block(name), self._L(ctx)
        n = self._norm_mod(b.norm1, x, mods["parts_msa"], L)
        h, e = b.attn1(hidden_states=n[:, L:], encoder_hidden_states=n[:, :L], image_rotary_emb=self._rope(ctx))
        return torch.cat([e, h], dim=1), mods["gate_msa"]

    def block_mlp(self, name: str, x: torch.Tensor, mods: dict[str, torch.Tensor],
                  ctx: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        b, L = self.block(name), self._L(ctx)
        return b.ff(self._norm_mod(b.norm2, x, mods["parts_mlp"], L)), mods["gate_mlp"]
