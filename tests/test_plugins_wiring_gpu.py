"""The ``qc::`` TensorRT plugins' ``enqueue`` path on the GPU, driven as TensorRT drives a plugin layer
(:mod:`trt_standin`: creator from the node's fields, output types and shapes, format negotiation, engine
(de)serialization of the fields, ``attach_to_context``, ``on_shape_change``, ``enqueue`` with device pointers and
the CUDA stream), against the torch ops called directly on the same device tensors; skipped without CUDA.

The plugin classes are the ones ``trt_plugins.build_trt_classes`` builds for TensorRT, built against the stand-in
module (TensorRT itself is not needed). ``enqueue`` runs the same ``torch.ops.qc`` kernels on TensorRT's stream, so
the outputs must be bit-identical; the chained RotateQuantFP8 -> FP8Linear must also be a correct linear at the FP8
error level against float64 math.
"""

from __future__ import annotations

import pytest
import torch
from trt_standin import DataType, build_layer, enqueue, plugin_api

from qc_compile.plugins import ops  # noqa: F401  (registers torch.ops.qc)
from qc_compile.plugins import formats as F
from qc_compile.plugins import trt_plugins as T

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
qc = torch.ops.qc
TRT = {torch.float32: DataType.FLOAT, torch.bfloat16: DataType.BF16, torch.float16: DataType.HALF,
       torch.float8_e4m3fn: DataType.FP8}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _run(op: str, attrs: dict, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    trt = plugin_api()
    T.register_plugins(trt)
    layer = build_layer(trt, op, attrs, [tuple(t.shape) for t in inputs], [TRT[t.dtype] for t in inputs])
    return enqueue(layer, [t.contiguous() for t in inputs])


@pytest.fixture
def g() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(1234)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block,prologue", [(0, 0), (128, 0), (64, 1), (0, 2), (128, 2)])
def test_rotate_quant_enqueue_matches_torch_ops(g, dtype, block, prologue) -> None:
    B, T_, K = 2, 333, 1152
    x = (torch.randn(B, T_, K, device="cuda", generator=g) * 3).to(dtype)
    x[0, 5, 7] = 40.0  # an outlier channel
    if prologue == 2:
        sh = (torch.randn(B, 1, K, device="cuda", generator=g) * 0.5).to(dtype)
        sc = (torch.randn(B, 1, K, device="cuda", generator=g) * 0.2).to(dtype)
        got = _run("RotateQuantFP8", {"block": block, "prologue": 2}, [x, sh, sc])
        want = qc.modulate_quant_fp8(x, sh, sc, block)
    elif prologue == 1:
        got = _run("RotateQuantFP8", {"block": block, "prologue": 1}, [x])
        want = qc.gelu_rotate_quant_fp8(x, block)
    else:
        got = _run("RotateQuantFP8", {"block": block, "prologue": 0}, [x])
        want = qc.rotate_quant_fp8(x, block)
    assert got[0].dtype == torch.float8_e4m3fn and got[1].dtype == torch.float32
    assert _same(got[0], want[0]) and _same(got[1], want[1])
    assert not torch.isnan(got[1]).any()


@pytest.mark.parametrize("out_dtype,has_bias", [(0, 1), (2, 1), (1, 0), (2, 0)])
def test_fp8_linear_enqueue_matches_torch_ops_and_float64(g, out_dtype, has_bias) -> None:
    K, N = 1152, 3456
    x = torch.randn(4, 477, K, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, device="cuda", generator=g) / K ** 0.5
    bias = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
    wq, ws = F.quantize_fp8_per_channel(w)
    xq, xs = _run("RotateQuantFP8", {"block": 0, "prologue": 0}, [x])
    ins = [xq, xs, wq.contiguous(), ws.float().contiguous()] + ([bias] if has_bias else [])
    (y,) = _run("FP8Linear", {"has_bias": has_bias, "out_dtype": out_dtype}, ins)
    out = getattr(torch, T.OUT_DTYPE_CODES[out_dtype])
    want = qc.fp8_linear(xq, xs, wq, ws.float(), bias if has_bias else None, out)
    assert y.dtype == out and y.shape == (4, 477, N) and _same(y, want)
    ref = x.double() @ w.double().T + (bias.double() if has_bias else 0)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < 0.06, err  # per-token x per-channel FP8 (~3.7% measured on the H200), not a broken GEMM


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_stats_enqueue_matches_torch_ops(g, mode, dtype) -> None:
    x = torch.randn(2, 1590, 1152, device="cuda", generator=g).to(dtype)
    cached = (torch.randn_like(x, dtype=torch.float32) * 0.3).to(dtype)
    new = (x.float() + torch.randn_like(x, dtype=torch.float32) * 0.3).to(dtype)
    ins = {0: [x, cached], 1: [x, cached, new], 2: [x, new]}[mode]
    ref_args = {0: (x, cached, None), 1: (x, cached, new), 2: (x, None, new)}[mode]
    y, stats = _run("CacheStatsApply", {"mode": mode}, ins)
    y2, stats2 = qc.cache_stats_apply(*ref_args)
    assert _same(y, y2) and _same(stats, stats2) and stats.shape == (2, T.NUM_CACHE_STATS)
    assert stats.abs().sum() > 0
