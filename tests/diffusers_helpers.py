"""Tiny random diffusers video transformers (and a Wan pipeline) for the adapter / enable() tests."""

from __future__ import annotations

import torch


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
