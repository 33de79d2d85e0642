"""Make a float32 Q/DQ unit graph precision-true: every float op runs in the target's half type (bf16, or fp16 where
the GPU has no bf16) except a short, documented list, with Casts only where strong typing needs them.

Why a pass of our own rather than ModelOpt's AutoCast: our unit graphs have a small known op set, AutoCast needs
onnxruntime reference runs of the graph (our Q/DQ graphs carry TensorRT-only ops) and a large dependency; this pass is
a type rewrite plus four patterns, each tested.

Exceptions that stay float32 (each node tagged ``doc_string = "qc.fp32:<category>"`` so
:mod:`qc_compile.passes.dtype_audit` can check them independently):

=============  =====================================================================================================
``io``         Casts at the unit's float inputs/outputs: the engine interface stays float32, so the runtime's
               caches, statistics and sampler are unchanged (two elementwise casts per unit).
``shape``      float arithmetic computed only from constants and tensor shapes (RoPE tables, the attention scale
               ``1/sqrt(sqrt(d))``): TensorRT folds it at build time; its result is cast once where it is used.
``sinusoid``   the timestep / fps sinusoidal embedding up to Sin/Cos: a bf16 timestep rounds 999 to 1000.
``norm_stats`` RMSNorm's mean of squares, rsqrt and normalisation (the model computes them in float32 with
               ``x.float()``, as Open-Sora does). LayerNormalization runs in bf16 with ``stash_type=1``, i.e. its
               statistics in float32 as the ONNX spec defines.
=============  =====================================================================================================

Q/DQ: QuantizeLinear inputs and scales and DequantizeLinear scales take the half type (ONNX ties DequantizeLinear's
output type to its scale's; TensorRT's strong typing then runs the GEMM in the half type), i.e. scales are rounded to
bf16 (relative change <= 2**-9 per scale). Softmax runs in bf16 (TensorRT's fused attention accumulates in float32).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qc_compile.passes.common import PassError, cleanup, const_values, uid
from qc_compile.passes.insert_qdq import lazy_const

HALF = {"bfloat16": (ml_dtypes.bfloat16, TensorProto.BFLOAT16), "float16": (np.float16, TensorProto.FLOAT16)}
TAG = "qc.fp32:"
CATEGORIES = ("io", "shape", "sinusoid", "norm_stats")
HEAVY = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Softmax", "LayerNormalization", "QuantizeLinear",
         "DequantizeLinear", "Einsum"}
SINUSOID_OPS = {"Sin", "Cos", "Mul", "Div", "Add", "Sub", "Unsqueeze", "Reshape", "Cast", "Expand", "Concat", "Slice",
                "Gather", "Squeeze", "Transpose", "Identity", "Exp", "Neg"}
NO_COMPUTE = {"Cast", "Shape", "Size"}  # read a float tensor without computing in its type
NORM_OPS = {"Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reciprocal", "Mul"}


def dt(t: gs.Tensor) -> np.dtype | None:
    """A tensor's numpy dtype (graphsurgeon stores ONNX enums for types numpy lacks, e.g. fp8), or None."""
    if t is None or t.dtype is None:
        return None
    if isinstance(t.dtype, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.dtype))
    return np.dtype(t.dtype)


def is_float32(t: gs.Tensor) -> bool:
    return dt(t) == np.dtype(np.float32)


def tag(node: gs.Node, category: str) -> None:
    """Mark ``node`` as a float32 exception (written to its doc_string by :func:`export_tagged`)."""
    setattr(node, "_qc_fp32", category)


def category_of(node_proto: onnx.NodeProto) -> str | None:
    return node_proto.doc_string[len(TAG):] if node_proto.doc_string.startswith(TAG) else None


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


