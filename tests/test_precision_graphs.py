"""Precision-true graphs: the cast pass (float32 Q/DQ unit -> bf16 around the same Q/DQ), the dtype audit that checks
it against the plan, and TensorRT-RTX CPU builds of the result (issue 13, point 1)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from compile_helpers import built, calibrated
from qc_compile.build import precision_graph
from qc_compile.errors import UserError
from qc_compile.onnx_utils import ort_session
from qc_compile.passes.cast_precision import pass_cast_precision
from qc_compile.passes.common import reset_uids
from qc_compile.passes.dtype_audit import audit, check
from qc_compile.passes.insert_qdq import pass_insert_qdq
from qc_compile.plan import load_plan
from qc_compile.trt_compat import Target, compute_dtype, parse_target
from qc_compile.trt_rules import check_graph
from qc_compile.workdir import WorkDir, read_model_info


def _fp32_qdq(unit: str, fmt: str = "fp8_e4m3", weight: str | None = None, activation: str | None = None):
    """(float32 Q/DQ graph of ``unit``, the plan entries used) from the cached calibrated work dir."""
    from qc_compile.models.units import is_block

    # the embed and final units' linears stay bf16 at calibrate's default: quantize them for their graphs' tests
    work = WorkDir(calibrated(fmt) if is_block(unit) else calibrated(fmt, "--quantize-embed-final"))
    info = read_model_info(work)
    entries = load_plan(work.plan_json, model_info=info).resolve("default")
    if weight is not None:
        entries = {n: dataclasses.replace(e, weight=weight, activation=activation or "bf16") for n, e in
                   entries.items()}
    reset_uids()
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(work.fp_onnx(unit))))
    graph = pass_insert_qdq(gs.import_onnx(proto), entries)
    out = gs.export_onnx(graph)
    names = {li["name"] for li in info.unit(unit)["linears"]}
    return out, {n: e for n, e in entries.items() if n in names}


def _ops(model, op):
    return [n for n in model.graph.node if n.op_type == op]


def _feed(model, seed=0):
    rng = np.random.default_rng(seed)
    feed = {}
    for i in model.graph.input:
        shape = [2 if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        feed[i.name] = rng.random(shape) > 0.3 if i.type.tensor_type.elem_type == TensorProto.BOOL else \
            rng.standard_normal(shape).astype(np.float32)
    return feed


@pytest.mark.parametrize("unit", ["spatial_0", "temporal_0"])
def test_cast_pass_turns_a_float32_unit_into_bf16_with_its_qdq_kept(unit):
    fp32, entries = _fp32_qdq(unit)
    before = audit(fp32, half="bfloat16", linears=entries, unit=unit)
    assert before["float32_unexcepted"] > 50 and before["violations"]  # today's graph: FP32 everywhere
    report: dict = {}
    half = precision_graph(fp32, "bfloat16", report=report)
    after = audit(half, half="bfloat16", linears=entries, unit=unit)
    assert after["violations"] == [] and after["float32_unexcepted"] == 0
    assert set(after["float32_by_category"]) <= {"io", "shape", "norm_stats"}
    assert after["float32_by_category"]["norm_stats"] == 14  # q_norm + k_norm: Cast, Pow, Mean, Add, Sqrt, Div, Mul
    # the Q/DQ are all still there, same codes, now with bf16 scales
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert len(_ops(half, op)) == len(_ops(fp32, op)) > 0
    inits = {i.name: i for i in half.graph.initializer}
    for dq in _ops(half, "DequantizeLinear"):
        if dq.input[0] in inits:  # a weight: FP8 codes unchanged, scale in bf16
            assert inits[dq.input[0]].data_type == TensorProto.FLOAT8E4M3FN
    gemms = [o for o in after["ops"] if "linear" in o]
    assert len(gemms) == len(entries) and all(o["compute"] == "w:fp8_e4m3 a:fp8_e4m3" for o in gemms)
    assert all(o["out"] == "bfloat16" for o in gemms)
    # graph interface unchanged (float32 in and out)
    assert [(i.name, i.type.tensor_type.elem_type) for i in half.graph.input] == \
        [(i.name, i.type.tensor_type.elem_type) for i in fp32.graph.input]
    onnx.shape_inference.infer_shapes(half, strict_mode=True)  # every edge type-consistent
    assert check_graph(half)["errors"] == []  # TensorRT's documented Q/DQ rules (full TensorRT too)
    # same function: the bf16 graph (ONNX reference evaluator) against the float32 graph (onnxruntime)
    feed = _feed(fp32)
    ref = ort_session(fp32).run(None, feed)
    got = ReferenceEvaluator(half).run(None, feed)
    for r, g in zip(ref, got):
        assert g.dtype == np.float32
        rel = float(np.abs(g - r).max() / np.abs(r).max())
        assert 1e-4 < rel < 5e-2, rel  # bf16 rounding (and FP8 codes flipping with it), not a different function


def test_bf16_only_plan_is_close_to_float32():
    fp32, entries = _fp32_qdq("spatial_1", weight="bf16")
    half = precision_graph(fp32, "bfloat16")
    assert not _ops(half, "DequantizeLinear")
    res = audit(half, half="bfloat16", linears=entries, unit="spatial_1")
    assert res["violations"] == [] and all(o["compute"] == "w:bfloat16 a:bfloat16" for o in res["ops"] if "linear" in o)
    feed = _feed(fp32, 1)
    (ref,), (got,) = ort_session(fp32).run(None, feed), ReferenceEvaluator(half).run(None, feed)
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 2e-2


def test_embed_keeps_the_timestep_sinusoid_in_float32():
    fp32, entries = _fp32_qdq("embed")
    half = precision_graph(fp32, "bfloat16")
    res = audit(half, half="bfloat16", linears=entries, unit="embed")
    assert res["violations"] == []
    sin = [o for o in res["ops"] if o["op"] in ("Sin", "Cos")]
    assert sin and all(o["compute"] == "float32" and o["fp32_category"] == "sinusoid" for o in sin)
    convs = [o for o in res["ops"] if o["op"] == "Conv"]
    assert convs and all(o["compute"] == "bfloat16" for o in convs)


def test_nvfp4_graph_follows_the_rules():
    fp32, entries = _fp32_qdq("final", "nvfp4")
    half = precision_graph(fp32, "bfloat16")
    assert check_graph(half)["errors"] == []
    res = audit(half, half="bfloat16", linears=entries, unit="final")
    assert res["violations"] == [] and [o["compute"] for o in res["ops"] if "linear" in o] == ["w:fp4_e2m1 a:nvfp4"]


def test_weight_only_int4_and_fp16_targets():
    fp32, entries = _fp32_qdq("final", weight="int4_b64")
    half = precision_graph(fp32, "float16")
    res = audit(half, half="float16", linears=entries, unit="final")
    assert res["violations"] == []
    assert [o["compute"] for o in res["ops"] if "linear" in o] == ["w:int4 a:float16"]
    assert check_graph(half)["errors"] == []
    # the wrong plan (fp8 activations) is caught: the GEMM runs wider than that plan says
    wrong = {n: dataclasses.replace(e, activation="fp8_e4m3") for n, e in entries.items()}
    bad = audit(half, half="float16", linears=wrong, unit="final")
    assert any("the plan says W:int4_b64 A:fp8_e4m3" in v for v in bad["violations"])


def test_fp16_conversion_clips_constants_to_the_finite_range():
    x = gs.Variable("x", dtype=np.float32, shape=[2, 4])
    y = gs.Variable("y", dtype=np.float32, shape=[2, 4])
    mid = gs.Variable("m", dtype=np.float32, shape=[2, 4])
    big = gs.Constant("big", np.full((4,), -np.finfo(np.float32).max, dtype=np.float32))
    g = gs.Graph(nodes=[gs.Node("Add", name="add", inputs=[x, big], outputs=[mid]),
                        gs.Node("Relu", name="relu", inputs=[mid], outputs=[y])], inputs=[x], outputs=[y], opset=19)
    out = gs.export_onnx(pass_cast_precision(g, "float16"))
    vals = [onnx.numpy_helper.to_array(i) for i in out.graph.initializer]
    assert vals[0].dtype == np.float16 and np.all(vals[0] == -np.finfo(np.float16).max)
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert [n.op_type for n in out.graph.node].count("Cast") == 2  # io: in and out


def test_audit_fails_a_graph_with_a_deliberate_float32_matmul():
    fp32, entries = _fp32_qdq("spatial_0")
    half = precision_graph(fp32, "bfloat16")
    # widen the first attention BMM: cast both inputs to float32 and its output back to bf16
    nodes = list(half.graph.node)
    k, mm = next((k, n) for k, n in enumerate(nodes) if n.op_type == "MatMul" and "attn/MatMul" in n.name)
    wide = [onnx.helper.make_node("Cast", [mm.input[i]], [f"wide{i}"], to=TensorProto.FLOAT, name=f"wide_cast{i}")
            for i in range(2)]
    back = onnx.helper.make_node("Cast", [f"{mm.output[0]}_f"], [mm.output[0]], to=TensorProto.BFLOAT16, name="back")
    mm.input[0], mm.input[1], mm.output[0] = "wide0", "wide1", f"{mm.output[0]}_f"
    del half.graph.node[:]
    half.graph.node.extend(nodes[:k] + wide + [mm, back] + nodes[k + 1:])
    del half.graph.value_info[:]
    sorted_model = half
    res = audit(sorted_model, half="bfloat16", linears=entries, unit="spatial_0")
    assert any(mm.name in v and "float32" in v for v in res["violations"])
    with pytest.raises(UserError, match="spatial_0") as e:
        check(res, where="onnx/q/spatial_0.onnx")
    assert mm.name in str(e.value)


def test_audit_refuses_a_mis_tagged_exception():
    fp32, entries = _fp32_qdq("final")
    for n in fp32.graph.node:  # claim the float32 LayerNorm is an RMSNorm statistic: not an allowed op for it
        if n.op_type == "LayerNormalization":
            n.doc_string = "qc.fp32:norm_stats"
    res = audit(fp32, half="bfloat16", linears=entries, unit="final")
    assert any("does not allow LayerNormalization" in v for v in res["violations"])


def test_compute_dtype_per_target():
    assert compute_dtype(parse_target("rtx:sm89")) == compute_dtype(parse_target("trt")) == "bfloat16"
    assert compute_dtype(parse_target("rtx:sm86")) == "bfloat16"
    assert compute_dtype(Target("rtx:sm75", "tensorrt_rtx", 75)) == "float16"  # Turing: no bf16
    assert compute_dtype(parse_target("torch")) == "float32"


def test_rtx_sm89_build_writes_bf16_engines_with_audit_and_layer_report():
    work = WorkDir(built("fp8_e4m3", "rtx:sm89"))
    man = json.loads(work.manifest_json.read_text())["targets"]["rtx:sm89"]
    n = 0
    for unit, rec in man["units"].items():
        for v in rec["variants"].values():
            if "same_as" in v:
                continue
            n += 1
            assert v["dtype"] == "bfloat16"
            graph = onnx.load(str(work.root / v["onnx"][0]["path"]))
            assert any(i.data_type == TensorProto.BFLOAT16 for i in graph.graph.initializer)
            assert "ort.onnx" in v["ort_onnx"][0]["path"]  # onnxruntime runs the float32 twin
            reports = {r["path"].rsplit(".", 2)[-2]: work.root / r["path"] for r in v["reports"]}
            dt = json.loads(reports["dtypes"].read_text())
            assert dt["unit"] == unit and dt["violations"] == [] and dt["float32_unexcepted"] == 0
            layers = json.loads(reports["layers"].read_text())
            outs = layers["output_dtypes"]
            assert layers["layers"] and outs.get("BFloat16", 0) + outs.get("FP8", 0) > outs.get("Float", 0)
            if unit.startswith(("spatial", "temporal")):  # attention fused into one MHA kernel (FP32: 3 kernels)
                assert sum("_gemm_mha" in la["name"] for la in layers["layers"]) == 2
                if v is rec["variants"]["default"]:
                    assert outs.get("FP8", 0) >= 7  # the W8A8 GEMMs read FP8 activations
    assert n == 18  # 10 units x (default, high); embed and final are bf16 in both, so built once ("same_as")


def test_plugin_graphs_get_half_type_plugin_io():
    from qc_compile.build import unit_graph

    work = WorkDir(calibrated("fp8_e4m3"))
    info = read_model_info(work)
    plan = load_plan(work.plan_json, model_info=info)
    fp32 = unit_graph(work, info, plan, "spatial_0", "default", plugins=True)
    half = precision_graph(fp32, "bfloat16")
    entries = {n: e for n, e in plan.resolve("default").items() if n.startswith("spatial_blocks.0.")}
    res = audit(half, half="bfloat16", linears=entries, unit="spatial_0")
    assert res["violations"] == [] and res["float32_unexcepted"] == 0
    fl = [n for n in half.graph.node if n.op_type == "FP8Linear"]
    assert len(fl) == 7 and all(onnx.helper.get_attribute_value(a) == 2 for n in fl for a in n.attribute
                                if a.name == "out_dtype")  # bf16 output
    stats = next(n for n in half.graph.node if n.op_type == "CacheStatsApply")
    assert [i for i in half.graph.input if i.name == "cached_residual"][0].type.tensor_type.elem_type == \
        TensorProto.FLOAT  # engine interface stays float32; cast to bf16 inside
    assert stats.input[1] != "cached_residual"
