"""Opt-in ``qc::`` plugin nodes (namespace/domain ``qc``, see :mod:`qc_compile.plugins.trt_plugins`).

Runs after :func:`~qc_compile.passes.insert_qdq.pass_insert_qdq`. For every linear whose plan entry is FP8 weights +
FP8 activations it replaces

    [online rotation: Shape/Reshape/MatMul(H)/Reshape] -> QuantizeLinear -> DequantizeLinear -> MatMul <- DQ(W fp8)
    -> Add(bias)

by ``qc::RotateQuantFP8(x; block, prologue) -> (xq, x_scale)`` and
``qc::FP8Linear(xq, x_scale, wq [N, K], w_scale [N], bias; has_bias=1, out_dtype=0)``, where ``wq`` is
``QuantizeLinear(W [N, K] float32, w_scale, fp8 zero point, axis=0)`` of the dequantized weight (the form TensorRT's
explicit quantization accepts for an FP8 plugin input: :func:`quantized_weight_input`). When the linear's input is
exactly ``LayerNormalization(x0) * (1 + scale) + shift`` (nothing in between, no folded smoothing Muls) the plugin
takes that prologue too (``prologue=2``, inputs ``x0, shift, scale``), so LayerNorm + modulation + rotation +
quantization are one kernel.

**Numerics change**: the plugin quantizes activations *per token, dynamically* (scale = row absmax / 448), where the
Q/DQ graph uses the calibrated per-tensor static scale; the weights are the same FP8 codes and scales.

Block units (``cache_stats=True``) also get ``qc::CacheStatsApply(mode=1)`` on (graph input ``x``, a new graph input
``cached_residual``, the unit output): extra outputs ``residual_out`` (= output - x) and ``cache_stats_out``
(``[B, 10]`` sums, :mod:`qc_compile.plugins.cache_stats`), so a policy gets its statistics from the engine.

Not matched: the GELU prologue (``prologue=1``): below opset 20 the exporter writes GELU(tanh) as elementwise ops.
TensorRT-RTX cannot build these graphs (see :mod:`qc_compile.trt_compat`); full TensorRT with the plugins registered
is required, and was not available here. Their numerics are tested with onnx's reference evaluator and
:func:`qc_compile.plugins.trt_plugins.run_torch` (:func:`reference_evaluator`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qc_compile.passes.common import PassError, cleanup, const_values, constant_value, producer, uid
from qc_compile.passes.insert_qdq import lazy_const
from qc_compile.plan import LinearPlan

DOMAIN = "qc"
FP8 = onnx.TensorProto.FLOAT8E4M3FN  # graphsurgeon takes an ONNX type where numpy has none


def _strip_online_rotation(t: gs.Tensor) -> tuple[gs.Tensor, int]:
    """If ``t`` is the output of the rotate pass's subgraph, return (its input, block); else (t, 0)."""
    back = producer(t)
    if back is None or back.op != "Reshape":
        return t, 0
    mm = producer(back.inputs[0])
    if mm is None or mm.op != "MatMul" or not isinstance(mm.inputs[1], gs.Constant):
        return t, 0
    flat = producer(mm.inputs[0])
    if flat is None or flat.op != "Reshape" or ".rotate_in" not in (flat.name or ""):
        return t, 0
    return flat.inputs[0], int(const_values(mm.inputs[1]).shape[0])


def _ln_modulate(t: gs.Tensor):
    """(x0, shift, scale) if ``t = LN(x0) * (1 + scale) + shift`` with a plain Add(scale, 1), else None."""
    add = producer(t)
    if add is None or add.op != "Add":
        return None
    for mi in (0, 1):
        mul = producer(add.inputs[mi])
        if mul is None or mul.op != "Mul":
            continue
        for li in (0, 1):
            ln = producer(mul.inputs[li])
            one_plus = producer(mul.inputs[1 - li])
            if ln is None or ln.op != "LayerNormalization" or one_plus is None or one_plus.op != "Add":
                continue
            vals = [constant_value(i) for i in one_plus.inputs]
            raw = [i for i, v in zip(one_plus.inputs, vals) if v is None]
            consts = [v for v in vals if v is not None]
            if len(consts) == 1 and len(raw) == 1 and np.all(consts[0] == 1.0):
                return ln.inputs[0], add.inputs[1 - mi], raw[0]
    return None


