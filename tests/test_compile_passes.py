"""Graph passes: each on small hand-built graphs (what it changes, and that the rest is untouched), then exactness
of folding and rotation on qc-ref units, and the Q/DQ graphs in onnxruntime."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from qc_compile.onnx_utils import ort_session
from qc_compile.passes.common import PassError, const_values, snapshot
from qc_compile.passes.fold_smoothing import pass_fold_smoothing
from qc_compile.passes.insert_qdq import dequantize_weight, pass_insert_qdq, quantize_weight
from qc_compile.passes.ort_twin import needs_twin, pass_ort_twin
from qc_compile.passes.plugin_nodes import pass_plugin_nodes, reference_evaluator
from qc_compile.passes.rotate import pass_rotate
from qc_compile.plan import LinearPlan, act_scale_for

C, T = 64, 8
RNG = np.random.default_rng(0)
QKV, PROJ, OTHER = "spatial_blocks.0.attn.qkv", "spatial_blocks.0.attn.proj", "spatial_blocks.0.cross_attn.q_linear"


def _c(name, a):
    return gs.Constant(name, np.asarray(a, dtype=np.float32))


def _v(name, dtype=np.float32, shape=None):
    return gs.Variable(name, dtype=dtype, shape=shape)


def small_block() -> gs.Graph:
    """LN -> modulate -> qkv -> single-head attention -> proj, plus an unrelated linear on x (q_linear)."""
    rng = np.random.default_rng(0)
    x, shift, scale = _v("x", shape=[2, T, C]), _v("shift", shape=[2, 1, C]), _v("scale", shape=[2, 1, C])
    nodes = []

    def n(name, op, ins, outs, **attrs):
        nodes.append(gs.Node(op, name=name, inputs=ins, outputs=outs, attrs=attrs))
        return outs[0]

    ln = n("ln", "LayerNormalization", [x, _c("ln_w", np.ones(C)), _c("ln_b", np.zeros(C))], [_v("ln_out")],
           epsilon=np.float32(1e-6))
    one_plus = n("one_plus", "Add", [scale, _c("one", 1.0)], [_v("one_plus_out")])
    h = n("shift_add", "Add", [n("scale_mul", "Mul", [ln, one_plus], [_v("m")]), shift], [_v("h")])
    qkv = n("qkv_add", "Add", [_c(f"{QKV}.bias", rng.normal(size=3 * C)),
                               n("qkv_mm", "MatMul", [h, _c(f"{QKV}.weight", rng.normal(size=(C, 3 * C)) / np.sqrt(C))],
                                 [_v("qkv_mm_out")])], [_v("qkv")])
    q, k, v = _v("q"), _v("k"), _v("v")
    nodes.append(gs.Node("Split", name="split", inputs=[qkv, gs.Constant("split_sizes", np.array([C, C, C]))],
                         outputs=[q, k, v], attrs={"axis": -1}))
    kt = n("kt", "Transpose", [k], [_v("kt_out")], perm=[0, 2, 1])
    att = n("softmax", "Softmax", [n("qk", "MatMul", [q, kt], [_v("qk_out")])], [_v("att")], axis=-1)
    o = n("av", "MatMul", [att, v], [_v("o")])
    y = n("proj_add", "Add", [_c(f"{PROJ}.bias", rng.normal(size=C)),
                              n("proj_mm", "MatMul", [o, _c(f"{PROJ}.weight", rng.normal(size=(C, C)) / np.sqrt(C))],
                                [_v("proj_mm_out")])], [_v("y", shape=[2, T, C])])
    z = n("other_add", "Add", [_c(f"{OTHER}.bias", rng.normal(size=C)),
                               n("other_mm", "MatMul", [x, _c(f"{OTHER}.weight", rng.normal(size=(C, C)) / np.sqrt(C))],
                                 [_v("other_mm_out")])], [_v("z", shape=[2, T, C])])
    g = gs.Graph(nodes=nodes, inputs=[x, shift, scale], outputs=[y, z], opset=19)
    return gs.import_onnx(gs.export_onnx(g))  # normalised once, so snapshots compare like with like


def feed():
    r = np.random.default_rng(1)
    return {"x": r.normal(size=(2, T, C)).astype(np.float32),
            "shift": (r.normal(size=(2, 1, C)) * 0.2).astype(np.float32),
            "scale": (r.normal(size=(2, 1, C)) * 0.2).astype(np.float32)}


def run(graph: gs.Graph):
    return ort_session(gs.export_onnx(graph)).run(None, feed())


def changed(before: dict, after: dict) -> tuple[set, set, set]:
    """(removed, added, modified) node names."""
    common = set(before) & set(after)
    return set(before) - set(after), set(after) - set(before), {k for k in common if before[k] != after[k]}


# ------------------------------------------------------------------------------------------------ fold smoothing
def test_fold_smoothing_small_graph_exact_and_local():
    g0 = small_block()
    ref = run(g0)
    before = snapshot(g0)
    s_qkv = RNG.uniform(0.3, 3.0, C).astype(np.float32)
    s_proj = RNG.uniform(0.3, 3.0, C).astype(np.float32)
    report = {}
    g = pass_fold_smoothing(small_block_copy(g0), {QKV: s_qkv, PROJ: s_proj}, report=report)
    assert report == {QKV: "modulation", PROJ: "v_rows"}
    out = run(g)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    removed, added, modified = changed(before, snapshot(g))
    assert not removed
    assert sorted(n.split("__")[0] for n in added) == [f"{QKV}.smooth_scale", f"{QKV}.smooth_shift"]
    # changed: the qkv weight (rows x s, V columns / s_proj) and bias, the proj weight, and the two modulation
    # nodes whose input edge now comes from the inserted Muls
    assert modified == {"qkv_mm", "qkv_add", "proj_mm", "scale_mul", "shift_add"}
    t = g.tensors()
    w0, w1 = const_values(g0.tensors()[f"{QKV}.weight"]), const_values(t[f"{QKV}.weight"])
    np.testing.assert_allclose(w1[:, :2 * C], w0[:, :2 * C] * s_qkv[:, None], rtol=1e-6)
    np.testing.assert_allclose(w1[:, 2 * C:], w0[:, 2 * C:] * s_qkv[:, None] / s_proj[None, :], rtol=1e-6)
    np.testing.assert_array_equal(const_values(t[f"{OTHER}.weight"]), const_values(g0.tensors()[f"{OTHER}.weight"]))


def test_fold_smoothing_online_fallback_and_errors():
    g = small_block()
    ref = run(g)
    report = {}
    s = RNG.uniform(0.5, 2.0, C).astype(np.float32)
    g = pass_fold_smoothing(g, {OTHER: s, "not.in.this.graph": s}, report=report)
    assert report == {OTHER: "online"}
    for a, b in zip(run(g), ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    with pytest.raises(PassError):
        pass_fold_smoothing(small_block(), {QKV: np.ones(C + 1, np.float32)})
    with pytest.raises(PassError):
        pass_fold_smoothing(small_block(), {QKV: -np.ones(C, np.float32)})


def small_block_copy(g: gs.Graph) -> gs.Graph:
    return gs.import_onnx(gs.export_onnx(g))


# ------------------------------------------------------------------------------------------------ rotate
def test_rotate_small_graph_exact_and_local():
    g0 = small_block()
    ref = run(g0)
    before = snapshot(g0)
    report = {}
    g = pass_rotate(small_block_copy(g0), {QKV: 8, PROJ: 4}, head_dim=C, report=report)
    assert report == {QKV: "online", PROJ: "v_fold"}
    for a, b in zip(run(g), ref):
        np.testing.assert_allclose(a, b, rtol=3e-5, atol=3e-5)
    removed, added, modified = changed(before, snapshot(g))
    assert not removed
    assert sorted(n.split("__")[0].rsplit(".", 1)[1] for n in added) == ["rotate", "rotate_in", "rotate_out",
                                                                          "rotate_shape"]
    assert modified == {"qkv_mm", "qkv_add", "proj_mm"}
    # without a head size the attention output is rotated online
    report = {}
    g = pass_rotate(small_block_copy(g0), {PROJ: 4}, head_dim=None, report=report)
    assert report == {PROJ: "online"}
    for a, b in zip(run(g), ref):
        np.testing.assert_allclose(a, b, rtol=3e-5, atol=3e-5)
    with pytest.raises(PassError):
        pass_rotate(small_block_copy(g0), {QKV: 3})


# ------------------------------------------------------------------------------------------------ insert Q/DQ
def _entry(w, a, amax=4.0):
    return LinearPlan(unit="spatial_0", weight=w, activation=a, act_scale=act_scale_for(a, amax), act_amax=amax)


@pytest.mark.parametrize("w,a,opset", [("fp8_e4m3", "fp8_e4m3", 19), ("int8", "int8", 19), ("int4_b64", "bf16", 21),
                                       ("int4_b64", "fp8_e4m3", 21), ("nvfp4", "nvfp4", 23),
                                       ("int6_sim", "int6_sim", 19)])
def test_insert_qdq_small_graph(w, a, opset):
    g0 = small_block()
    before = snapshot(g0)
    g = pass_insert_qdq(small_block_copy(g0), {OTHER: _entry(w, a), QKV: _entry("bf16", "bf16")})
    assert g.opset == opset
    removed, added, modified = changed(before, snapshot(g))
    assert not removed and modified == {"other_mm"}  # only the other linear's MatMul (its two inputs)
    mm = next(n for n in g.nodes if n.name == "other_mm")
    assert [mm.inputs[i].inputs[0].op for i in (0, 1)] == ["DequantizeLinear", "DequantizeLinear"] if a != "bf16" \
        else mm.inputs[1].inputs[0].op == "DequantizeLinear"
    ops = sorted(g.nodes[i].op for i in range(len(g.nodes)) if g.nodes[i].name in added)
    expect = {"fp8_e4m3": ["DequantizeLinear", "DequantizeLinear", "QuantizeLinear"],
              "int8": ["DequantizeLinear", "DequantizeLinear", "QuantizeLinear"],
              "int6_sim": ["Clip", "DequantizeLinear", "DequantizeLinear", "QuantizeLinear"],
              "nvfp4": ["DequantizeLinear"] * 4 + ["TRT_FP4DynamicQuantize"]}
    if a == "bf16":
        assert ops == ["DequantizeLinear"]
    elif w == "int4_b64":
        assert ops == ["DequantizeLinear", "DequantizeLinear", "QuantizeLinear"]
    else:
        assert ops == expect[w]
    wdq = mm.inputs[1].inputs[0]
    if w.startswith("int4"):
        assert wdq.attrs == {"axis": 0, "block_size": 64}
    elif w == "nvfp4":
        assert wdq.attrs == {"axis": 0, "block_size": 16}
        assert any(d.domain == "trt" for d in g.import_domains)
    else:
        assert wdq.attrs == {"axis": 1}  # output channels of the [K, N] MatMul weight
    # onnxruntime runs it (via the twin for NVFP4); the untouched output is bit-identical
    model = gs.export_onnx(g)
    ref = run(g0)
    if needs_twin(g):
        assert w == "nvfp4"
        model = gs.export_onnx(pass_ort_twin(gs.import_onnx(model)))
    out = ort_session(model).run(None, feed())
    np.testing.assert_array_equal(out[0], ref[0])
    rel = np.abs(out[1] - ref[1]).max() / np.abs(ref[1]).max()
    assert 0 < rel < {"int4_b64": 0.2, "nvfp4": 0.35, "int6_sim": 0.2}.get(w, 0.08)


def test_qdq_numerics_match_numpy_reference():
    """FP8 / INT8 W8A8: onnxruntime's output equals fake-quantized x times dequantized W (float32 rounding)."""
    g0 = small_block()
    x = feed()["x"]
    w = const_values(g0.tensors()[f"{OTHER}.weight"])
    b = const_values(g0.tensors()[f"{OTHER}.bias"])
    for fmt, qmax in (("fp8_e4m3", 448.0), ("int8", 127.0)):
        e = _entry(fmt, fmt, amax=2.5)
        out = ort_session(gs.export_onnx(pass_insert_qdq(small_block_copy(g0), {OTHER: e}))).run(None, feed())[1]
        s = np.float32(e.act_scale)
        if fmt == "fp8_e4m3":
            xq = np.clip(x / s, -qmax, qmax).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
        else:
            xq = np.clip(np.round(x / s), -qmax - 1, qmax) * s  # ONNX/TensorRT INT8 saturate to [-128, 127]
        ref = xq.astype(np.float32) @ dequantize_weight(quantize_weight(w, fmt)) + b
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_per_token_qdq_matches_torch_package_reference():
    """act_scale "dynamic" (per token): onnxruntime's graph equals torch_package's fake quantization (the torch
    runner's and the fast kernels' computation) times the dequantized W; for INT8 per-token beats per-tensor on rows of
    very different magnitude."""
    from qc_compile.torch_package import fake_quant_activation

    g0 = small_block()
    f = feed()
    f["x"] = (f["x"] * np.logspace(-3, 1, T, dtype=np.float32)[None, :, None]).astype(np.float32)  # rows 1e-3 .. 10
    x = torch.from_numpy(f["x"])
    w = const_values(g0.tensors()[f"{OTHER}.weight"])
    b = const_values(g0.tensors()[f"{OTHER}.bias"])
    exact = f["x"] @ w + b
    for fmt in ("fp8_e4m3", "int8"):
        e = LinearPlan(unit="spatial_0", weight=fmt, activation=fmt, act_scale="dynamic", act_amax=40.0)
        g = pass_insert_qdq(small_block_copy(g0), {OTHER: e})
        out = ort_session(gs.export_onnx(g)).run(None, f)[1]
        ref = fake_quant_activation(x, e).numpy() @ dequantize_weight(quantize_weight(w, fmt)) + b
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
        static = LinearPlan(unit="spatial_0", weight=fmt, activation=fmt, act_scale=act_scale_for(fmt, 40.0))
        out_s = ort_session(gs.export_onnx(pass_insert_qdq(small_block_copy(g0), {OTHER: static}))).run(None, f)[1]
        def err(o):  # on the smallest rows, bias removed (it would hide the activation error)
            return np.abs(o - exact)[:, :2].max() / np.abs(exact - b)[:, :2].max()
        assert err(out) < 0.1, (fmt, err(out))
        if fmt == "int8":  # (FP8's exponent already covers these rows under one static scale: 3.2% vs 3.6% here)
            assert err(out) < 0.5 * err(out_s), (err(out), err(out_s))


