"""The small caption tokenizer and encoder of `qc-ref`: it plays T5's role for the shapes domain.

The tokenizer is word-level over the shapes vocabulary; the encoder is a tiny pre-norm transformer whose output
has T5's layout as Open-Sora feeds it to STDiT3's ``y_embedder``: ``(B, 1, L, dim)`` with a ``(B, L)`` mask.
Its weights ship inside the qc-ref checkpoint under the prefix ``text_encoder.``, so parameter names here are part
of the checkpoint format: do not rename them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from qc_compile.data.shapes import all_words, check_known_words, split_words
from qc_compile.errors import UserError
from qc_compile.prompts import excerpt

PAD_ID = 0
EOS_ID = 1
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>")


class CaptionTokenizer:
    """Word-level tokenizer. Vocabulary (ids in this order, fixed forever):

    ``<pad>``=0, ``<eos>``=1, then "a", "moving", "on", "background", the colours (red green blue yellow magenta
    cyan white), shapes (circle square triangle), directions (left right up down), backgrounds (black gray navy):
    23 tokens. Any sequence of known words is accepted (the template is not enforced); ``<eos>`` always ends it.
    """

    def __init__(self) -> None:
        self.vocab: tuple[str, ...] = SPECIAL_TOKENS + all_words()
        self.token_to_id: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        """Ids of one caption, ``<eos>`` included; unknown words raise UserError."""
        words = split_words(text)
        check_known_words(text, words)
        return [self.token_to_id[w] for w in words] + [EOS_ID]

    def encode(self, texts: Sequence[str], max_length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both LongTensor (B, max_length); mask is 1 on real tokens (incl. ``<eos>``), 0 on padding."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), max_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, text in enumerate(texts):
            toks = self.tokenize(text)
            if len(toks) > max_length:
                raise UserError(f"caption {excerpt(text)} is {len(toks) - 1} words long; at most {max_length - 1} words fit "
                                f"(the encoder's max_length is {max_length} tokens including <eos>).")
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first ``<eos>`` (debugging aid)."""
        words = []
        for i in ids:
            if int(i) == EOS_ID:
                break
            if int(i) != PAD_ID:
                words.append(self.vocab[int(i)])
        return " ".join(words)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask, via ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, L) bool: True = may be attended to
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


class CaptionEncoder(nn.Module):
    """Token + learned position embeddings, ``layers`` pre-norm transformer layers, final LayerNorm.

    Parameter names: ``token_embedding.weight``, ``position_embedding``, ``layers.{i}.{norm1,attn.qkv,attn.proj,
    norm2,mlp.0,mlp.2}.*``, ``final_norm.*``.
    """

    def __init__(self, vocab_size: int, max_length: int = 12, dim: int = 64, layers: int = 1, heads: int = 4) -> None:
        super().__init__()
        self.vocab_size, self.max_length, self.dim = vocab_size, max_length, dim
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (B, L) with L <= max_length -> (B, 1, L, dim). Padding positions are computed but ignored
        as keys; a row with no real token attends to its first position instead (avoids NaN)."""
        L = ids.shape[1]
        if L > self.max_length:
            raise ValueError(f"sequence length {L} exceeds max_length {self.max_length}")
        key_mask = mask.bool()
        key_mask = key_mask | (~key_mask.any(dim=1, keepdim=True) & (torch.arange(L, device=ids.device) == 0))
        x = self.token_embedding(ids) + self.position_embedding[:L]
        for layer in self.layers:
            x = layer(x, key_mask)
        return self.final_norm(x)[:, None]
