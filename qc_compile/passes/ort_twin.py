"""Make a TensorRT-bound Q/DQ graph runnable by onnxruntime, with the same numbers.

onnxruntime 1.31 (CPU) has no kernel for ``trt::TRT_FP4DynamicQuantize`` and none for ``DequantizeLinear`` of
FLOAT4E2M1 (opset 23). What it runs instead:

* NVFP4 **weights**: the ``DQ(DQ(block_scales_fp8, s), codes_fp4, block 16)`` chain is evaluated offline into a
  float32 constant. Every E2M1 code times its FP8 scale times the fp32 scale is computed in float32 exactly as
  the DQ chain defines it, so the constant holds the values TensorRT's DQ would produce.
* NVFP4 **activations**: ``TRT_FP4DynamicQuantize`` + its two DQs become standard ops computing the same fake
  quantization: per block of 16 along the last axis ``amax / 6 / s`` rounded to FP8 E4M3 (a QuantizeLinear /
  DequantizeLinear pair, round-to-nearest-even, saturating), values divided by ``fp8_scale * s`` and rounded to the
  E2M1 grid (ties to the even code, saturating at 6), multiplied back. This is
  :func:`qc_compile.plugins.formats.quantize_nvfp4` with a static per-tensor scale, i.e. the kernels' reference;
  TensorRT's own dynamic-quantize kernel was not run here (no Blackwell GPU).

Anything else outside the default domain (``qc::`` plugin nodes) has no onnxruntime form: :class:`PassError`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qc_compile.passes.common import PassError, cleanup, const_dtype, const_values, producer, uid
from qc_compile.passes.insert_qdq import TRT_DOMAIN, lazy_const
from qc_compile.plugins.codecs import E2M1_GRID, E2M1_INCLUSIVE, E2M1_MAX, E2M1_STRICT


def _const_array(t: gs.Tensor) -> np.ndarray | None:
    return const_values(t) if isinstance(t, gs.Constant) else None


def _is_fp4(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and const_dtype(t) == np.dtype(ml_dtypes.float4_e2m1fn)


def _fold_fp4_weight_dq(graph: gs.Graph, dq: gs.Node) -> bool:
    if not _is_fp4(dq.inputs[0]):
        return False
    codes = _const_array(dq.inputs[0])
    sp = producer(dq.inputs[1])
    if sp is None or sp.op != "DequantizeLinear":
        raise PassError(f"{dq.name}: FP4 weight DQ without a DQ-produced scale")
    bscale, gscale = _const_array(sp.inputs[0]), _const_array(sp.inputs[1])
    scale = (bscale.astype(np.float32) * gscale.astype(np.float32)).astype(np.float32)
    axis, block = int(dq.attrs.get("axis", 1)), int(dq.attrs["block_size"])
    w = (codes.astype(np.float32) * np.repeat(scale, block, axis=axis)).astype(np.float32)
    out = dq.outputs[0]
    c = gs.Constant(uid(f"{out.name}_ortfp32"), w)
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = c
    for g_out in graph.outputs:
        if g_out is out:
            raise PassError("FP4 weight DQ output is a graph output")
    dq.outputs.clear()
    return True


def _nvfp4_fake_quant(graph: gs.Graph, x: gs.Tensor, gscale: np.ndarray, block: int, name: str) -> gs.Variable:
    """Standard-op NVFP4 fake quantization of ``x`` along its last axis."""
    nodes = []

    def v(tag, dtype=np.float32):
        return gs.Variable(uid(f"{name}_{tag}"), dtype=dtype)

    def c(tag, val):
        return gs.Constant(uid(f"{name}_{tag}"), np.asarray(val))

    def node(op, inputs, out, **attrs):
        nodes.append(gs.Node(op, name=uid(f"{name}.{op}"), inputs=inputs, outputs=[out], attrs=attrs))
        return out

    g = np.asarray(gscale, dtype=np.float32).reshape(())
    shape = node("Shape", [x], v("shape", np.int64))
    xb = node("Reshape", [x, c("blk", np.array([-1, block], np.int64))], v("xb"))
    amax = node("ReduceMax", [node("Abs", [xb], v("abs")), c("axes", np.array([1], np.int64))], v("amax"),
                keepdims=1)
    bs = node("Div", [node("Div", [amax, c("six", np.float32(E2M1_MAX))], v("a6")), c("g", g)], v("bs"))
    bs_q = node("QuantizeLinear", [bs, c("one", np.float32(1.0)),
                                   lazy_const(uid(f"{name}_zp8"), np.zeros((), ml_dtypes.float8_e4m3fn))],
                v("bs_q", None))
    bs8 = node("DequantizeLinear", [bs_q, c("one2", np.float32(1.0))], v("bs8"))
    denom = node("Mul", [bs8, c("g2", g)], v("denom"))
    safe = node("Max", [denom, c("tiny", np.float32(np.finfo(np.float32).tiny))], v("safe"))
    y = node("Where", [node("Greater", [denom, c("zero", np.float32(0.0))], v("pos", np.bool_)),
                       node("Div", [xb, safe], v("ratio")), c("zero2", np.float32(0.0))], v("y"))
    a = node("Abs", [y], v("ay"))
    code = None
    for t in E2M1_STRICT + E2M1_INCLUSIVE:
        op = "Greater" if t in E2M1_STRICT else "GreaterOrEqual"
        step = node("Cast", [node(op, [a, c("t", np.float32(t))], v("cmp", np.bool_))], v("step", np.int64),
                    to=7)  # INT64
        code = step if code is None else node("Add", [code, step], v("code", np.int64))
    mag = node("Gather", [c("grid", np.array(E2M1_GRID, np.float32)), code], v("mag"), axis=0)
    q = node("Mul", [mag, node("Sign", [y], v("sign"))], v("q"))
    deq = node("Mul", [q, denom], v("deq"))
    out = node("Reshape", [deq, shape], v("out"))
    graph.nodes += nodes
    return out


def _replace_dynamic_fp4(graph: gs.Graph, dq_node: gs.Node) -> None:
    xf4, xs8 = dq_node.outputs
    scale_dq = [n for n in xs8.outputs if n.op == "DequantizeLinear"]
    data_dq = [n for n in xf4.outputs if n.op == "DequantizeLinear"]
    if len(scale_dq) != 1 or len(data_dq) != 1 or len(xf4.outputs) != 1 or len(xs8.outputs) != 1:
        raise PassError(f"{dq_node.name}: unexpected consumers of TRT_FP4DynamicQuantize")
    if int(dq_node.attrs.get("axis", -1)) != -1:
        raise PassError(f"{dq_node.name}: only axis=-1 is supported")
    block = int(dq_node.attrs.get("block_size", 16))
    g = _const_array(dq_node.inputs[1])
    out = _nvfp4_fake_quant(graph, dq_node.inputs[0], g, block, dq_node.name)
    final = data_dq[0].outputs[0]
    for consumer in list(final.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is final:
                consumer.inputs[i] = out
    dq_node.outputs.clear()
    scale_dq[0].outputs.clear()
    data_dq[0].outputs.clear()


def pass_ort_twin(graph: gs.Graph) -> gs.Graph:
    changed = False
    for node in list(graph.nodes):
        if node.op == "TRT_FP4DynamicQuantize" and node.domain == TRT_DOMAIN:
            _replace_dynamic_fp4(graph, node)
            changed = True
    for node in list(graph.nodes):
        if node.op == "DequantizeLinear" and node.outputs and _fold_fp4_weight_dq(graph, node):
            changed = True
    cleanup(graph)
    foreign = sorted({f"{n.domain}::{n.op}" for n in graph.nodes if n.domain not in (None, "", "ai.onnx")})
    if foreign:
        raise PassError(f"no onnxruntime form for {', '.join(foreign)}")
    if changed:  # drop the now unused trt domain import
        used = {n.domain for n in graph.nodes}
        graph.import_domains = [d for d in graph.import_domains if d.domain in ("", "ai.onnx") or d.domain in used]
    return graph


def needs_twin(graph: gs.Graph) -> bool:
    return any(n.domain not in (None, "", "ai.onnx") for n in graph.nodes) or any(
        _is_fp4(t) for t in graph.tensors().values())