def test_weight_quantizers():
    w = RNG.normal(size=(64, 24)).astype(np.float32)
    for fmt, tol in (("fp8_e4m3", 0.07), ("int8", 0.01), ("int4_b64", 0.2), ("nvfp4", 0.3), ("int6_sim", 0.04)):
        q = quantize_weight(w, fmt)
        d = dequantize_weight(q)
        assert d.shape == w.shape
        assert np.abs(d - w).max() / np.abs(w).max() < tol, fmt
    q = quantize_weight(w, "int4_b64")
    assert q["codes"].dtype == np.dtype(ml_dtypes.int4) and q["scale"].shape == (1, 24)
    q = quantize_weight(w, "nvfp4")  # the kernels' reference quantizer, transposed to the [K, N] layout
    from qc_compile.plugins.formats import fake_quant_nvfp4

    np.testing.assert_allclose(dequantize_weight(q), fake_quant_nvfp4(torch.from_numpy(w.T)).numpy().T, rtol=1e-6)


def test_ort_twin_nvfp4_activation_matches_torch_reference():
    g = pass_insert_qdq(small_block(), {OTHER: _entry("bf16", "nvfp4", amax=3.0)})
    with pytest.raises(Exception):
        ort_session(gs.export_onnx(g))  # onnxruntime has no TRT_FP4DynamicQuantize kernel
    twin = pass_ort_twin(gs.import_onnx(gs.export_onnx(g)))
    assert not needs_twin(twin)
    out = ort_session(gs.export_onnx(twin)).run(None, feed())[1]
    from qc_compile.torch_package import fake_quant_activation

    x = torch.from_numpy(feed()["x"])
    g0 = small_block()
    w = const_values(g0.tensors()[f"{OTHER}.weight"])
    b = const_values(g0.tensors()[f"{OTHER}.bias"])
    ref = fake_quant_activation(x, _entry("bf16", "nvfp4", amax=3.0)).numpy() @ w + b
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_ort_twin_rejects_plugin_nodes():
    g = small_block()
    g.nodes.append(gs.Node("FP8Linear", name="p", inputs=[g.inputs[0]], outputs=[_v("pz")], domain="qc"))
    g.outputs.append(g.nodes[-1].outputs[0])
    with pytest.raises(PassError, match="qc::FP8Linear"):
        pass_ort_twin(g)