# ------------------------------------------------------------------------------------------------ classification
def static_nodes(graph: gs.Graph) -> set[int]:
    """ids of nodes whose value depends only on constants and tensor shapes (never on a graph input's data)."""
    static_t: set[str] = set()
    out: set[int] = set()
    for n in graph.nodes:  # toposorted
        if n.op in HEAVY or n.domain not in (None, "", "ai.onnx"):
            continue
        ok = n.op == "Shape" or all(isinstance(i, gs.Constant) or i.name in static_t or i.name == ""
                                    for i in n.inputs)
        if ok:
            out.add(id(n))
            static_t.update(o.name for o in n.outputs)
    return out


def _is_const(t: gs.Tensor, value: float | None = None) -> bool:
    if not isinstance(t, gs.Constant):
        return False
    return value is None or bool(np.all(const_values(t).astype(np.float64) == value))


def norm_stat_nodes(graph: gs.Graph) -> set[int]:
    """RMSNorm statistics: ``Pow(h, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(1, .)|Reciprocal -> Mul(h, .)``
    (or ``Div(h, Sqrt(..))``)."""
    out: set[int] = set()
    for rm in graph.nodes:
        if rm.op != "ReduceMean":
            continue
        pw = _producer(rm.inputs[0])
        if pw is None or pw.op != "Pow" or not _is_const(pw.inputs[1], 2.0):
            continue
        h = pw.inputs[0]
        chain = [pw, rm]
        cur = rm.outputs[0]
        for op in ("Add", "Sqrt"):
            nxt = [c for c in cur.outputs if c.op == op]
            if len(nxt) != 1:
                break
            chain.append(nxt[0])
            cur = nxt[0].outputs[0]
        else:
            for c in cur.outputs:
                if c.op == "Div" and c.inputs[0] is h:  # h / sqrt(...)
                    chain.append(c)
                elif c.op in ("Div", "Reciprocal"):
                    chain.append(c)
                    for m in c.outputs[0].outputs:
                        if m.op == "Mul" and h in m.inputs:
                            chain.append(m)
            if chain[-1].op in ("Mul", "Div") and len(chain) >= 5:
                out.update(id(n) for n in chain)
    return out


def sinusoid_nodes(graph: gs.Graph, static: set[int]) -> set[int]:
    """Sin/Cos computed from data (timestep, fps) and the float arithmetic feeding them."""
    out: set[int] = set()
    todo = [n for n in graph.nodes if n.op in ("Sin", "Cos") and id(n) not in static]
    while todo:
        n = todo.pop()
        if id(n) in out or id(n) in static:
            continue
        out.add(id(n))
        for i in n.inputs:
            p = _producer(i)
            if p is not None and p.op in SINUSOID_OPS and is_float32(i):
                todo.append(p)
    return out


# ------------------------------------------------------------------------------------------------ the pass
def _name(t: gs.Tensor) -> str:
    """dtype name in the plugins' vocabulary (float32 float16 bfloat16 fp8 int8)."""
    d = dt(t)
    if d is None or d == np.dtype(ml_dtypes.float8_e4m3fn):
        return "fp8"
    return d.name

def _half_const(values: np.ndarray, half) -> np.ndarray:
    info = ml_dtypes.finfo(half) if half is ml_dtypes.bfloat16 else np.finfo(half)
    v = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(v)
    v = np.where(finite, np.clip(v, -float(info.max), float(info.max)), v)  # -FLT_MAX must not become -inf
    return v.astype(half)


def _wanted_inputs(node: gs.Node, half_name: str) -> list[str | None]:
    """Per input: the float type this (converted) node needs there, or None to leave the edge alone."""
    n = len(node.inputs)
    if node.op in NO_COMPUTE:
        return [None] * n
    if node.domain == "qc":
        from qc_compile.plugins.trt_plugins import supported_dtypes

        chosen: list[str] = []
        out = []
        for pos, t in enumerate(node.inputs):
            if is_float32(t):
                ok = supported_dtypes(node.op, dict(node.attrs), pos, chosen)
                want = half_name if half_name in ok else "float32"
                chosen.append(want)
                out.append(want)
            else:
                chosen.append(_name(t))
                out.append(None)
        return out
    if node.op == "TRT_FP4DynamicQuantize":
        return [half_name, "float32"]  # the double-quantization scale stays float32 (TensorRT's dynamic quantize)
    return [half_name] * n


