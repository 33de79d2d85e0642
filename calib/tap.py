"""TAP (Q&C §3.1): choose calibration samples across timesteps by temporal-aware parallel clustering.

Pool: every (prompt, step) of the statistics pass. Feature of a sample: the log input |x| max of every linear (cond
branch), centred over the pool — what calibration ranges are made of. For each of ``subsets`` random subsets (each
sample kept with probability ``keep``): affinity A = α·A_spatial + (1−α)·A_temporal with A_spatial = (1 + cos)/2 of
the features and A_temporal = exp(−|t_k − t_h| / τ) (τ = 100 timesteps; the paper's exp(−|Δt|) on integer
timesteps would make any two steps of a 30-step schedule unrelated), normalised D^−½ A D^−½, the top-k eigenvectors
(rows normalised) clustered by k-means. The clusters of all subsets are pooled and the calibration set is drawn
uniformly from the clusters (round robin, a random unused member each time). ``uniform`` draws the same number of
samples uniformly from the pool, for comparison.
"""

from __future__ import annotations

import torch

from qc_compile.errors import UserError

TAU = 100.0


def _kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 50) -> torch.Tensor:
    n = x.shape[0]
    centers = x[torch.randperm(n, generator=gen)[:k]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, centers).argmin(1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        for j in range(k):
            m = labels == j
            if m.any():
                centers[j] = x[m].mean(0)
    return labels


def spectral_clusters(feat: torch.Tensor, t: torch.Tensor, k: int, alpha: float,
                      gen: torch.Generator) -> torch.Tensor:
    f = torch.nn.functional.normalize(feat, dim=1)
    a_s = (1.0 + f @ f.T) / 2.0
    a_t = torch.exp(-(t[:, None] - t[None, :]).abs() / TAU)
    a = alpha * a_s + (1.0 - alpha) * a_t
    d = a.sum(1).rsqrt()
    lap = d[:, None] * a * d[None, :]
    _, vecs = torch.linalg.eigh(lap.double())
    emb = torch.nn.functional.normalize(vecs[:, -k:].float(), dim=1)
    return _kmeans(emb, k, gen)


def select(feat: torch.Tensor, t: torch.Tensor, n: int, method: str = "tap", *, seed: int = 0, subsets: int = 3,
           keep: float | None = None, alpha: float = 0.5, per_cluster: int = 2) -> tuple[list[int], dict]:
    """Indices of ``n`` pool samples (features ``feat`` (N, D), timesteps ``t`` (N,)), and a description."""
    N = feat.shape[0]
    if n < 1:
        raise UserError(f"--calib-samples must be at least 1, got {n}.")
    n = min(n, N)
    gen = torch.Generator().manual_seed(seed)
    if method == "uniform":
        idx = torch.randperm(N, generator=gen)[:n].tolist()
        return sorted(idx), {"method": "uniform", "pool": N, "n": n}
    if method != "tap":
        raise UserError(f"--sampling {method!r}: expected tap or uniform.")
    feat = feat.float() - feat.float().mean(0, keepdim=True)
    keep = keep if keep is not None else min(1.0, max(0.5, 3.0 * n / N))
    k = max(2, min(n // max(1, per_cluster * subsets) or 1, N // 4))
    clusters: list[list[int]] = []
    for _ in range(subsets):
        members = (torch.rand(N, generator=gen) < keep).nonzero().flatten()
        if members.numel() < k + 1:
            members = torch.arange(N)
        kk = min(k, members.numel() - 1)
        labels = spectral_clusters(feat[members], t[members].float(), kk, alpha, gen)
        for j in range(kk):
            c = members[labels == j].tolist()
            if c:
                clusters.append(c)
    chosen: list[int] = []
    used: set[int] = set()
    order = torch.randperm(len(clusters), generator=gen).tolist()
    while len(chosen) < n:
        progressed = False
        for ci in order:
            free = [i for i in clusters[ci] if i not in used]
            if not free:
                continue
            pick = free[int(torch.randint(len(free), (1,), generator=gen))]
            chosen.append(pick)
            used.add(pick)
            progressed = True
            if len(chosen) == n:
                break
        if not progressed:
            break
    return sorted(chosen), {"method": "tap", "pool": N, "n": len(chosen), "subsets": subsets, "keep": keep,
                            "clusters": len(clusters), "k_per_subset": k, "alpha": alpha, "tau": TAU}