# ------------------------------------------------------------------------------------------------ plugin nodes
def _check_plugin_weights(g: gs.Graph, ents) -> None:
    """Every FP8Linear weight is ``QuantizeLinear(W float32 const, w_scale, fp8 zp, axis=0)`` (the form TensorRT's
    explicit quantization accepts for an FP8 plugin input), and quantizing W gives back exactly the plan's FP8 codes
    of insert_qdq (the engine's weight bytes)."""
    import ml_dtypes

    ref = pass_insert_qdq(pass_rotate(small_block(), {OTHER: 8}), ents).tensors()
    lins = [n for n in g.nodes if n.op == "FP8Linear"]
    assert lins
    for n in lins:
        q = n.inputs[2].inputs[0]
        assert q.op == "QuantizeLinear" and q.attrs["axis"] == 0
        w, s, zp = (i.values for i in q.inputs)
        assert w.dtype == np.float32 and n.inputs[3].values is s and zp.dtype == ml_dtypes.float8_e4m3fn
        codes = (w / s[:, None]).astype(ml_dtypes.float8_e4m3fn)  # QuantizeLinear's FP8 rule (saturating cast)
        name = next(k for k in (QKV, OTHER) if n.name.startswith(k))
        want = ref[f"{name}.weight_q"].values.T
        assert np.array_equal(codes.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)), name
        assert np.array_equal(s, ref[f"{name}.weight_q"].outputs[0].inputs[1].values)


