"""Helpers shared by the graph passes: finding a linear's nodes, owning its constants, inserting nodes.

The exporter (:mod:`qc_compile.export`) leaves every linear in one canonical form::

    x -> MatMul(x, <linear>.weight [K, N]) -> Add(<linear>.bias, .) -> ...

so a pass finds a linear by its weight initializer's name and never by node names or positions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

_counter = itertools.count()
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # graphsurgeon warns about every fp8/int4 constant it sees

SHAPE_OPS = ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten")


class PassError(ValueError):
    """A pass could not find the structure it needs (a graph not exported by qc-compile, or a bad plan)."""


@dataclass
class Linear:
    name: str
    matmul: gs.Node
    weight: gs.Constant  # [K, N]
    bias_add: gs.Node | None
    bias: gs.Constant | None

    @property
    def x(self) -> gs.Tensor:
        return self.matmul.inputs[0]

    @property
    def k(self) -> int:
        return int(self.weight.values.shape[0])

    @property
    def n(self) -> int:
        return int(self.weight.values.shape[1])


def uid(prefix: str) -> str:
    return f"{prefix}__qc{next(_counter)}"


def reset_uids() -> None:
    """Restart the name counter, so the same passes on the same graph give byte-identical files (names only need to
    be unique within one graph)."""
    global _counter
    _counter = itertools.count()


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    return graph.tensors()


def find_linear(graph: gs.Graph, name: str) -> Linear:
    tensors = graph.tensors()
    w = tensors.get(f"{name}.weight")
    if not isinstance(w, gs.Constant):
        raise PassError(f"graph {graph.name!r} has no constant '{name}.weight'; it was not exported by qc-compile "
                        f"or does not contain linear {name}.")
    mms = [n for n in w.outputs if n.op == "MatMul" and n.inputs[1] is w]
    if len(mms) != 1:
        raise PassError(f"linear {name}: expected one MatMul consuming {name}.weight, found {len(mms)}.")
    mm = mms[0]
    bias_add = bias = None
    b = tensors.get(f"{name}.bias")
    if isinstance(b, gs.Constant):
        adds = [n for n in b.outputs if n.op == "Add"]
        if len(adds) != 1:
            raise PassError(f"linear {name}: expected one Add consuming {name}.bias, found {len(adds)}.")
        bias_add, bias = adds[0], b
    return Linear(name, mm, w, bias_add, bias)


def linear_names(graph: gs.Graph) -> list[str]:
    """Names of all canonical linears in the graph (weights named ``<linear>.weight`` feeding a MatMul)."""
    out = []
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Constant) and name.endswith(".weight") and any(
                n.op == "MatMul" and n.inputs[1] is t for n in t.outputs):
            out.append(name[: -len(".weight")])
    return sorted(out)


def const_values(c: gs.Constant) -> np.ndarray:
    """A constant's values in their true dtype (fp8 / int4 / fp4 come back as ml_dtypes arrays).

    graphsurgeon's ``Constant.values`` would cast low-bit lazily-loaded tensors to a supported type (and then
    re-export them with the wrong size), so those are read from the TensorProto directly.
    """
    v = c._values
    if isinstance(v, LazyValues):
        return numpy_helper.to_array(v.tensor)
    return np.asarray(v)


def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """Values of a constant tensor or of a ``Constant`` node's output (the exporter emits both), else None."""
    if isinstance(t, gs.Constant):
        return const_values(t)
    p = t.inputs[0] if t.inputs else None
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return const_values(p.attrs["value"])
    return None


def const_dtype(c: gs.Constant):
    """The numpy/ml_dtypes dtype of a constant without loading it."""
    v = c._values
    if isinstance(v, LazyValues):
        return helper.tensor_dtype_to_np_dtype(v.tensor.data_type)
    return np.asarray(v).dtype


def set_values(c: gs.Constant, values: np.ndarray) -> None:
    c.values = np.ascontiguousarray(values)


def own_constant(graph: gs.Graph, node: gs.Node, index: int) -> gs.Constant:
    """Make ``node.inputs[index]`` a constant used by ``node`` alone (copying a shared/deduplicated one)."""
    c = node.inputs[index]
    if not isinstance(c, gs.Constant):
        raise PassError(f"node {node.name}: input {index} is not a constant")
    if len(c.outputs) > 1:
        c2 = gs.Constant(uid(c.name), np.array(const_values(c), copy=True))
        node.inputs[index] = c2
        return c2
    return c


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def insert_before(graph: gs.Graph, consumer: gs.Node, index: int, op: str, extra_inputs: list, *,
                  name: str, attrs: dict | None = None, domain: str | None = None,
                  dtype="same") -> gs.Node:
    """Insert ``op(consumer.inputs[index], *extra_inputs)`` on that one edge only (other consumers untouched)."""
    src = consumer.inputs[index]
    out = gs.Variable(uid(f"{name}_out"), dtype=src.dtype if isinstance(dtype, str) else dtype)
    node = gs.Node(op, name=uid(name), inputs=[src, *extra_inputs], outputs=[out], attrs=attrs or {})
    if domain:
        node.domain = domain
    graph.nodes.append(node)
    consumer.inputs[index] = out
    return node


def mul_on_edge(graph: gs.Graph, consumer: gs.Node, index: int, vec: np.ndarray, name: str) -> gs.Node:
    return insert_before(graph, consumer, index, "Mul", [gs.Constant(uid(f"{name}_c"), vec.astype(np.float32))],
                         name=name)


def set_opset(graph: gs.Graph, opset: int) -> None:
    """Set the default-domain opset (graphsurgeon exports ``import_domains`` when present, not ``graph.opset``)."""
    graph.opset = opset
    if graph.import_domains is not None:
        graph.import_domains = [d for d in graph.import_domains if d.domain not in ("", "ai.onnx")]
        graph.import_domains.insert(0, helper.make_opsetid("", opset))


def sync_domains(graph: gs.Graph) -> None:
    """Declare every custom node domain (``trt``, ``qc``) in the model's opset imports (version 1)."""
    if graph.import_domains is None:
        graph.import_domains = [helper.make_opsetid("", graph.opset)]
    have = {d.domain for d in graph.import_domains}
    for dom in sorted({n.domain for n in graph.nodes if n.domain not in (None, "", "ai.onnx")} - have):
        graph.import_domains.append(helper.make_opsetid(dom, 1))


def cleanup(graph: gs.Graph) -> gs.Graph:
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    sync_domains(graph)
    return graph


def snapshot(graph: gs.Graph) -> dict[str, tuple]:
    """A structural fingerprint (op, input names, output names, constant bytes) per node, for tests."""
    out = {}
    for n in graph.nodes:
        ins = tuple(i.name for i in n.inputs)
        consts = tuple(const_values(i).tobytes() for i in n.inputs if isinstance(i, gs.Constant))
        out[n.name] = (n.op, ins, tuple(o.name for o in n.outputs), consts, tuple(sorted(n.attrs.items(), key=str)))
    return out
