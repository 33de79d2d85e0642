"""Insert Q/DQ for every linear the plan quantizes, placed so TensorRT fuses them into quantized GEMMs.

Placement (TensorRT explicit quantization; ModelOpt's pattern): DequantizeLinear on *both* MatMul inputs, nothing
on the output. Weights are stored pre-quantized (low-bit initializer -> DequantizeLinear), activations get
QuantizeLinear -> DequantizeLinear on the MatMul's input edge only (another consumer of the same tensor is left
alone). Scales are float32 here (the exported graphs are float32; :mod:`~qc_compile.passes.cast_precision`
later turns the graph TensorRT builds, scales included, into bf16). Zero points are 0 (TensorRT is symmetric-only).

==========  =====================================================================================================
weight      ``fp8_e4m3`` / ``int8``: per output channel, ``axis=1`` of the ``[K, N]`` MatMul weight; scale
            ``amax_n / 448`` (``/ 127``; INT8 rounds half to even and clips to +-127).
            ``int4_b64`` / ``int4_b128``: weight-only INT4 blocks along K (``axis=0``, ``block_size``), scale
            ``amax_block / 7``, codes in [-8, 7] (opset 21).
            ``nvfp4``: E2M1 codes ``[K, N]`` (FLOAT4E2M1), FP8 E4M3 scale per 16 along K, fp32 per-tensor scale
            ``amax / (6 * 448)``: ``DQ(DQ(scales_fp8, s_tensor), codes, axis=0, block_size=16)`` (opset 23),
            computed by :func:`qc_compile.plugins.formats.quantize_nvfp4` (the kernels' reference).
            ``int6_sim``: INT8 storage with codes in [-31, 31] — simulated, never sent to TensorRT.
activation  ``fp8_e4m3`` / ``int8``: per-tensor static ``act_scale`` (scalar Q/DQ); or, with ``act_scale:
            "dynamic"``, per token: ``s = max(ReduceMax(|x|, -1), floor) / qmax``, ``Q/DQ(x / s)`` at scale 1 into
            the MatMul and ``Mul(s)`` on its output (exact: a per-row scale commutes with ``x W``), so the GEMM still
            sees a plain scalar Q/DQ pair (the fast kernels' per-token computation, torch_package's too).
            ``nvfp4``: ``trt::TRT_FP4DynamicQuantize(x, s_tensor; axis=-1, block_size=16, scale_type=FP8E4M3)``
            -> ``DQ(block_scales, s_tensor)`` -> ``DQ(x_fp4, ., axis=-1, block_size=16)``, the ModelOpt export
            pattern. TensorRT-only: onnxruntime has no kernel for it (and none for FLOAT4E2M1 DequantizeLinear), so
            numerical checks run the graph after :func:`~qc_compile.passes.ort_twin.pass_ort_twin`.
            ``int6_sim``: INT8 Q, Clip to +-31, DQ — simulated.
==========  =====================================================================================================

The graph's opset is raised to what its formats need (19 FP8, 21 INT4, 23 NVFP4).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
import torch
from onnx import TensorProto, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from qc_compile.passes.common import (PassError, cleanup, const_values, find_linear, insert_before, set_opset,
                                      uid)
from qc_compile.plan import ACTIVATION_FORMATS, WEIGHT_FORMATS, LinearPlan
from qc_compile.plugins.codecs import CODECS, quantize_nvfp4

TRT_DOMAIN = "trt"
FP4_SCALE_TYPE = int(TensorProto.FLOAT8E4M3FN)


def lazy_const(name: str, array: np.ndarray) -> gs.Constant:
    """A constant of an ml_dtypes type (fp8 / int4 / fp4) that graphsurgeon cannot serialise itself."""
    return gs.Constant(name, LazyValues(numpy_helper.from_array(np.ascontiguousarray(array), name)))


# ------------------------------------------------------------------------------------------------ quantizers
def _np(t: torch.Tensor, dtype) -> np.ndarray:
    """A torch tensor ``[N, ...]`` as a numpy array of ``dtype`` (an ml_dtypes type for fp8), transposed to ``[K, N]``."""
    t = t.contiguous()
    a = t.view(torch.uint8).numpy().view(dtype) if t.dtype == torch.float8_e4m3fn else t.numpy().astype(dtype)
    return np.ascontiguousarray(a.T)


def quantize_weight(w: np.ndarray, fmt: str) -> dict:
    """Quantize ``w [K, N]`` with the format's codec (given-scale form, as QuantizeLinear); returns the arrays the DQ
    chain needs (codes, scales, axis, block)."""
    c = CODECS.get(fmt)
    if c is None or c.kind == "none":
        raise PassError(f"weight format {fmt!r} has no Q/DQ form")
    k = w.shape[0]
    if c.block and k % c.block:
        raise PassError(f"{fmt}: input size {k} does not divide by the block {c.block}")
    wt = torch.from_numpy(np.ascontiguousarray(w.astype(np.float32).T))  # [N, K], rows = output channels
    if c.kind == "e2m1":
        vals, bscale, gscale = quantize_nvfp4(wt)
        return {"codes": _np(vals, ml_dtypes.float4_e2m1fn), "block_scale": _np(bscale, ml_dtypes.float8_e4m3fn),
                "scale": np.array(float(gscale), dtype=np.float32), "axis": 0, "block": c.block}
    if c.block:
        q, scale = c.quantize_blocks(wt)
        return {"codes": _np(q, ml_dtypes.int4), "scale": _np(scale, np.float32), "axis": 0, "block": c.block}
    q, scale = c.quantize_channels(wt)
    return {"codes": _np(q, ml_dtypes.float8_e4m3fn if c.kind == "float8" else np.int8), "scale": scale.numpy(),
            "axis": 1, "block": None}


def dequantize_weight(q: dict) -> np.ndarray:
    """What the DQ chain computes, in numpy (used by tests, the torch package and the onnxruntime twin)."""
    codes = q["codes"].astype(np.float32)
    if "block_scale" in q:
        scale = (q["block_scale"].astype(np.float32) * q["scale"]).astype(np.float32)
    else:
        scale = q["scale"]
    if q["block"]:
        scale = np.repeat(scale, q["block"], axis=q["axis"])
    elif q["axis"] == 1:
        scale = scale[None, :]
    return (codes * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------ graph edits
def _weight_dq(graph: gs.Graph, lin, fmt: str) -> None:
    q = quantize_weight(const_values(lin.weight), fmt)
    name = lin.name
    out = gs.Variable(uid(f"{name}.weight_dq"), dtype=np.float32)
    codes = lazy_const(f"{name}.weight_q", q["codes"])
    attrs = {"axis": q["axis"]}
    if q["block"]:
        attrs["block_size"] = q["block"]
    if "block_scale" in q:
        sdq = gs.Variable(uid(f"{name}.weight_scale_dq"), dtype=np.float32)
        graph.nodes.append(gs.Node("DequantizeLinear", name=uid(f"{name}.weight_scale_dq"),
                                   inputs=[lazy_const(f"{name}.weight_block_scale", q["block_scale"]),
                                           gs.Constant(f"{name}.weight_scale", q["scale"])], outputs=[sdq]))
        scale_in = sdq
    else:
        scale_in = gs.Constant(f"{name}.weight_scale", q["scale"])
    graph.nodes.append(gs.Node("DequantizeLinear", name=uid(f"{name}.weight_dq"), inputs=[codes, scale_in],
                               outputs=[out], attrs=attrs))
    lin.matmul.inputs[1] = out


def _act_qdq(graph: gs.Graph, lin, e: LinearPlan) -> None:
    fmt, name, mm = e.activation, lin.name, lin.matmul
    if fmt == "nvfp4":
        g = np.array(e.global_scale, dtype=np.float32)
        x = mm.inputs[0]
        restore = None
        if x.shape is None or len(x.shape) not in (2, 3):  # IDynamicQuantizeLayer takes 2-D or 3-D input
            shape = gs.Variable(uid(f"{name}.x_shape"), dtype=np.int64)
            flat = gs.Variable(uid(f"{name}.x_2d"), dtype=np.float32)
            graph.nodes += [gs.Node("Shape", name=uid(f"{name}.x_shape"), inputs=[x], outputs=[shape]),
                            gs.Node("Reshape", name=uid(f"{name}.x_2d"), outputs=[flat],
                                    inputs=[x, gs.Constant(uid(f"{name}.x_2d_shape"),
                                                           np.array([-1, lin.k], dtype=np.int64))])]
            x, restore = flat, shape
        xf4 = gs.Variable(uid(f"{name}.x_fp4"))
        xs8 = gs.Variable(uid(f"{name}.x_block_scale"))
        sdq = gs.Variable(uid(f"{name}.x_scale_dq"), dtype=np.float32)
        out = gs.Variable(uid(f"{name}.x_dq"), dtype=np.float32)
        dq = gs.Node("TRT_FP4DynamicQuantize", name=uid(f"{name}.x_dynq"),
                     inputs=[x, gs.Constant(uid(f"{name}.x_scale"), g)], outputs=[xf4, xs8],
                     attrs={"axis": -1, "block_size": 16, "scale_type": FP4_SCALE_TYPE}, domain=TRT_DOMAIN)
        graph.nodes += [
            dq,
            gs.Node("DequantizeLinear", name=uid(f"{name}.x_scale_dq"),
                    inputs=[xs8, gs.Constant(uid(f"{name}.x_scale"), g)], outputs=[sdq]),
            gs.Node("DequantizeLinear", name=uid(f"{name}.x_dq"), inputs=[xf4, sdq], outputs=[out],
                    attrs={"axis": -1, "block_size": 16}),
        ]
        if restore is not None:
            back = gs.Variable(uid(f"{name}.x_dq_nd"), dtype=np.float32)
            graph.nodes.append(gs.Node("Reshape", name=uid(f"{name}.x_dq_nd"), inputs=[out, restore],
                                       outputs=[back]))
            out = back
        mm.inputs[0] = out
        return
    if e.act_scale == "dynamic":
        return _act_qdq_per_token(graph, lin, e)
    scale = np.array(e.act_scale, dtype=np.float32)
    zp_dtype = ml_dtypes.float8_e4m3fn if fmt == "fp8_e4m3" else np.int8
    zp = lazy_const(uid(f"{name}.x_zp"), np.zeros((), dtype=zp_dtype))
    qn = insert_before(graph, mm, 0, "QuantizeLinear", [gs.Constant(uid(f"{name}.x_scale"), scale), zp],
                       name=f"{name}.x_q", dtype=None)
    if fmt == "int6_sim":
        qmax = ACTIVATION_FORMATS[fmt].qmax
        insert_before(graph, mm, 0, "Clip", [gs.Constant(uid(f"{name}.x_lo"), np.array(-qmax, np.int8)),
                                             gs.Constant(uid(f"{name}.x_hi"), np.array(qmax, np.int8))],
                      name=f"{name}.x_clip", dtype=None)
    insert_before(graph, mm, 0, "DequantizeLinear", [gs.Constant(uid(f"{name}.x_scale"), scale)],
                  name=f"{name}.x_dq", dtype=np.float32)


def _act_qdq_per_token(graph: gs.Graph, lin, e: LinearPlan) -> None:
    """Per-token dynamic activation quantization around the MatMul (see the module docstring)."""
    from qc_compile.plugins.codecs import AMAX_FLOOR

    fmt, name, mm = e.activation, lin.name, lin.matmul
    c = ACTIVATION_FORMATS[fmt]
    x = mm.inputs[0]
    f32 = np.float32
    ab, mx, mf, sc = (gs.Variable(uid(f"{name}.x_{k}"), dtype=f32) for k in ("abs", "rowmax", "rowmax_f", "rowscale"))
    graph.nodes += [
        gs.Node("Abs", name=uid(f"{name}.x_abs"), inputs=[x], outputs=[ab]),
        gs.Node("ReduceMax", name=uid(f"{name}.x_rowmax"), attrs={"keepdims": 1},
                inputs=[ab, gs.Constant(uid(f"{name}.x_axes"), np.array([-1], dtype=np.int64))], outputs=[mx]),
        gs.Node("Max", name=uid(f"{name}.x_rowmax_f"), inputs=[mx, gs.Constant(uid(f"{name}.x_floor"),
                                                                                np.array(AMAX_FLOOR, f32))],
                outputs=[mf]),
        gs.Node("Div", name=uid(f"{name}.x_rowscale"), inputs=[mf, gs.Constant(uid(f"{name}.x_qmax"),
                                                                                np.array(c.qmax, f32))],
                outputs=[sc]),
    ]
    insert_before(graph, mm, 0, "Div", [sc], name=f"{name}.x_norm")
    one = np.array(1.0, dtype=f32)
    zp_dtype = ml_dtypes.float8_e4m3fn if fmt == "fp8_e4m3" else np.int8
    zp = lazy_const(uid(f"{name}.x_zp"), np.zeros((), dtype=zp_dtype))
    insert_before(graph, mm, 0, "QuantizeLinear", [gs.Constant(uid(f"{name}.x_scale"), one), zp],
                  name=f"{name}.x_q", dtype=None)
    insert_before(graph, mm, 0, "DequantizeLinear", [gs.Constant(uid(f"{name}.x_scale"), one)],
                  name=f"{name}.x_dq", dtype=f32)
    y = mm.outputs[0]
    raw = gs.Variable(uid(f"{name}.mm_raw"), dtype=f32)
    mm.outputs[0] = raw
    graph.nodes.append(gs.Node("Mul", name=uid(f"{name}.x_unscale"), inputs=[raw, sc], outputs=[y]))


def required_opset(entries: dict[str, LinearPlan]) -> int:
    need = 13
    for e in entries.values():
        need = max(need, WEIGHT_FORMATS[e.weight].min_opset, ACTIVATION_FORMATS[e.activation].min_opset)
    return need


def pass_insert_qdq(graph: gs.Graph, entries: dict[str, LinearPlan], *, report: dict | None = None) -> gs.Graph:
    """Quantize the linears of this graph per their plan entries (others untouched)."""
    report = report if report is not None else {}
    present = {t.name[:-len(".weight")] for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and t.name.endswith(".weight")}
    mine = {k: v for k, v in entries.items() if k in present}
    for name, e in mine.items():
        if e.weight == "bf16" and e.activation == "bf16":
            continue
        lin = find_linear(graph, name)
        if e.weight != "bf16":
            _weight_dq(graph, lin, e.weight)
        if e.activation != "bf16":
            _act_qdq(graph, lin, e)
        report[name] = f"W:{e.weight} A:{e.activation}"
    if mine and required_opset(mine) > graph.opset:
        set_opset(graph, required_opset(mine))
    return cleanup(graph)