def test_plugin_nodes_small_graph():
    from qc_compile.plugins.trt_plugins import validate_attrs

    ents = {QKV: _entry("fp8_e4m3", "fp8_e4m3"), OTHER: _entry("fp8_e4m3", "fp8_e4m3"),
            PROJ: _entry("int8", "int8")}
    g = pass_insert_qdq(pass_rotate(small_block(), {OTHER: 8}), ents)
    report = {}
    g = pass_plugin_nodes(g, ents, cache_stats=False, report=report)
    assert report == {QKV: "RotateQuantFP8(block=0, prologue=2) + FP8Linear",
                      OTHER: "RotateQuantFP8(block=8, prologue=0) + FP8Linear"}
    qc_nodes = [n for n in g.nodes if n.domain == "qc"]
    assert sorted(n.op for n in qc_nodes) == ["FP8Linear", "FP8Linear", "RotateQuantFP8", "RotateQuantFP8"]
    for n in qc_nodes:
        validate_attrs(n.op, n.attrs)
    assert not any(n.op == "LayerNormalization" for n in g.nodes)  # folded into the plugin's prologue
    acts = [n for n in g.nodes if n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant)]
    assert len(acts) == 1  # the INT8 proj keeps its activation Q/DQ
    model = gs.export_onnx(g)
    _check_plugin_weights(g, ents)
    out = reference_evaluator(model).run(None, feed())  # qc:: nodes run through trt_plugins.run_torch
    ref = run(small_block())
    for a, b in zip(out, ref):  # per-token dynamic FP8: same order of error as the static Q/DQ graph (25-32 dB)
        assert 20 * np.log10(np.linalg.norm(b) / np.linalg.norm(a - b)) > 20


