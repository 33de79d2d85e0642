"""The dtype audit: every op's compute dtype in a unit graph, checked against the plan and the unit's half type.

What it checks (independently of :mod:`~qc_compile.passes.cast_precision`, from the ONNX types alone):

* every linear of the plan runs its GEMM in the plan's formats: the weight input is a DequantizeLinear of codes in the
  weight format (or a half-type constant for ``bf16``), the activation input a DequantizeLinear of a
  QuantizeLinear / ``TRT_FP4DynamicQuantize`` in the activation format (or a half-type tensor for ``bf16``);
* every other float op computes in the unit's half type, except nodes tagged ``qc.fp32:<category>`` whose op is
  allowed for that category (see :data:`ALLOWED`) and, for ``shape``, whose value really depends only on constants and
  tensor shapes.

A node computes in the type of its float output (for ops with no float output, of its float inputs). The result is a
JSON-able dict (``ops``, ``counts``, ``violations``); :func:`check` raises a UserError naming the unit and op.
"""

from __future__ import annotations

from collections import Counter

import onnx
from onnx import TensorProto

from qc_compile.errors import UserError
from qc_compile.passes.cast_precision import CATEGORIES, HEAVY, NORM_OPS, SINUSOID_OPS, TAG

T = TensorProto
NAMES = {T.FLOAT: "float32", T.FLOAT16: "float16", T.BFLOAT16: "bfloat16", T.FLOAT8E4M3FN: "fp8_e4m3",
         T.INT8: "int8", T.INT4: "int4", T.FLOAT4E2M1: "fp4_e2m1", T.DOUBLE: "float64"}
FLOATS = {T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE}
ALLOWED = {"io": {"Cast"}, "shape": None, "sinusoid": SINUSOID_OPS, "norm_stats": NORM_OPS | {"Cast"}}
# plan format -> the code type its DequantizeLinear reads
WEIGHT_CODES = {"fp8_e4m3": T.FLOAT8E4M3FN, "int8": T.INT8, "int6_sim": T.INT8, "int4_b64": T.INT4,
                "int4_b128": T.INT4, "nvfp4": T.FLOAT4E2M1}
ACT_CODES = {"fp8_e4m3": "fp8_e4m3", "int8": "int8", "int6_sim": "int8", "nvfp4": "nvfp4"}
GEMMS = {"MatMul", "Gemm"}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    out.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t.data_type
    return out


def _static(model: onnx.ModelProto) -> set[str]:
    """Names of nodes computed only from constants and shapes."""
    known = {i.name for i in model.graph.initializer} | {""}
    out = set()
    for n in model.graph.node:
        if n.op_type in HEAVY or n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type in ("Shape", "Constant") or all(i in known for i in n.input):
            known.update(n.output)
            out.add(n.name)
    return out


def _gemm_side(model_nodes: dict[str, onnx.NodeProto], types: dict[str, int], tensor: str, half: int) -> str:
    """What a GEMM input is: a format name (fp8_e4m3, int8, int4, nvfp4, fp4_e2m1) or the float type name."""
    p = model_nodes.get(tensor)
    hops = 0
    while p is not None and p.op_type in ("Reshape", "Transpose", "Identity") and hops < 4:
        p, hops = model_nodes.get(p.input[0]), hops + 1
    if p is not None and p.op_type == "DequantizeLinear":
        src = model_nodes.get(p.input[0])
        if src is not None and src.op_type == "TRT_FP4DynamicQuantize":
            return "nvfp4"
        code = types.get(p.input[0])
        if src is not None and src.op_type == "Clip":  # int6_sim: Q -> Clip -> DQ
            return "int8"
        return NAMES.get(code, f"type{code}")
    return NAMES.get(types.get(tensor), "unknown")


