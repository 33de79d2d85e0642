"""Structure rules of TensorRT 10.x explicit quantization, checked on an ONNX graph without TensorRT.

Full TensorRT cannot be installed on the project's machines, so ``build --target trt`` graphs are checked here
against the documented rules (TensorRT docs "Working with Quantized Types": Quantization Schemes, Explicit
Quantization; the DynamicQuantize operator page; the ONNX parser's operator notes). Each rule has a test with a graph
that breaks it (tests/test_trt_rules.py); TensorRT-RTX builds in CI run the same check on graphs its real parser and
builder accept.

=======  ===========================================================================================================
rule     what TensorRT requires
=======  ===========================================================================================================
SYM      symmetric quantization only: a zero point, when given, is all zeros
CONST    Q/DQ scales are build-time constants (initializers / Constant nodes; for FP4's two-level scale a DQ of
         constant FP8 block scales, or of the block scales ``TRT_FP4DynamicQuantize`` computes, by a constant
         per-tensor scale), finite and positive, of a 16- or 32-bit float type
GRAIN    a scale is a scalar (per tensor), 1-D along ``axis`` with that axis' extent (per channel), or a
         same-rank tensor with ``block_size`` (block quantization)
INT4     INT4 is weight-only: only DequantizeLinear of a constant INT4 weight, block size 64 or 128 along one of the
         last two axes; no QuantizeLinear to INT4 on activations
ACT      an activation (non-constant) Q/DQ to INT8 / FP8 is per tensor (static scalar scale)
FP4      FP4 activations come from ``TRT_FP4DynamicQuantize`` (block 16 on the last or second-to-last axis of a 2-D
         or 3-D input; build-time-constant double-quantization scale); FP4 weights from a DQ of constant codes with
         block 16 whose scale is a DQ of constant FP8 block scales
GEMM     (a note, not an error) a MatMul with a dequantized INT8/FP8 weight and no dequantized activation of the
         same family: full TensorRT fuses DQ on *both* inputs into a quantized GEMM and has weight-only GEMMs only
         for INT4, so such a weight is folded to a bf16 weight (it parses and builds; no low-bit GEMM).
         TensorRT-RTX lists INT8 weight-only GEMMs, so the note is for ``backend="tensorrt"`` only
OPSET    FP8 types need opset >= 19, INT4 / block quantization >= 21
=======  ===========================================================================================================
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

T = TensorProto
FLOAT_SCALES = {T.FLOAT, T.FLOAT16, T.BFLOAT16}
FAMILY = {T.INT8: "int8", T.FLOAT8E4M3FN: "fp8", T.INT4: "int4", T.FLOAT4E2M1: "fp4"}


class _G:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.consts = {n.output[0]: n.attribute[0].t for n in model.graph.node
                       if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
        self.prod = {o: n for n in model.graph.node for o in n.output}
        inferred = onnx.shape_inference.infer_shapes(model)
        g = inferred.graph
        self.vi = {v.name: v.type.tensor_type for v in list(g.value_info) + list(g.input) + list(g.output)}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def const(self, name: str) -> onnx.TensorProto | None:
        return self.inits.get(name) or self.consts.get(name)

    def elem(self, name: str) -> int | None:
        c = self.const(name)
        if c is not None:
            return c.data_type
        tt = self.vi.get(name)
        return tt.elem_type if tt is not None and tt.elem_type else None

    def shape(self, name: str) -> list | None:
        c = self.const(name)
        if c is not None:
            return list(c.dims)
        tt = self.vi.get(name)
        if tt is None or not tt.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _attr(n: onnx.NodeProto, name: str, default=None):
    for a in n.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _scale_problems(g: _G, n: onnx.NodeProto, data: str, scale: str) -> list[str]:
    out = []
    c = g.const(scale)
    p = g.prod.get(scale)
    if c is None:
        two_level = p is not None and p.op_type == "DequantizeLinear" and g.const(p.input[1]) is not None and (
            g.const(p.input[0]) is not None  # FP4 weight: DQ(constant FP8 block scales)
            or getattr(g.prod.get(p.input[0]), "op_type", "") == "TRT_FP4DynamicQuantize")  # FP4 activation
        if not two_level:
            return [f"CONST: {n.op_type} {n.name!r}: scale {scale!r} is not a build-time constant"]
    else:
        if c.data_type not in FLOAT_SCALES:
            out.append(f"CONST: {n.op_type} {n.name!r}: scale type {T.DataType.Name(c.data_type)} (16/32-bit float "
                       "expected)")
        v = numpy_helper.to_array(c).astype(np.float32)
        if not np.all(np.isfinite(v)) or not np.all(v > 0):
            out.append(f"CONST: {n.op_type} {n.name!r}: scale has non-positive or non-finite values")
    sshape = g.shape(scale)
    dshape = g.shape(data)
    if sshape is None or dshape is None:
        return out
    axis = _attr(n, "axis", 1)
    block = _attr(n, "block_size", 0)
    if block:
        if len(sshape) != len(dshape):
            out.append(f"GRAIN: {n.op_type} {n.name!r}: block scale rank {len(sshape)} != data rank {len(dshape)}")
    elif len(sshape) == 1 and sshape[0] != 1:
        ax = axis % len(dshape)
        if dshape[ax] is not None and sshape[0] != dshape[ax]:
            out.append(f"GRAIN: {n.op_type} {n.name!r}: per-channel scale of {sshape[0]} on axis {axis} of extent "
                       f"{dshape[ax]}")
    elif len(sshape) > 1:
        out.append(f"GRAIN: {n.op_type} {n.name!r}: {len(sshape)}-D scale without block_size")
    return out


def check_graph(model: onnx.ModelProto, backend: str = "tensorrt") -> dict[str, list[str]]:
    """``{"errors": [...], "notes": [...]}``: rule violations (empty errors: the graph follows TensorRT's documented
    Q/DQ rules) and notes (GEMM)."""
    g = _G(model)
    problems: list[str] = []
    notes: list[str] = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "TRT_FP4DynamicQuantize", "MatMul", "Gemm"):
            continue
        if n.op_type == "TRT_FP4DynamicQuantize":
            shape = g.shape(n.input[0])
            if shape is not None and len(shape) not in (2, 3):
                problems.append(f"FP4: {n.name!r}: input rank {len(shape)} (2-D or 3-D required)")
            if _attr(n, "block_size", 16) != 16:
                problems.append(f"FP4: {n.name!r}: block_size {_attr(n, 'block_size')} (16 required)")
            if shape is not None and _attr(n, "axis", -1) % len(shape) < len(shape) - 2:
                problems.append(f"FP4: {n.name!r}: axis must be the last or second-to-last")
            if g.const(n.input[1]) is None:
                problems.append(f"FP4: {n.name!r}: double-quantization scale is not a build-time constant")
            continue
        if n.op_type in ("MatMul", "Gemm"):
            w, x = g.prod.get(n.input[1]), g.prod.get(n.input[0])
            if w is not None and w.op_type == "DequantizeLinear" and g.const(w.input[0]) is not None:
                fam = FAMILY.get(g.elem(w.input[0]))
                if fam in ("int8", "fp8"):
                    xfam = FAMILY.get(g.elem(x.input[0])) if x is not None and x.op_type == "DequantizeLinear" \
                        else None
                    if xfam != fam and backend == "tensorrt":
                        notes.append(f"GEMM: {n.name!r}: {fam} weight without a {fam} activation DQ (TensorRT "
                                        "folds it into a bf16 weight: no weight-only INT8/FP8 GEMM)")
            continue
        q = n.op_type == "QuantizeLinear"
        data, scale = n.input[0], n.input[1]
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        qtype = g.elem(zp) if q and zp else (g.elem(data) if not q else T.UINT8)
        if zp:
            c = g.const(zp)
            if c is None or np.any(numpy_helper.to_array(c).astype(np.float32) != 0):
                problems.append(f"SYM: {n.op_type} {n.name!r}: zero point must be a constant 0")
        problems += _scale_problems(g, n, data if not q else data, scale)
        # a constant weight: a DequantizeLinear of stored codes, or a QuantizeLinear of a float weight that the builder
        # folds into codes (how the plugin pass hands FP8 weights to qc:: plugin inputs)
        is_weight = g.const(data) is not None
        if qtype == T.INT4:
            if q or not is_weight:
                problems.append(f"INT4: {n.op_type} {n.name!r}: INT4 is weight-only (DequantizeLinear of a constant "
                                "weight)")
            elif _attr(n, "block_size", 0) not in (64, 128):
                problems.append(f"INT4: {n.name!r}: block size {_attr(n, 'block_size', 0)} (64 or 128 required)")
            else:
                rank = len(g.shape(data) or [0, 0])
                if _attr(n, "axis", 1) % rank < rank - 2:
                    problems.append(f"INT4: {n.name!r}: the blocked axis must be one of the last two")
        if qtype in (T.INT8, T.FLOAT8E4M3FN) and not is_weight:
            shape = g.shape(scale)
            if shape not in (None, [], [1]) and (q or g.prod.get(data) is not None):
                problems.append(f"ACT: {n.op_type} {n.name!r}: activation scale must be per tensor (scalar)")
        if qtype == T.FLOAT4E2M1:
            src = g.prod.get(data)
            if not is_weight and (src is None or src.op_type != "TRT_FP4DynamicQuantize"):
                problems.append(f"FP4: {n.name!r}: FP4 activations must come from TRT_FP4DynamicQuantize")
            if _attr(n, "block_size", 0) != 16:
                problems.append(f"FP4: {n.name!r}: block size {_attr(n, 'block_size', 0)} (16 required)")
        need = 21 if qtype == T.INT4 or _attr(n, "block_size", 0) else 19 if qtype == T.FLOAT8E4M3FN else 13
        if g.opset < need:
            problems.append(f"OPSET: {n.op_type} {n.name!r} needs opset >= {need}, graph has {g.opset}")
    return {"errors": problems, "notes": notes}
