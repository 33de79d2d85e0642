"""Reference formats: quantizers against float64 math, Hadamard algebra, INT4 packing, NVFP4 emulation."""

from __future__ import annotations

import math

import pytest
import torch

from qc_compile.plugins import formats as F


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    t = torch.randn(37, 1152, generator=g, dtype=torch.float64) * 3 + 0.5
    t[:, 11] += 40.0  # an outlier channel
    return t


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64, 128, 256])
def test_hadamard_orthogonal_symmetric_and_pm1(n):
    h = F.hadamard_matrix(n, torch.float64)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.t())
    u = F.hadamard_matrix(n, torch.float64, normalized=False)
    assert set(u.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(u @ u, n * torch.eye(n, dtype=torch.float64))  # integer arithmetic: exact


@pytest.mark.parametrize("n", [0, 3, 12, 96])
def test_hadamard_rejects_non_power_of_two(n):
    with pytest.raises(ValueError):
        F.hadamard_matrix(n)


@pytest.mark.parametrize("block", [0, 2, 16, 64, 128])
def test_blocked_hadamard_is_exact_involution_and_norm_preserving(x, block):
    y = F.blocked_hadamard(x, block)
    assert y.dtype == torch.float64
    assert torch.allclose(F.blocked_hadamard(y, block), x, rtol=0, atol=1e-10)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    if block >= 64:
        assert y.abs().amax() < 0.6 * x.abs().amax()  # the outlier is spread over its block


def test_blocked_hadamard_exact_on_integers_with_power_of_four_block():
    """Normalised entries of H_64 are +-1/8 (exact), so integer inputs round-trip bit-exactly in float32."""
    x = torch.randint(-50, 50, (5, 256)).float()
    assert torch.equal(F.blocked_hadamard(F.blocked_hadamard(x, 64), 64), x)


def test_blocked_hadamard_matches_dense_blockdiag(x):
    h = torch.block_diag(*[F.hadamard_matrix(64, torch.float64)] * (1152 // 64))
    assert torch.allclose(F.blocked_hadamard(x, 64), x @ h, atol=1e-10)


def test_rotation_preserves_linear_output(x):
    w = torch.randn(96, 1152, dtype=torch.float64)
    y = x @ w.t()
    assert torch.allclose(F.blocked_hadamard(x, 128) @ F.blocked_hadamard(w, 128).t(), y, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("block", [3, 48, 2048])
def test_blocked_hadamard_rejects_bad_block(block):
    with pytest.raises(ValueError):
        F.blocked_hadamard(torch.randn(2, 1152), block)


def test_fp8_per_token_error_level_and_scale(x):
    q, s = F.quantize_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (37, 1) and s.dtype == torch.float32
    assert torch.allclose(s.double(), x.abs().amax(-1, keepdim=True) / 448, rtol=1e-6)
    assert q.float().abs().amax(-1).eq(448).all()  # the row maximum maps to the format maximum
    err = rel(F.dequantize_per_token(q, s), x)
    assert 0.005 < err < 0.05  # e4m3: 3 mantissa bits


def test_int8_per_token_error_level_and_rounding(x):
    q, s = F.quantize_int8_per_token(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    err = rel(F.dequantize_per_token(q, s), x)
    expected = float((s.double().square().mean() / 12).sqrt() / x.square().mean().sqrt())  # uniform rounding noise
    assert 0.7 * expected < err < 1.3 * expected
    # half-to-even rounding on exact ties
    t = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])
    q, _ = F.quantize_int8_per_token(t)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_zero_rows_quantize_to_zero_without_nan():
    z = torch.zeros(3, 64)
    for fn in (F.quantize_fp8_per_token, F.quantize_int8_per_token):
        q, s = fn(z)
        assert torch.isfinite(s).all() and (q.float() == 0).all()


def test_per_channel_weight_quantizers():
    w = torch.randn(96, 256, dtype=torch.float64) * torch.logspace(-2, 1, 96, dtype=torch.float64)[:, None]
    for fn, lim in ((F.quantize_fp8_per_channel, 0.05), (F.quantize_int8_per_channel, 0.02)):
        q, s = fn(w)
        assert s.shape == (96,)
        assert rel(q.float() * s[:, None], w) < lim


def test_int4_pack_unpack_round_trip_and_layout():
    q = torch.randint(-8, 8, (17, 256), dtype=torch.int8)
    p = F.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (17, 128)
    assert torch.equal(F.unpack_int4(p), q)
    # element 2i in the low nibble, 2i+1 in the high nibble, offset-binary
    assert int(p[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)


def test_int4_pack_rejects_out_of_range_and_odd():
    with pytest.raises(ValueError):
        F.pack_int4(torch.tensor([[8, 0]]))
    with pytest.raises(ValueError):
        F.pack_int4(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("block", [64, 128])
def test_int4_blockwise_error_level(block):
    w = torch.randn(64, 1152, dtype=torch.float64)
    p, s = F.quantize_int4_blockwise(w, block)
    assert p.shape == (64, 576) and s.shape == (64, 1152 // block)
    err = rel(F.dequantize_int4_blockwise(p, s), w)
    assert 0.05 < err < 0.2  # 4-bit symmetric, step = absmax/7


def test_e2m1_rounding_grid_and_ties():
    vals = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.75, -6.5])
    assert F.round_to_e2m1(vals).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -6.0]


def test_nvfp4_simulated_round_trip(x):
    assert F.NVFP4_SIMULATED_ON_HOPPER
    vals, bs, gs = F.quantize_nvfp4(x)
    assert bs.dtype == torch.float8_e4m3fn and bs.shape == (37, 1152 // 16) and gs.dim() == 0
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    assert torch.isin(vals.abs().double(), grid).all()
    err = rel(F.fake_quant_nvfp4(x), x)
    assert 0.05 < err < 0.2
    assert math.isclose(float(gs), float(x.abs().max()) / (448 * 6), rel_tol=1e-6)