# ------------------------------------------------------------------------------------------------ qc-ref units
def _unit_case(unit: str):
    from compile_helpers import exported

    from qc_compile.export import example_inputs
    from qc_compile.models.stdit3 import UNIT_INPUTS, unit_kind
    from qc_compile.workdir import WorkDir, read_model_info

    work = WorkDir(exported())
    info = read_model_info(work)
    kind = unit_kind(unit)
    ins = example_inputs(info.config(), info.geometry(), kind, seed=7)
    proto = onnx.load(work.fp_onnx(unit))
    names = {i.name for i in proto.graph.input}
    fd = {n: t.numpy() for n, t in zip(UNIT_INPUTS[kind], ins) if n in names}
    return info, proto, fd


def test_fold_and_rotate_exact_on_qcref_units():
    """Smoothing every linear and rotating every linear (blocks 16) leaves each qc-ref unit's output unchanged to fp32
    rounding; the kv_linear smoothing is exact only together with the caption fold in the embed unit."""
    info, _, _ = _unit_case("embed")
    rng = np.random.default_rng(3)
    lins = {li["name"]: li for li in info.linears()}
    smooth = {n: rng.uniform(0.25, 4.0, li["in_features"]).astype(np.float32) for n, li in lins.items()}
    kv = rng.uniform(0.25, 4.0, info.config().hidden_size).astype(np.float32)
    for n in smooth:
        if n.endswith("cross_attn.kv_linear"):
            smooth[n] = kv
    rot = {n: 16 for n in lins}
    for unit in ("embed", "spatial_1", "temporal_2", "final"):
        _, proto, fd = _unit_case(unit)
        ref = ort_session(proto).run(None, fd)
        rep_f, rep_r = {}, {}
        g = pass_fold_smoothing(gs.import_onnx(proto), smooth, caption_fold=kv if unit == "embed" else None,
                                report=rep_f)
        g = pass_rotate(g, rot, head_dim=info.config().head_dim, report=rep_r)
        fd2 = dict(fd)
        if "t_mlp" in fd:  # a block sees the embed unit's y, already divided by the caption fold
            fd2["y"] = fd["y"] / kv
        out = ort_session(gs.export_onnx(g)).run(None, fd2)
        if unit == "embed":  # outputs x, t, t_mlp unchanged; y divided by the kv smoothing vector
            out[3] = out[3] * kv
        for a, b in zip(out, ref):
            assert np.abs(a - b).max() / np.abs(b).max() < 2e-5, unit
        if unit.startswith("spatial"):
            assert rep_f[f"spatial_blocks.1.attn.qkv"] == "modulation"
            assert rep_f[f"spatial_blocks.1.mlp.fc1"] == "modulation"
            assert rep_f[f"spatial_blocks.1.attn.proj"] == "v_rows"
            assert rep_f[f"spatial_blocks.1.cross_attn.kv_linear"] == "caption"
            assert rep_r[f"spatial_blocks.1.attn.proj"] == "v_fold"
            assert rep_r[f"spatial_blocks.1.mlp.fc2"] == "online"
        if unit == "final":
            assert rep_f == {"final_layer.linear": "modulation"}