def _quantized_linear(graph: gs.Graph, name: str):
    """(MatMul, weight DQ, bias Add or None, bias constant or None) of a linear after insert_qdq."""
    tensors = graph.tensors()
    codes = tensors.get(f"{name}.weight_q")
    if not isinstance(codes, gs.Constant) or len(codes.outputs) != 1 or codes.outputs[0].op != "DequantizeLinear":
        raise PassError(f"{name}: no quantized weight {name}.weight_q -> DequantizeLinear (run insert_qdq first)")
    dq_w = codes.outputs[0]
    mms = [n for n in dq_w.outputs[0].outputs if n.op == "MatMul"]
    if len(mms) != 1:
        raise PassError(f"{name}: the weight DQ must feed one MatMul")
    b = tensors.get(f"{name}.bias")
    add = next((n for n in b.outputs if n.op == "Add"), None) if isinstance(b, gs.Constant) else None
    return mms[0], dq_w, add, (b if add is not None else None)


def quantized_weight_input(graph: gs.Graph, name: str, codes: np.ndarray, w_scale: np.ndarray
                           ) -> tuple[gs.Variable, gs.Constant]:
    """``FP8Linear``'s weight input in the form TensorRT's explicit quantization accepts, and its scale constant.

    The weight enters as a high-precision constant ``W [N, K] = codes * w_scale`` (float32, exact: an FP8 code times
    an fp32 scale) followed by ``QuantizeLinear(W, w_scale, zero_point fp8, axis=0)``; the plugin declares that input
    FP8. TensorRT types a Q output FP8 in a strongly typed network and quantizes a constant-input Q at build time
    ("weights may be high precision, TensorRT quantizes them with the Q scale"), and a plugin input fed by a Q is its
    documented way into a plugin that consumes quantized data (NVIDIA/TensorRT#1616, #3055: ``x -> Q -> plugin``).
    A bare FP8 initializer wired into a plugin has no documented builder path, and ``Q -> DQ -> plugin`` would hand the
    plugin dequantized floats. ``Q(codes * s, s)`` gives back exactly ``codes`` (checked in the tests), so the
    engine's weight bytes are the plan's codes.
    """
    import ml_dtypes

    w = (codes.astype(np.float32).T * w_scale[:, None]).astype(np.float32)  # [N, K]
    w_c = gs.Constant(uid(f"{name}.w_nk"), np.ascontiguousarray(w))
    s_c = gs.Constant(uid(f"{name}.w_scale"), w_scale)
    zp = lazy_const(uid(f"{name}.w_zero_point"), np.zeros(w_scale.shape, dtype=ml_dtypes.float8_e4m3fn))
    wq = gs.Variable(uid(f"{name}.wq_nk"), dtype=FP8, shape=list(w.shape))
    graph.nodes.append(gs.Node("QuantizeLinear", name=uid(f"{name}.w_quantize"), inputs=[w_c, s_c, zp],
                               outputs=[wq], attrs={"axis": 0}))
    return wq, s_c


def _fuse_linear(graph: gs.Graph, name: str, report: dict) -> None:
    mm, dq_w, bias_add, bias = _quantized_linear(graph, name)
    dq_x = producer(mm.inputs[0])
    if dq_x is None or dq_x.op != "DequantizeLinear":
        raise PassError(f"{name}: expected DequantizeLinear on both MatMul inputs (run insert_qdq first)")
    q_x = producer(dq_x.inputs[0])
    if q_x is None or q_x.op != "QuantizeLinear":
        raise PassError(f"{name}: expected QuantizeLinear before the activation DQ")
    src, block = _strip_online_rotation(q_x.inputs[0])
    codes = const_values(dq_w.inputs[0])  # [K, N] fp8
    w_scale = const_values(dq_w.inputs[1]).astype(np.float32)  # [N]
    wq, w_scale_c = quantized_weight_input(graph, name, codes, w_scale)
    shape = list(src.shape) if src.shape is not None else None
    xq = gs.Variable(uid(f"{name}.xq"), dtype=FP8, shape=shape)
    xs = gs.Variable(uid(f"{name}.x_scale"), dtype=np.float32, shape=shape[:-1] + [1] if shape else None)
    mod = _ln_modulate(src)
    if mod is not None:
        x0, shift, scale = mod
        rq = gs.Node("RotateQuantFP8", name=uid(f"{name}.rotate_quant"), inputs=[x0, shift, scale],
                     outputs=[xq, xs], attrs={"block": block, "prologue": 2}, domain=DOMAIN)
    else:
        rq = gs.Node("RotateQuantFP8", name=uid(f"{name}.rotate_quant"), inputs=[src], outputs=[xq, xs],
                     attrs={"block": block, "prologue": 0}, domain=DOMAIN)
    has_bias = bias_add is not None
    out = bias_add.outputs[0] if has_bias else mm.outputs[0]
    ins = [xq, xs, wq, w_scale_c]
    if has_bias:
        ins.append(gs.Constant(uid(f"{name}.bias"), const_values(bias).astype(np.float32)))
    fl = gs.Node("FP8Linear", name=uid(f"{name}.fp8_linear"), inputs=ins, outputs=[out],
                 attrs={"has_bias": int(has_bias), "out_dtype": 0}, domain=DOMAIN)
    (bias_add if has_bias else mm).outputs.clear()
    graph.nodes += [rq, fl]
    report[name] = f"RotateQuantFP8(block={block}, prologue={rq.attrs['prologue']}) + FP8Linear"


