"""TensorRT's documented explicit-quantization rules as a checker (qc_compile/trt_rules.py): each rule fires on a
small graph that breaks it and stays silent on the graphs the passes emit (issue 13, point 4). The graphs build
under TensorRT-RTX in CI (tests/test_precision_graphs.py); full TensorRT is not installable here."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from qc_compile.trt_rules import check_graph

K, N = 128, 64


def _init(name, a):
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def linear(weight="fp8", act="fp8", *, zp=0.0, act_scale=(0.1,), w_axis=1, block=None, opset=21,
           scale_input=False) -> onnx.ModelProto:
    """x[2, 8, K] -> (Q/DQ act) -> MatMul(., DQ(w)) -> y, the pattern insert_qdq emits."""
    rng = np.random.default_rng(0)
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", T.FLOAT, [2, 8, K])]
    x = "x"
    if act in ("fp8", "int8"):
        zdt = ml_dtypes.float8_e4m3fn if act == "fp8" else np.int8
        inits += [_init("xs", np.array(act_scale, np.float32).reshape(() if len(act_scale) == 1 else (-1,))),
                  _init("xz", np.full((), zp, np.float32).astype(zdt))]
        sname = "xs"
        if scale_input:
            inputs.append(helper.make_tensor_value_info("xs_in", T.FLOAT, []))
            sname = "xs_in"
        nodes += [helper.make_node("QuantizeLinear", ["x", sname, "xz"], ["xq"], name="xq"),
                  helper.make_node("DequantizeLinear", ["xq", sname], ["xd"], name="xd")]
        x = "xd"
    if act == "int4":
        inits += [_init("xs", np.array(0.1, np.float32)), _init("xz", np.zeros((), ml_dtypes.int4))]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq"),
                  helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"], name="xd")]
        x = "xd"
    if weight == "fp8":
        inits += [_init("wq", rng.standard_normal((K, N)).astype(ml_dtypes.float8_e4m3fn)),
                  _init("ws", np.full((N,), 0.01, np.float32))]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="wd", axis=w_axis))
    elif weight == "int4":
        b = block or 64
        inits += [_init("wq", rng.integers(-8, 8, (K, N)).astype(ml_dtypes.int4)),
                  _init("ws", np.full((K // b, N), 0.01, np.float32))]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="wd", axis=0, block_size=b))
    nodes.append(helper.make_node("MatMul", [x, "w"], ["y"], name="mm"))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", T.FLOAT, [2, 8, N])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _errors(model, backend="tensorrt"):
    return check_graph(model, backend)["errors"]


def test_the_emitted_patterns_pass():
    assert _errors(linear("fp8", "fp8")) == []
    assert _errors(linear("int4", None)) == []  # W4A16
    assert _errors(linear("int4", None, block=128)) == []
    assert check_graph(linear("fp8", "fp8"))["notes"] == []


@pytest.mark.parametrize("model,rule", [
    (lambda: linear(zp=1.0), "SYM"),
    (lambda: linear(scale_input=True), "CONST"),
    (lambda: linear(act_scale=(0.0,)), "CONST"),
    (lambda: linear(act_scale=tuple([0.1] * K)), "ACT"),  # per-channel/per-token activation scale
    (lambda: linear(w_axis=0), "GRAIN"),  # per-channel scale of N values on the K axis
    (lambda: linear("int4", None, block=32), "INT4"),  # INT4 blocks are 64 or 128
    (lambda: linear("int4", "int4"), "INT4"),  # INT4 activations
    (lambda: linear("fp8", "fp8", opset=17), "OPSET"),
])
def test_each_rule_fires(model, rule):
    errs = _errors(model())
    assert errs and any(e.startswith(rule) for e in errs), errs


def test_weight_only_fp8_is_a_note_for_full_tensorrt_only():
    m = linear("fp8", None)
    assert _errors(m) == [] and check_graph(m)["notes"][0].startswith("GEMM")
    assert check_graph(m, "tensorrt_rtx")["notes"] == []


def test_fp4_dynamic_quantize_rules():
    x = helper.make_tensor_value_info("x", T.FLOAT, [2, 8, 4, K])  # 4-D: not allowed
    n = helper.make_node("TRT_FP4DynamicQuantize", ["x", "g"], ["xf4", "xs8"], name="dq", domain="trt", axis=-1,
                         block_size=32, scale_type=T.FLOAT8E4M3FN)
    g = helper.make_graph([n], "g", [x], [helper.make_tensor_value_info("xf4", T.FLOAT4E2M1, None)],
                          [_init("g", np.array(0.5, np.float32))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("trt", 1)])
    errs = _errors(m)
    assert any("rank 4" in e for e in errs) and any("block_size 32" in e for e in errs)