def pass_cast_precision(graph: gs.Graph, dtype: str = "bfloat16", *, report: dict | None = None) -> gs.Graph:
    """Rewrite a float32 graph (types known: shape-inferred) to run in ``dtype`` outside the documented exceptions."""
    if dtype not in HALF:
        raise PassError(f"cast_precision: dtype must be one of {sorted(HALF)}, got {dtype!r}")
    half, half_proto = HALF[dtype]
    report = report if report is not None else {}
    graph.toposort()
    # Constant nodes become constant tensors, so every constant is converted per use in one place.
    for n in list(graph.nodes):
        if n.op == "Constant" and isinstance(n.attrs.get("value"), gs.Constant):
            c = n.attrs["value"]
            out = n.outputs[0]
            vals = const_values(c)
            newc = gs.Constant(uid(out.name or "const"), np.array(vals)) if vals.dtype.kind in "fiub" and \
                vals.dtype.itemsize > 1 else lazy_const(uid(out.name or "const"), vals)
            for consumer in list(out.outputs):
                consumer.inputs[[i for i, t in enumerate(consumer.inputs) if t is out][0]] = newc
            n.outputs.clear()
    cleanup(graph)
    static = static_nodes(graph)
    keep: dict[int, str] = {i: "shape" for i in static}
    keep.update({i: "norm_stats" for i in norm_stat_nodes(graph) if i not in keep})
    keep.update({i: "sinusoid" for i in sinusoid_nodes(graph, static) if i not in keep})
    floaty = [n for n in graph.nodes
              if any(is_float32(t) for t in list(n.inputs) + list(n.outputs)) or n.domain == "qc"]
    converted = [n for n in floaty if id(n) not in keep]
    kept = [n for n in floaty if id(n) in keep]
    half_np = np.dtype(half)
    # 1. new output types
    for n in converted:
        if n.op == "Cast":
            if int(n.attrs["to"]) == TensorProto.FLOAT:
                n.attrs["to"] = half_proto
                n.outputs[0].dtype = half_np
            continue
        if n.op == "LayerNormalization":
            n.attrs["stash_type"] = 1
        if n.domain == "qc":
            continue  # outputs set below from the plugin's own dtype rules
        for o in n.outputs:
            if is_float32(o):
                o.dtype = half_np
    for n in kept:
        if any(is_float32(o) for o in n.outputs):  # Shape & co. read a float tensor but compute nothing in it
            tag(n, keep[id(n)])
    casts: dict[tuple[str, str], gs.Tensor] = {}
    const_copies: dict[tuple[int, str], gs.Constant] = {}
    counts = {"casts": 0, "constants": 0}

    def cast_of(t: gs.Tensor, to: str, category: str) -> gs.Tensor:
        key = (t.name, to)
        if key not in casts:
            out = gs.Variable(uid(f"{t.name}_{to}"), dtype=np.dtype(half if to != "float32" else np.float32),
                              shape=t.shape)
            node = gs.Node("Cast", name=uid(f"{t.name}_cast_{to}"), inputs=[t], outputs=[out],
                           attrs={"to": half_proto if to != "float32" else TensorProto.FLOAT})
            if to == "float32" or category == "io":
                tag(node, category)
            graph.nodes.append(node)
            casts[key] = out
            counts["casts"] += 1
        return casts[key]

    def const_as(c: gs.Constant, to: str) -> gs.Constant:
        key = (id(c), to)
        if key not in const_copies:
            vals = const_values(c)
            if to == "float32":
                const_copies[key] = c
            else:
                const_copies[key] = lazy_const(uid(c.name) if len(c.outputs) > 1 else c.name + "__h",
                                               _half_const(vals, half))
                counts["constants"] += 1
        return const_copies[key]

    inputs = {t.name for t in graph.inputs}
    # 2. make every edge agree with what its consumer computes in
    for n in converted + kept:
        wanted = _wanted_inputs(n, dtype) if id(n) not in keep else \
            [None if n.op in NO_COMPUTE else "float32"] * len(n.inputs)
        for i, (t, want) in enumerate(zip(list(n.inputs), wanted)):
            have = dt(t)
            if want is None or have is None:
                continue
            if have not in (np.dtype(np.float32), half_np):
                continue
            if isinstance(t, gs.Constant):
                if have == np.dtype(np.float32) and want != "float32":
                    n.inputs[i] = const_as(t, want)
                continue
            want_np = np.dtype(np.float32) if want == "float32" else half_np
            if have != want_np:
                cat = "io" if t.name in inputs else keep.get(id(_producer(t)), None) or keep.get(id(n), "io")
                n.inputs[i] = cast_of(t, want, cat)
        if n.domain == "qc" and id(n) not in keep:
            from qc_compile.plugins.trt_plugins import output_dtypes

            if "out_dtype" in n.attrs:
                n.attrs["out_dtype"] = {"float32": 0, "float16": 1, "bfloat16": 2}[dtype]
            names = [_name(t) for t in n.inputs]
            for o, name in zip(n.outputs, output_dtypes(n.op, dict(n.attrs), names)):
                if name in HALF or name == "float32":
                    o.dtype = np.dtype(HALF[name][0] if name in HALF else np.float32)
    # 3. graph outputs stay float32
    for k, out in enumerate(list(graph.outputs)):
        if dt(out) == half_np:
            inner = gs.Variable(uid(f"{out.name}_{dtype}"), dtype=half_np, shape=out.shape)
            p = _producer(out)
            p.outputs[p.outputs.index(out)] = inner
            for c in list(out.outputs):
                c.inputs[[j for j, x in enumerate(c.inputs) if x is out][0]] = inner
            node = gs.Node("Cast", name=uid(f"{out.name}_cast_out"), inputs=[inner], outputs=[out],
                           attrs={"to": TensorProto.FLOAT})
            out.dtype = np.float32
            tag(node, "io")
            graph.nodes.append(node)
            counts["casts"] += 1
    # 4. drop Casts that became no-ops (half -> half)
    for n in list(graph.nodes):
        if n.op == "Cast" and n.inputs and n.outputs and dt(n.inputs[0]) is not None and \
                dt(n.inputs[0]) == dt(n.outputs[0]) and n.outputs[0] not in graph.outputs:
            src, dst = n.inputs[0], n.outputs[0]
            for c in list(dst.outputs):
                for j, x in enumerate(c.inputs):
                    if x is dst:
                        c.inputs[j] = src
            n.outputs.clear()
    cleanup(graph)
    cats: dict[str, int] = {}
    for n in graph.nodes:
        c = getattr(n, "_qc_fp32", None)
        if c:
            cats[c] = cats.get(c, 0) + 1
    report.update({"dtype": dtype, "float32_nodes": cats, **counts})
    return graph


def export_tagged(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx`` keeping the ``qc.fp32:<category>`` tags in each NodeProto's doc_string."""
    tags = {n.name: getattr(n, "_qc_fp32", None) for n in graph.nodes}
    model = gs.export_onnx(graph)
    for p in model.graph.node:
        c = tags.get(p.name)
        if c:
            p.doc_string = f"{TAG}{c}"
    return model


def import_tagged(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx`` restoring the tags (graphsurgeon drops doc_string)."""
    tags = {p.name: category_of(p) for p in model.graph.node}
    graph = gs.import_onnx(model)
    for n in graph.nodes:
        if tags.get(n.name):
            setattr(n, "_qc_fp32", tags[n.name])
    return graph