def add_cache_stats(graph: gs.Graph, report: dict) -> None:
    x = next((t for t in graph.inputs if t.name == "x"), None)
    y = next((t for t in graph.outputs if t.name == "x_out"), None)
    if x is None or y is None:
        raise PassError("cache stats: the graph has no input 'x' / output 'x_out' (not a block unit)")
    cached = gs.Variable("cached_residual", dtype=np.float32, shape=x.shape)
    res = gs.Variable("residual_out", dtype=np.float32, shape=x.shape)
    stats = gs.Variable("cache_stats_out", dtype=np.float32, shape=[x.shape[0] if x.shape else "batch", 10])
    graph.nodes.append(gs.Node("CacheStatsApply", name=uid("cache_stats"), inputs=[x, cached, y],
                               outputs=[res, stats], attrs={"mode": 1}, domain=DOMAIN))
    graph.inputs.append(cached)
    graph.outputs += [res, stats]
    report["cache_stats"] = "CacheStatsApply(mode=1)"


def pass_plugin_nodes(graph: gs.Graph, entries: dict[str, LinearPlan], *, cache_stats: bool | None = None,
                      report: dict | None = None) -> gs.Graph:
    report = report if report is not None else {}
    present = {t.name[:-len(".weight_q")] for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and t.name.endswith(".weight_q")}
    for name, e in entries.items():
        if name in present and e.weight == "fp8_e4m3" and e.activation == "fp8_e4m3":
            _fuse_linear(graph, name, report)
    is_block = any(t.name == "t_mlp" for t in graph.inputs)
    if cache_stats if cache_stats is not None else is_block:
        add_cache_stats(graph, report)
    return cleanup(graph)


# ---------------------------------------------------------------------------------------------- reference numerics
def reference_evaluator(model):
    """An ``onnx.reference.ReferenceEvaluator`` that runs ``qc::`` nodes through ``trt_plugins.run_torch`` (the
    computation the TensorRT plugins enqueue), for CPU tests of plugin graphs."""
    import ml_dtypes
    import torch
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from qc_compile.plugins.trt_plugins import run_torch

    def to_torch(a):
        a = np.asarray(a)
        if a.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
            return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        return torch.from_numpy(np.array(a, copy=True))

    def to_numpy(t):
        if t.dtype == torch.float8_e4m3fn:
            return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
        return t.float().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()

    def make(op):
        class _Op(OpRun):
            op_domain = DOMAIN

            def _run(self, *inputs, **attrs):
                names = {"RotateQuantFP8": ("block", "prologue"), "FP8Linear": ("has_bias", "out_dtype"),
                         "CacheStatsApply": ("mode",)}[op]
                a = {k: getattr(self, k) for k in names if getattr(self, k, None) is not None}
                outs = run_torch(op, a, [to_torch(i) for i in inputs])
                return tuple(to_numpy(o) for o in outs)

        _Op.__name__ = op
        return _Op

    return ReferenceEvaluator(model, new_ops=[make(o) for o in ("RotateQuantFP8", "FP8Linear", "CacheStatsApply")])
