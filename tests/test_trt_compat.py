"""The one module that differs between full TensorRT and TensorRT-RTX: targets, capabilities, builder config."""

from __future__ import annotations

import pytest

from qc_compile.errors import UserError
from qc_compile.trt_compat import capabilities, configure, create_network, parse_target, refusal_reason, runnable_reason


def test_parse_target():
    t = parse_target("rtx:sm89")
    assert (t.backend, t.sm, t.dir_name, t.is_trt) == ("tensorrt_rtx", 89, "rtx-sm89", True)
    assert parse_target("trt") == parse_target("trt").__class__("trt", "tensorrt", 90)
    assert parse_target("TRT:SM100").sm == 100
    assert parse_target("torch").backend == "torch" and not parse_target("torch").is_trt
    assert parse_target("any", allow_any=True).backend == "any"
    for bad in ("rtx:sm90", "rtx", "cuda", "trt:sm70", "any"):
        with pytest.raises(UserError):
            parse_target(bad)


@pytest.mark.parametrize("target,w,a,ok", [
    ("rtx:sm89", "fp8_e4m3", "fp8_e4m3", True),
    ("rtx:sm89", "nvfp4", "nvfp4", False),
    ("rtx:sm120", "nvfp4", "nvfp4", True),
    ("rtx:sm86", "fp8_e4m3", "fp8_e4m3", False),
    ("rtx:sm86", "int4_b128", "bf16", True),
    ("rtx:sm86", "int8", "bf16", True),
    ("rtx:sm89", "int8", "int8", False),  # no INT8-activation GEMM in the TensorRT-RTX support matrix
    ("trt", "int8", "int8", True),
    ("trt", "nvfp4", "nvfp4", False),
    ("trt:sm100", "nvfp4", "nvfp4", True),
    ("trt:sm80", "fp8_e4m3", "bf16", False),
    ("rtx:sm89", "int4_b64", "fp8_e4m3", False),  # W4A8: TensorRT-RTX 1.7 Myelin internal error
    ("trt", "int4_b64", "fp8_e4m3", False),  # W4A8: TensorRT's INT4 is weight-only (TensorRT-LLM runs W4A8)
    ("trt:sm89", "int4_b128", "int8", False),
    ("trt", "int4_b128", "bf16", True),  # W4A16
    ("rtx:sm89", "fp8_e4m3", "bf16", True),
    ("trt", "int8", "fp8_e4m3", False),  # mixed 8-bit families
    ("rtx:sm120", "int6_sim", "bf16", False),
    ("torch", "int6_sim", "int6_sim", True),
    ("torch", "nvfp4", "int8", True),
])
def test_capability_table(target, w, a, ok):
    why = refusal_reason(parse_target(target), w, a)
    assert (why is None) == ok, why
    if not ok:
        assert len(why) > 20


def test_refusal_messages_say_why():
    assert "Blackwell" in refusal_reason(parse_target("rtx:sm89"), "nvfp4", "nvfp4")
    assert "support matrix" in refusal_reason(parse_target("rtx:sm120"), "bf16", "int8")
    assert "simulated" in refusal_reason(parse_target("trt"), "int6_sim", "bf16")
    assert "weight-only" in refusal_reason(parse_target("trt"), "int4_b64", "fp8_e4m3")
    w, a = capabilities(parse_target("rtx:sm120"))
    assert w["nvfp4"] == "FP4 GEMM" and "int8" not in a


def test_rtx_builder_config_and_network():
    trt = pytest.importorskip("tensorrt_rtx")
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    net = create_network(trt, builder)
    assert net is not None
    cfg = builder.create_builder_config()
    configure(trt, cfg, parse_target("rtx:sm120"))
    assert cfg.num_compute_capabilities == 1 and cfg.get_compute_capability(0) == trt.ComputeCapability.SM120


def test_runnable_reason_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert runnable_reason(parse_target("rtx:sm89")) == "no CUDA GPU visible"
