"""Token layouts of a sharded STDiT3 video and the all-to-all that switches between them (dynamic SP).

A CFG half's tokens ``(B, T·S, C)`` (T frames of S spatial positions) are split over the ``P`` ranks of its sequence
group in one of two ways:

* **S-layout** (``(B, T, S_r, C)``): rank r holds positions ``S_r`` of every frame. Temporal blocks attend over
  frames, so they run here locally; so does everything token-wise (cross-attention, MLP, adaLN, statistics, caches).
  This is the layout the step executor sees: residual caches and probes are S-layout shards.
* **T-layout** (``(B, T_r, S, C)``): rank r holds frames ``T_r`` whole. Spatial self-attention runs here.

Open-Sora 1.2 shards over S as well; its spatial blocks then all-to-all q/k/v to split heads (Ulysses). We switch the
layout instead (DSP, Zhao et al. 2024): one all-to-all of the hidden state before a spatial block (S -> T) and one
after (T -> S): the volume of DSP, half of Ulysses' per block, and no head-count constraint. Sizes need not divide:
shards follow ``torch.tensor_split`` (the first ``n % P`` ranks take one more), e.g. 15 latent frames on 2 GPUs = 8 + 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TokenGrid:
    """The (T, S) token grid of a shard: what a block needs of a geometry (blocks read only ``.T`` and ``.S``)."""

    T: int
    S: int

    @property
    def N(self) -> int:
        return self.T * self.S


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(n), parts)``."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def offsets(sizes: list[int]) -> list[int]:
    out, o = [], 0
    for s in sizes:
        out.append(o)
        o += s
    return out


def _all_to_all(chunks_out: list[torch.Tensor], recv_numels: list[int], group, timer) -> list[torch.Tensor]:
    """Send ``chunks_out[j]`` to rank j of ``group``; returns the flat chunk received from each rank."""
    send = torch.cat([c.reshape(-1) for c in chunks_out])
    recv = send.new_empty(sum(recv_numels))
    with timer.span():
        dist.all_to_all_single(recv, send, recv_numels, [c.numel() for c in chunks_out], group=group)
    return list(recv.split(recv_numels))


def s_to_t(x: torch.Tensor, T: int, S: int, group, rank: int, size: int, timer) -> torch.Tensor:
    """``(B, T·S_r, C)`` S-layout shard -> ``(B, T_r·S, C)`` T-layout shard (one all-to-all)."""
    ts, ss = split_sizes(T, size), split_sizes(S, size)
    B, _, C = x.shape
    xt = x.view(B, T, ss[rank], C).transpose(0, 1)  # (T, B, S_r, C): frame chunks are contiguous after the copy
    chunks = list(xt.contiguous().split(ts, dim=0))
    got = _all_to_all(chunks, [ts[rank] * B * s * C for s in ss], group, timer)
    parts = [g.view(ts[rank], B, s, C) for g, s in zip(got, ss)]
    return torch.cat(parts, dim=2).transpose(0, 1).reshape(B, ts[rank] * S, C)


def t_to_s(x: torch.Tensor, T: int, S: int, group, rank: int, size: int, timer) -> torch.Tensor:
    """``(B, T_r·S, C)`` T-layout shard -> ``(B, T·S_r, C)`` S-layout shard (one all-to-all)."""
    ts, ss = split_sizes(T, size), split_sizes(S, size)
    B, _, C = x.shape
    xs = x.view(B, ts[rank], S, C).permute(2, 0, 1, 3)  # (S, B, T_r, C)
    chunks = list(xs.contiguous().split(ss, dim=0))
    got = _all_to_all(chunks, [ss[rank] * B * t * C for t in ts], group, timer)
    parts = [g.view(ss[rank], B, t, C) for g, t in zip(got, ts)]
    return torch.cat(parts, dim=2).permute(1, 2, 0, 3).reshape(B, T * ss[rank], C)


def shard_s(x: torch.Tensor, T: int, S: int, rank: int, size: int) -> torch.Tensor:
    """Whole tokens ``(B, T·S, C)`` -> this rank's S-layout shard ``(B, T·S_r, C)`` (no communication)."""
    ss = split_sizes(S, size)
    B, _, C = x.shape
    o = offsets(ss)[rank]
    return x.view(B, T, S, C)[:, :, o:o + ss[rank]].reshape(B, T * ss[rank], C)


def all_gather_padded(x: torch.Tensor, dim: int, sizes: list[int], group, timer) -> list[torch.Tensor]:
    """Every rank's ``x`` (whose ``dim`` has ``sizes[rank]`` entries), padded to the largest for one all_gather."""
    big = max(sizes)
    pad = list(x.shape)
    pad[dim] = big - x.shape[dim]
    xp = torch.cat([x, x.new_zeros(pad)], dim=dim) if pad[dim] else x.contiguous()
    out = [torch.empty_like(xp) for _ in sizes]
    with timer.span():
        dist.all_gather(out, xp, group=group)
    return [o.narrow(dim, 0, s) for o, s in zip(out, sizes)]


def gather_s(x: torch.Tensor, T: int, S: int, group, rank: int, size: int, timer) -> torch.Tensor:
    """S-layout shards -> whole tokens ``(B, T·S, C)`` on every rank (one all_gather)."""
    ss = split_sizes(S, size)
    B, _, C = x.shape
    parts = all_gather_padded(x.view(B, T, ss[rank], C), 2, ss, group, timer)
    return torch.cat(parts, dim=2).reshape(B, T * S, C)
