"""Tiny random diffusers video transformers (and a Wan pipeline) for the adapter / enable() tests."""

from __future__ import annotations

from pathlib import Path

import torch

# qc-ref-wan's transformer config, shrunk (the rest from qc_ref_wan.TRANSFORMER_CONFIG)
QC_REF_WAN_TINY = {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2, "freq_dim": 32}


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its init (ones / zeros would hide ordering mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return module.eval()


def tiny_wan(seed: int = 0, **kw):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
               text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    cfg.update(kw)
    return perturb(WanTransformer3DModel(**cfg), seed)


def tiny_wan_folder(root: Path, seed: int = 3, **kw) -> Path:
    """A diffusers transformer folder (what `save_pretrained` writes, under ROOT/transformer), tiny and random: a
    ``wan2.1:ROOT`` model. Returns ROOT."""
    tiny_wan(seed, **kw).save_pretrained(str(root / "transformer"), safe_serialization=True)
    return root


def tiny_qc_ref_wan_folder(root: Path, defaults, *, seed: int = 0, provenance: dict | None = None, **cfg) -> Path:
    """A qc-ref-wan folder at ROOT/qc_ref_wan (returned): a tiny transformer (``QC_REF_WAN_TINY`` updated by ``cfg``)
    with every weight moved off its init by 0.05 N(0, 1) after ``torch.manual_seed(seed)``, qc-ref-wan's caption
    encoder, sampling ``defaults`` (a ``qc_ref_wan.SamplingDefaults``), ``provenance`` ({"test": True} if None)."""
    from qc_compile.models import qc_ref_wan as qrw

    torch.manual_seed(seed)
    tr = qrw.build_transformer({**qrw.TRANSFORMER_CONFIG, **QC_REF_WAN_TINY, **cfg})
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return qrw.save_qc_ref_wan(root / "qc_ref_wan", tr, qrw.build_text_encoder(), defaults=defaults,
                               provenance={"test": True} if provenance is None else provenance)


def tiny_cogvideox(seed: int = 0, **kw):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
               text_embed_dim=16, num_layers=3, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
               temporal_compression_ratio=4, max_text_seq_length=7)
    cfg.update(kw)
    return perturb(CogVideoXTransformer3DModel(**cfg), seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tiny_wan_pipeline(seed: int = 0):
    """A WanPipeline of tiny random parts: transformer, Wan VAE and flow-matching scheduler. No text encoder (there is
    no tokenizer without a hub): callers pass ``prompt_embeds`` / ``negative_prompt_embeds``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                           latents_std=[1.5, 0.8, 1.0, 1.2]).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=tiny_wan(seed), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def run_wan_pipeline(pipe, steps: int = 6, seed: int = 0):
    pe, ne = randn(1, 6, 16, seed=101), randn(1, 6, 16, seed=102)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=16, width=16, num_frames=5,
                num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(seed),
                output_type="pt").frames
