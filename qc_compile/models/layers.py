"""Building blocks of STDiT3, with Open-Sora 1.2's module and parameter names (so released checkpoints load).

The math follows `opensora/models/layers/blocks.py` at v1.2.0; the facts are collected in
`shared/reference/opensora-1.2-stdit3.md`. Only the xformers/flash/apex kernels are replaced by
`F.scaled_dot_product_attention` and plain LayerNorm (same math).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def approx_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


class LlamaRMSNorm(nn.Module):
    """RMSNorm with the statistic in fp32 and the weight applied after the cast back (as in Open-Sora)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """rotary-embedding-torch 0.5.3 semantics: interleaved pairs, all dims rotated, positions 0..T-1.

    ``freqs`` is a non-trainable Parameter so that it appears in the state dict as ``rope.freqs`` (36,) like the
    released checkpoint; loading tolerates its absence (see ``checkpoint.py``).
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.freqs = nn.Parameter(self.default_freqs(dim, theta), requires_grad=False)

    @staticmethod
    def default_freqs(dim: int, theta: float = 10000.0) -> torch.Tensor:
        return 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))

    def cos_sin(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(seq_len, device=device, dtype=self.freqs.dtype)
        ang = pos[:, None] * self.freqs[None, :]  # (T, dim/2)
        ang = ang.repeat_interleave(2, dim=-1)  # [θ0, θ0, θ1, θ1, …]
        return ang.cos().to(dtype), ang.sin().to(dtype)

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(-1, (-1, 2))
        x1, x2 = x.unbind(-1)
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    def rotate_queries_or_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (..., T, dim) along its second-to-last axis."""
        cos, sin = self.cos_sin(x.shape[-2], x.device, x.dtype)
        return x * cos + self.rotate_half(x) * sin


class Attention(nn.Module):
    """Self-attention with fused qkv, optional q/k RMSNorm over head_dim, optional RoPE (temporal blocks)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = LlamaRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LlamaRMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # A bound method, not a submodule: the temporal blocks share one RotaryEmbedding and own no rope params.
        self._rope = [rope] if rope is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if self._rope:
            q = self._rope[0].rotate_queries_or_keys(q)
            k = self._rope[0].rotate_queries_or_keys(k)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class MultiHeadCrossAttention(nn.Module):
    """Cross-attention from video tokens to caption tokens.

    Two equivalent input layouts: *padded* ``cond`` (B, L, C) with a bool ``mask`` (B, L) (what the per-unit graphs
    use: fixed shapes), or Open-Sora's *packed* ``cond`` (1, ΣL_b, C) with ``y_lens`` (the block-diagonal mask:
    sample b attends only to its own tokens). The whole-model forward uses the packed form, the units the padded one.
    """

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                y_lens: list[int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q = self._heads(self.q_linear(x))  # (B, h, N, hd)
        k, v = self.kv_linear(cond).chunk(2, dim=-1)
        if y_lens is not None:  # packed: one segment per sample
            k, v = self._heads(k[0]), self._heads(v[0])  # (h, ΣL, hd)
            outs, start = [], 0
            for b, n in enumerate(y_lens):
                outs.append(F.scaled_dot_product_attention(q[b], k[:, start:start + n], v[:, start:start + n]))
                start += n
            out = torch.stack(outs)
        else:
            k, v = self._heads(k), self._heads(v)
            attn_mask = None if mask is None else mask.bool()[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """timm Mlp: fc1 -> GELU(tanh) -> fc2 (the parameter names the checkpoint uses)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = approx_gelu()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed3D(nn.Module):
    """Conv3d patch embedding; zero-pads W, H, T up to multiples of the patch (Open-Sora's behaviour)."""

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, D, H, W = x.shape
        if W % pw:
            x = F.pad(x, (0, pw - W % pw))
        if H % ph:
            x = F.pad(x, (0, 0, 0, ph - H % ph))
        if D % pt:
            x = F.pad(x, (0, 0, 0, 0, 0, pt - D % pt))
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T·H·W, C), token order (t, h, w)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t·f), sin(t·f)] with f_k = exp(-ln(max_period)·k/half) (cos first, as Open-Sora)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class SizeEmbedder(TimestepEmbedder):
    """Embeds a per-sample scalar (fps); broadcast to the batch as Open-Sora's SizeEmbedder does."""

    def forward(self, s: torch.Tensor, batch: int) -> torch.Tensor:  # type: ignore[override]
        s = s.reshape(-1)
        if s.shape[0] != batch:
            s = s.repeat(batch // s.shape[0])
        return super().forward(s)


class CaptionEmbedder(nn.Module):
    """y_proj (timm Mlp) plus the learned null caption ``y_embedding`` (a persistent buffer: the CFG null branch)."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels ** 0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PositionEmbedding2D(nn.Module):
    """Fixed 2-D sin/cos embedding; the first half encodes the column (w) coordinate (as in Open-Sora)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        assert dim % 4 == 0
        half = dim // 2
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half)), persistent=False)

    def forward(self, h: int, w: int, scale: float, base_size: int | None, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        device = device or self.inv_freq.device
        rows = torch.arange(h, device=device, dtype=torch.float32) / scale
        cols = torch.arange(w, device=device, dtype=torch.float32) / scale
        if base_size is not None:
            rows = rows * (base_size / h)
            cols = cols * (base_size / w)
        r, c = torch.meshgrid(rows, cols, indexing="ij")  # (h, w)
        inv = self.inv_freq.float().to(device)

        def sincos(v: torch.Tensor) -> torch.Tensor:
            a = v.reshape(-1)[:, None] * inv[None]
            return torch.cat([a.sin(), a.cos()], dim=-1)

        return torch.cat([sincos(c), sincos(r)], dim=-1)[None].to(dtype)  # (1, h·w, dim)
