"""Fidelity of a video to a reference (DESIGN.md §7): PSNR and SSIM per frame, averaged over frames.

Inputs are videos in [-1, 1] shaped (C, T, H, W) or (B, C, T, H, W); per-frame results have shape (T,) or (B, T).
Everything is computed in float64 on the inputs' device.

* PSNR: ``10 log10(data_range^2 / MSE)`` per frame over all channels and pixels; data_range is 2 for [-1, 1].
  Identical frames would give +inf, which JSON cannot carry and which would swamp a mean, so each frame's PSNR
  is capped at :data:`PSNR_CAP_DB` (100 dB, i.e. an RMS error of 2e-5 of the range).
* SSIM: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = data_range,
  population (not sample) statistics, computed per RGB channel on the 'valid' part of the image (no padding) and
  averaged over channels and positions -- the same convention as skimage's ``structural_similarity(...,
  gaussian_weights=True, use_sample_covariance=False, channel_axis=...)`` up to its border cropping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() not in (4, 5):
        raise ValueError(f"expected (C, T, H, W) or (B, C, T, H, W), got shape {tuple(a.shape)}")
    return a.to(torch.float64), b.to(a.device, torch.float64)


def psnr_frames(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-frame PSNR in dB, shape (..., T), capped at PSNR_CAP_DB."""
    a, b = _check_pair(a, b)
    c_dim = a.dim() - 4  # channel axis
    mse = (a - b).pow(2).mean(dim=(c_dim, -2, -1))
    out = 10 * torch.log10(data_range**2 / mse.clamp(min=1e-300))
    return out.clamp(max=PSNR_CAP_DB)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over frames (and batch) of the per-frame PSNR in dB."""
    return float(psnr_frames(a, b, data_range).mean())


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of (N, 1, H, W)."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim_frames(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-frame SSIM, shape (..., T): mean over channels and valid window positions."""
    a, b = _check_pair(a, b)
    batched = a.dim() == 5
    if not batched:
        a, b = a[None], b[None]
    B, C, T, H, W = a.shape
    if H < SSIM_WINDOW or W < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {H}x{W}")
    g = _gaussian_window(a.device)
    flat = lambda v: v.permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W)  # noqa: E731
    x, y = flat(a), flat(b)
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x = _blur(x * x, g) - mu_x**2
    var_y = _blur(y * y, g) - mu_y**2
    cov = _blur(x * y, g) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    out = smap.reshape(B, T, -1).mean(dim=-1)
    return out if batched else out[0]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over frames (and batch) of the per-frame SSIM."""
    return float(ssim_frames(a, b, data_range).mean())


def compare_videos(video: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> dict:
    """PSNR and SSIM, mean and per frame, as a JSON-ready dict (one video each, (C, T, H, W))."""
    p, s = psnr_frames(video, reference, data_range), ssim_frames(video, reference, data_range)
    return {
        "psnr_db": float(p.mean()), "ssim": float(s.mean()),
        "psnr_db_per_frame": [round(float(v), 4) for v in p.flatten()],
        "ssim_per_frame": [round(float(v), 6) for v in s.flatten()],
        "psnr_cap_db": PSNR_CAP_DB,
    }
