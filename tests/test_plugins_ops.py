"""torch.ops.qc on CPU: numerics against float64 math, fake kernels, opcheck, torch.compile, cache statistics."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qc_compile.plugins import cache_stats as CS
from qc_compile.plugins import formats as F
from qc_compile.plugins import ops  # noqa: F401  (registers torch.ops.qc)
from qc_compile.plugins import reference as R

qc = torch.ops.qc
FP8 = torch.float8_e4m3fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def rnd(*shape, scale=1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale + 0.1).to(dtype)


def ln64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()


@pytest.mark.parametrize("block", [0, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_quant_fp8_vs_float64(block, dtype):
    x = rnd(4, 9, 256, scale=2.0, dtype=dtype)
    q, s = qc.rotate_quant_fp8(x, block)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (4, 9, 1) and s.dtype == torch.float32
    assert rel(q.float() * s, F.blocked_hadamard(x.double(), block)) < 0.05


@pytest.mark.parametrize("block", [0, 64])
def test_rotate_quant_int8_vs_float64(block):
    x = rnd(33, 128, scale=2.0)
    q, s = qc.rotate_quant_int8(x, block)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    exact = F.blocked_hadamard(x.double(), block)
    expected = float((s.double().square().mean() / 12).sqrt() / exact.square().mean().sqrt())
    assert rel(q.float() * s, exact) < 1.3 * expected


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("block", [0, 32])
def test_modulate_quant_fp8_vs_float64(per_token, block):
    b, t, c = 2, 7, 128
    x = rnd(b, t, c, scale=3.0, dtype=torch.bfloat16)
    shift = rnd(b, t if per_token else 1, c, scale=0.5)
    scale = rnd(b, t if per_token else 1, c, scale=0.3)
    q, s = qc.modulate_quant_fp8(x, shift, scale, block)
    exact = F.blocked_hadamard(ln64(x) * (1 + scale.double()) + shift.double(), block)
    assert rel(q.float() * s, exact) < 0.05
    # bit-identical to the unfused composition it replaces
    q2, s2 = F.quantize_fp8_per_token(F.blocked_hadamard(R.ln_modulate(x, shift, scale), block))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


def test_gelu_rotate_quant_fp8_vs_float64():
    h = rnd(17, 256, scale=2.0, dtype=torch.bfloat16)
    q, s = qc.gelu_rotate_quant_fp8(h, 128)
    exact = F.blocked_hadamard(torch.nn.functional.gelu(h.double(), approximate="tanh"), 128)
    assert rel(q.float() * s, exact) < 0.05


@pytest.mark.parametrize("block", [0, 64])
def test_fp8_linear_end_to_end_vs_float64(block):
    """Rotated FP8 activations x rotated FP8 weights reproduce the float64 linear at the FP8 error level."""
    x, w, bias = rnd(3, 11, 256, scale=2.0), rnd(48, 256, scale=0.05), rnd(48)
    xq, xs = qc.rotate_quant_fp8(x, block)
    wq, ws = F.quantize_fp8_per_channel(F.blocked_hadamard(w, block))
    y = qc.fp8_linear(xq, xs, wq, ws, bias, torch.float32)
    assert y.shape == (3, 11, 48) and y.dtype == torch.float32
    assert rel(y, x.double() @ w.double().t() + bias.double()) < 0.06
    # the epilogue itself is exact fp32 arithmetic on the dequantized operands
    exact = (xq.double() * xs.double()) @ (wq.double() * ws.double()[:, None]).t() + bias.double()
    assert rel(y, exact) < 1e-6
    assert qc.fp8_linear(xq, xs, wq, ws, None, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("act", ["fp8", "int8"])
def test_w4a8_linear_vs_float64(act):
    x, w = rnd(20, 256, scale=2.0), rnd(40, 256, scale=0.05)
    xq, xs = (qc.rotate_quant_fp8 if act == "fp8" else qc.rotate_quant_int8)(x, 0)
    wp, gs = F.quantize_int4_blockwise(w, 64)
    y = qc.w4a8_linear(xq, xs, wp, gs, None, torch.float32)
    exact = (xq.double() * xs.double()) @ F.dequantize_int4_blockwise(wp, gs).double().t()
    assert rel(y, exact) < 1e-6
    assert rel(y, x.double() @ w.double().t()) < 0.2  # 4-bit weights


def _stats64(x, c, r, o):
    x, c, r, o = (t.double().reshape(t.shape[0], -1) for t in (x, c, r, o))
    return torch.stack([(r - c).abs().sum(1), c.abs().sum(1), r.abs().sum(1), (r * r).sum(1), (c * c).sum(1),
                        (r * c).sum(1), x.abs().sum(1), (x * x).sum(1), (o * o).sum(1), (x * o).sum(1)], 1)


def test_cache_stats_compute_mode_vs_float64():
    x, c = rnd(2, 5, 64, scale=2.0), rnd(2, 5, 64, scale=0.3)
    o = x + c * 1.2 + rnd(2, 5, 64, scale=0.01)
    y, st = qc.cache_stats_apply(x, c, o)
    assert st.shape == (2, CS.NUM_STATS) and st.dtype == torch.float32
    assert torch.allclose(y.double(), (o - x).double(), atol=1e-6)
    exact = _stats64(x, c, o - x, o)
    assert rel(st, exact) < 1e-6
    r64, c64 = (o - x).double().reshape(2, -1), c.double().reshape(2, -1)
    assert torch.allclose(CS.rel_l1(st), (r64 - c64).abs().sum(1) / c64.abs().sum(1), rtol=1e-5)
    assert torch.allclose(CS.cos_residual(st), torch.nn.functional.cosine_similarity(r64, c64), rtol=1e-5)
    x64, o64 = x.double().reshape(2, -1), o.double().reshape(2, -1)
    assert torch.allclose(CS.cos_in_out(st), torch.nn.functional.cosine_similarity(x64, o64), rtol=1e-5)
    assert torch.allclose(CS.rel_change(st), (o64 - x64).abs().sum(1) / x64.abs().sum(1), rtol=1e-5)
    assert torch.allclose(CS.res_norm(st), r64.norm(dim=1), rtol=1e-5)


def test_cache_stats_apply_mode_and_consistency():
    x, c = rnd(3, 40, scale=2.0, dtype=torch.bfloat16), rnd(3, 40, scale=0.5, dtype=torch.bfloat16)
    y, st = qc.cache_stats_apply(x, c, None)
    assert y.dtype == torch.bfloat16 and torch.equal(y, (x.float() + c.float()).to(torch.bfloat16))
    assert float(st[:, CS.IDX["l1_diff"]].abs().max()) == 0.0
    assert torch.allclose(CS.cached_norm(st), c.double().norm(dim=1), rtol=1e-5)
    # computing with the same residual gives the same statistics as applying it
    _, st2 = qc.cache_stats_apply(x, c, (x.float() + c.float()))
    assert torch.allclose(st2[:, 1:], st[:, 1:], rtol=1e-2)


def test_cache_stats_without_cache_and_batch_reduction():
    x, o = rnd(2, 30), rnd(2, 30)
    y, st = qc.cache_stats_apply(x, None, o)
    assert torch.isinf(CS.rel_l1(st)).all()  # nothing cached: policies must refresh
    tot = CS.reduce_batch(st)
    _, st_all = qc.cache_stats_apply(x.reshape(1, -1), None, o.reshape(1, -1))
    assert torch.allclose(tot, st_all[0].double(), rtol=1e-5)


def test_validation_errors():
    x = rnd(2, 3, 96)
    with pytest.raises(ValueError):
        qc.rotate_quant_fp8(x, 64)  # 64 does not divide 96
    with pytest.raises(ValueError):
        qc.rotate_quant_fp8(x, 24)  # not a power of two
    with pytest.raises(ValueError):
        qc.modulate_quant_fp8(x, rnd(2, 2, 96), rnd(2, 2, 96), 0)  # S not in {1, T}
    wq, ws = F.quantize_fp8_per_channel(rnd(8, 64))
    xq, xs = qc.rotate_quant_fp8(rnd(4, 96), 0)
    with pytest.raises(ValueError):
        qc.fp8_linear(xq, xs, wq, ws, None, torch.float32)  # K mismatch
    with pytest.raises(ValueError):
        qc.cache_stats_apply(x, None, None)


def _samples():
    x = rnd(2, 5, 128, dtype=torch.bfloat16)
    sh, sc = rnd(2, 1, 128, dtype=torch.bfloat16), rnd(2, 1, 128, dtype=torch.bfloat16)
    xq, xs = F.quantize_fp8_per_token(x)
    wq, ws = F.quantize_fp8_per_channel(rnd(32, 128))
    wp, gs = F.quantize_int4_blockwise(rnd(32, 128), 64)
    bias = rnd(32)
    return [
        (qc.rotate_quant_fp8, (x, 64)), (qc.rotate_quant_int8, (x, 0)), (qc.modulate_quant_fp8, (x, sh, sc, 32)),
        (qc.gelu_rotate_quant_fp8, (x, 128)), (qc.fp8_linear, (xq, xs, wq, ws, bias, torch.bfloat16)),
        (qc.fp8_linear, (xq, xs, wq, ws, None, torch.float32)), (qc.w4a8_linear, (xq, xs, wp, gs, bias, torch.float32)),
        (qc.cache_stats_apply, (x, x * 0.1, x * 1.1)), (qc.cache_stats_apply, (x, x * 0.1, None)),
    ]


@pytest.mark.parametrize("i", range(9))
def test_fake_kernels_match_real_shapes_and_dtypes(i):
    op, args = _samples()[i]
    real = op(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


@pytest.mark.parametrize("i", range(9))
def test_opcheck(i):
    op, args = _samples()[i]
    fp8_inputs = any(isinstance(a, torch.Tensor) and a.dtype == FP8 for a in args)
    # opcheck's schema test multiplies inputs, which torch does not implement for float8 on CPU
    utils = ("test_faketensor", "test_aot_dispatch_static") if fp8_inputs else (
        "test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(op, args, test_utils=utils)


def test_torch_compile_traces_ops_fullgraph():
    wq, ws = F.quantize_fp8_per_channel(F.blocked_hadamard(rnd(64, 128), 64))

    def f(x, shift, scale):
        q, s = qc.modulate_quant_fp8(x, shift, scale, 64)
        y = qc.fp8_linear(q, s, wq, ws, None, torch.float32)
        return torch.nn.functional.gelu(y)

    x, sh, sc = rnd(2, 6, 128), rnd(2, 1, 128), rnd(2, 1, 128)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, sh, sc)
    assert torch.equal(got, f(x, sh, sc))


def test_torch_compile_inductor_cpu():
    def f(x):
        y, st = qc.cache_stats_apply(x, x * 0.5, None)
        return y * 2, CS.rel_l1(st)

    x = rnd(2, 64)
    torch._dynamo.reset()
    y, r = torch.compile(f, fullgraph=True)(x)
    y2, r2 = f(x)
    assert torch.allclose(y, y2) and torch.allclose(r, r2)
