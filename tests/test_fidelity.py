"""PSNR and SSIM against analytic values."""

from __future__ import annotations

import math

import pytest
import torch

from qc_compile.metrics.fidelity import PSNR_CAP_DB, compare_videos, psnr, psnr_frames, ssim, ssim_frames
from qc_compile.data.shapes import all_captions, render


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_psnr_matches_known_noise_level() -> None:
    a = torch.zeros(3, 4, 32, 32, dtype=torch.float64)
    for sigma in (0.01, 0.1):
        noise = torch.randn(a.shape, generator=_gen(), dtype=torch.float64)
        noise = noise / noise.pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt() * sigma  # exact per-frame RMS
        p = psnr_frames(a + noise, a)
        assert p.shape == (4,)
        torch.testing.assert_close(p, torch.full((4,), 10 * math.log10(4 / sigma**2), dtype=torch.float64))
    # A constant offset: MSE = c^2 exactly.
    assert psnr(a + 0.2, a) == pytest.approx(10 * math.log10(4 / 0.04))
    assert psnr(a + 0.2, a, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.04))


def test_psnr_identical_is_capped_and_per_frame() -> None:
    v = render(all_captions()[:1], seed=0)[0]
    assert psnr(v, v) == PSNR_CAP_DB
    w = v.clone()
    w[:, 3] += 0.1
    p = psnr_frames(w, v)
    assert p[3] < 40 and (p[torch.arange(16) != 3] == PSNR_CAP_DB).all()


def test_ssim_identical_is_one_and_decreases_with_noise() -> None:
    v = render(all_captions()[:2], seed=1)
    assert ssim(v, v) == pytest.approx(1.0, abs=1e-12)
    values = [ssim((v + s * torch.randn(v.shape, generator=_gen(1))).clamp(-1, 1), v) for s in (0.02, 0.1, 0.3)]
    assert 1 > values[0] > values[1] > values[2] > 0
    assert ssim_frames(v, v).shape == (2, 16)
    assert ssim_frames(v[0], v[0]).shape == (16,)


def test_ssim_of_flat_frames_matches_formula() -> None:
    # Constant images: sigma terms vanish, SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a = torch.full((3, 2, 16, 16), 0.2, dtype=torch.float64)
    b = torch.full((3, 2, 16, 16), -0.3, dtype=torch.float64)
    c1 = (0.01 * 2) ** 2
    want = (2 * 0.2 * -0.3 + c1) / (0.2**2 + 0.3**2 + c1)
    assert ssim(a, b) == pytest.approx(want, rel=1e-9)


def test_ssim_of_contrast_change_matches_formula() -> None:
    # b = k * a with a zero-mean (over every window) checkerboard: SSIM = (2k s^2 + C2) / ((1 + k^2) s^2 + C2),
    # where s^2 is a's local variance (the Gaussian-weighted mean of a^2, = 0.25 for a = +-0.5).
    y, x = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    a = (((x + y) % 2) - 0.5).to(torch.float64).expand(3, 1, 16, 16).contiguous()
    k = 0.5
    c2 = (0.03 * 2) ** 2
    # The local mean of a checkerboard under an odd Gaussian window is not exactly 0; allow a small tolerance.
    want = (2 * k * 0.25 + c2) / ((1 + k * k) * 0.25 + c2)
    assert ssim(k * a, a) == pytest.approx(want, abs=2e-3)


def test_shape_mismatch_and_compare_videos() -> None:
    v = render(all_captions()[:1], seed=0)[0]
    with pytest.raises(ValueError):
        psnr(v, v[:, :8])
    r = compare_videos(v + 0.01, v)
    assert set(r) >= {"psnr_db", "ssim", "psnr_db_per_frame", "ssim_per_frame"}
    assert len(r["psnr_db_per_frame"]) == 16 and r["psnr_db"] == pytest.approx(10 * math.log10(4 / 1e-4))