def audit(model: onnx.ModelProto, *, half: str = "bfloat16", linears: dict | None = None, unit: str = "") -> dict:
    """Audit ``model``. ``linears``: ``{name: LinearPlan}`` of the plan for this unit (None: skip the plan check)."""
    half_t = {"bfloat16": T.BFLOAT16, "float16": T.FLOAT16, "float32": T.FLOAT}[half]
    types = _types(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    static = _static(model)
    ops, violations = [], []
    counts: Counter = Counter()
    weight_of: dict[str, str] = {}
    for i in model.graph.initializer:
        for suffix in (".weight_q", ".weight"):
            if i.name.endswith(suffix):
                weight_of[i.name] = i.name[: -len(suffix)]
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue
        fin = [types.get(i) for i in n.input if i and types.get(i) in FLOATS]
        fout = [types.get(o) for o in n.output if types.get(o) in FLOATS]
        cat = n.doc_string[len(TAG):] if n.doc_string.startswith(TAG) else None
        rec = {"op": n.op_type, "name": n.name}
        if n.domain not in ("", "ai.onnx"):
            rec["op"] = f"{n.domain}::{n.op_type}"
        if n.op_type in GEMMS:
            a = _gemm_side(producers, types, n.input[0], half_t)
            w = _gemm_side(producers, types, n.input[1], half_t)
            rec["compute"] = f"w:{w} a:{a}"
            rec["out"] = NAMES.get(types.get(n.output[0]), "unknown")
            lin = _linear_of(n, producers, weight_of)
            if lin:
                rec["linear"] = lin
            counts[rec["compute"]] += 1
            if half_t != T.FLOAT and "float32" in (a, w, rec["out"]):
                violations.append(f"{n.op_type} {n.name!r} computes {rec['compute']} -> {rec['out']} (float32)")
            if linears is not None and lin in linears:
                e = linears[lin]
                want_w = "float" if e.weight == "bf16" else NAMES[WEIGHT_CODES[e.weight]]
                want_a = "float" if e.activation == "bf16" else ACT_CODES[e.activation]
                got_w = "float" if w in ("bfloat16", "float16") else w
                got_a = "float" if a in ("bfloat16", "float16") else a
                rec["plan"] = f"W:{e.weight} A:{e.activation}"
                if (got_w, got_a) != (want_w, want_a):
                    violations.append(f"linear {lin} ({n.name!r}) runs w:{w} a:{a}, the plan says W:{e.weight} "
                                      f"A:{e.activation}")
            ops.append(rec)
            continue
        if not fout and (not fin or n.op_type in ("Shape", "Size")):
            continue  # integer / bool / shape work
        compute = fout[0] if fout else fin[0]
        if n.domain == "qc":  # a plugin computes in its data type; float32 scales/stats are its declared interface
            halves = [t for t in fin + fout if t in (T.BFLOAT16, T.FLOAT16)]
            compute = halves[0] if halves else compute
        if n.op_type == "QuantizeLinear" or n.op_type == "TRT_FP4DynamicQuantize":
            compute = fin[0] if fin else compute
        rec["compute"] = NAMES.get(compute, f"type{compute}")
        if cat:
            rec["fp32_category"] = cat
        ops.append(rec)
        counts[rec["compute"]] += 1
        if compute == half_t or compute in (T.FLOAT16, T.BFLOAT16) and half_t == T.FLOAT:
            continue
        if compute == T.FLOAT:
            if cat is None:
                violations.append(f"{rec['op']} {n.name!r} computes in float32 (unit runs in {half})")
            elif cat not in CATEGORIES:
                violations.append(f"{rec['op']} {n.name!r}: unknown float32 category {cat!r}")
            elif ALLOWED[cat] is not None and n.op_type not in ALLOWED[cat]:
                violations.append(f"{rec['op']} {n.name!r} is tagged {cat!r}, which does not allow {n.op_type}")
            elif cat == "shape" and n.name not in static:
                violations.append(f"{rec['op']} {n.name!r} is tagged 'shape' but depends on a graph input's data")
            elif cat == "io" and not (set(n.input) & {i.name for i in model.graph.input}
                                      or set(n.output) & {o.name for o in model.graph.output}):
                violations.append(f"Cast {n.name!r} is tagged 'io' but touches no graph input or output")
        elif compute == T.DOUBLE:
            violations.append(f"{rec['op']} {n.name!r} computes in float64")
    fp32 = [o for o in ops if o.get("compute") == "float32" or "float32" in o.get("compute", "").split(":")]
    by_cat = Counter(o.get("fp32_category", "none") for o in fp32)
    return {"unit": unit, "half": half, "ops": ops, "counts": dict(counts), "float32_ops": len(fp32),
            "float32_by_category": dict(by_cat), "float32_unexcepted": by_cat.get("none", 0),
            "violations": violations}


def _linear_of(n: onnx.NodeProto, producers: dict, weight_of: dict[str, str]) -> str | None:
    t = n.input[1]
    for _ in range(4):
        if t in weight_of:
            return weight_of[t]
        p = producers.get(t)
        if p is None:
            return None
        t = p.input[0]
    return None


def check(result: dict, *, where: str = "") -> None:
    """UserError naming the unit and the first ops that run wider (or other) than the plan says."""
    v = result["violations"]
    if v:
        more = f" (and {len(v) - 3} more)" if len(v) > 3 else ""
        raise UserError(f"{where or 'graph'}: dtype audit of unit {result['unit']!r} failed: {'; '.join(v[:3])}{more}. "
                        "Every op must run in the unit's half type or the plan's quantized formats, except the "
                        "documented float32 exceptions (qc_compile/passes/cast_precision.py). This is a bug in the "
                        "graph passes; report it with the plan.")