def test_qdq_qcref_unit_runs_in_onnxruntime_and_dynamic_batch():
    info, proto, fd = _unit_case("temporal_0")
    ents = {li["name"]: _entry("fp8_e4m3", "fp8_e4m3", amax=6.0) for li in info.unit("temporal_0")["linears"]}
    g = pass_insert_qdq(gs.import_onnx(proto), ents)
    q = gs.export_onnx(g)
    ref = ort_session(proto).run(None, fd)[0]
    out = ort_session(q).run(None, fd)[0]
    assert 0 < np.abs(out - ref).max() / np.abs(ref).max() < 0.1
    fd4 = {k: np.concatenate([v, v]) for k, v in fd.items()}  # batch 4 through the dynamic batch axis
    out4 = ort_session(q).run(None, fd4)[0]
    np.testing.assert_allclose(out4[:2], out, rtol=1e-5, atol=1e-5)


def test_large_graphs_go_to_external_data(tmp_path, monkeypatch):
    """Above the threshold (1.8 GB in production) a unit is saved as .onnx + .onnx.data, atomically, and loads."""
    import qc_compile.onnx_utils as OU

    _, proto, fd = _unit_case("spatial_0")
    ref = ort_session(proto).run(None, fd)[0]
    monkeypatch.setattr(OU, "EXTERNAL_DATA_THRESHOLD", 1000)
    files = OU.save_onnx(copy.deepcopy(proto), tmp_path / "u.onnx")
    assert [f.name for f in files] == ["u.onnx", "u.onnx.data"]
    assert files[0].stat().st_size < 200_000 < files[1].stat().st_size
    assert OU.onnx_files(tmp_path / "u.onnx") == files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = OU.load_onnx(tmp_path / "u.onnx")
    np.testing.assert_array_equal(ort_session(tmp_path / "u.onnx").run(None, fd)[0], ref)
    assert len(loaded.graph.initializer) == len(proto.graph.initializer)
    monkeypatch.setattr(OU, "EXTERNAL_DATA_THRESHOLD", 10**12)  # smaller again: the stale side file goes away
    assert OU.save_onnx(copy.deepcopy(proto), tmp_path / "u.onnx") == [tmp_path / "u.onnx"]
    assert not (tmp_path / "u.onnx.data").exists()
