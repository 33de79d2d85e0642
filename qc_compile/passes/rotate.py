"""Blocked Hadamard rotation of a linear's input, exact without quantization.

With ``R = blockdiag(H_b, ..., H_b)`` (normalised Sylvester Hadamard, symmetric and orthogonal: ``R R = I``),
``x W = (x R)(R W)``. The weight side ``W' = R W`` is applied offline to the ``[K, N]`` constant; the activation side
``x R`` is one of:

``online`` (default; ``mlp.fc2``, whose input follows a GELU and has nothing to fold into)
    ``Reshape(x, [-1, b]) -> MatMul(H_b) -> Reshape(., Shape(x))`` inserted on the MatMul's input edge. A fused
    kernel (``qc::RotateQuantFP8``, see passes/plugin_nodes.py) does this in the quantization prologue.
``v_fold`` (``attn.proj`` / ``cross_attn.proj`` when ``b`` divides the head size)
    The attention output is ``softmax(.) V`` per head; rotating V's channels within a head gives ``O R``. So the V
    columns of the producing ``qkv`` / ``kv_linear`` weight and bias are multiplied by ``R`` offline (free).

The Hadamard matrix comes from :func:`qc_compile.plugins.formats.hadamard_matrix` (the kernels' definition).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qc_compile.linears import unit_of
from qc_compile.passes.common import PassError, cleanup, const_values, find_linear, own_constant, set_values, uid
from qc_compile.passes.fold_smoothing import V_SOURCE


def hadamard(b: int) -> np.ndarray:
    from qc_compile.plugins.formats import hadamard_matrix

    return hadamard_matrix(b).double().numpy()


def rotate_rows(w: np.ndarray, b: int) -> np.ndarray:
    """``R @ w`` for ``w [K, N]`` (blocks of b rows)."""
    k, n = w.shape
    h = hadamard(b)
    return np.einsum("ij,gjn->gin", h, w.astype(np.float64).reshape(k // b, b, n)).reshape(k, n).astype(np.float32)


def rotate_cols(w: np.ndarray, b: int) -> np.ndarray:
    """``w @ R`` along the last axis (blocks of b columns)."""
    shape = w.shape
    h = hadamard(b)
    return (w.astype(np.float64).reshape(*shape[:-1], shape[-1] // b, b) @ h).reshape(shape).astype(np.float32)


def insert_online_rotation(graph: gs.Graph, mm: gs.Node, b: int, name: str) -> None:
    x = mm.inputs[0]
    shape = gs.Variable(uid(f"{name}_shape"), dtype=np.int64)
    flat = gs.Variable(uid(f"{name}_flat"), dtype=np.float32)
    rot = gs.Variable(uid(f"{name}_rot"), dtype=np.float32)
    out = gs.Variable(uid(f"{name}_x"), dtype=np.float32)
    graph.nodes += [
        gs.Node("Shape", name=uid(f"{name}.rotate_shape"), inputs=[x], outputs=[shape]),
        gs.Node("Reshape", name=uid(f"{name}.rotate_in"),
                inputs=[x, gs.Constant(uid(f"{name}_blk"), np.array([-1, b], dtype=np.int64))], outputs=[flat]),
        gs.Node("MatMul", name=uid(f"{name}.rotate"),
                inputs=[flat, gs.Constant(uid(f"{name}_hadamard{b}"), hadamard(b).astype(np.float32))],
                outputs=[rot]),
        gs.Node("Reshape", name=uid(f"{name}.rotate_out"), inputs=[rot, shape], outputs=[out]),
    ]
    mm.inputs[0] = out


def pass_rotate(graph: gs.Graph, rotations: dict[str, int], *, head_dim: int | None = None,
                report: dict | None = None) -> gs.Graph:
    """Rotate the linears in ``rotations`` (name -> block size) that are in this graph."""
    report = report if report is not None else {}
    present = {t.name[:-len(".weight")] for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and t.name.endswith(".weight")}
    for name, b in rotations.items():
        if not b or name not in present:
            continue
        lin = find_linear(graph, name)
        if b < 2 or b & (b - 1) or lin.k % b:
            raise PassError(f"rotation of {name}: block {b} must be a power of two dividing K={lin.k}")
        w = own_constant(graph, lin.matmul, 1)
        set_values(w, rotate_rows(const_values(w), b))
        _, role = unit_of(name)
        if role in V_SOURCE and head_dim and head_dim % b == 0:
            src_role, lo, hi = V_SOURCE[role]
            src = find_linear(graph, name[: -len(role)] + src_role)
            c = lin.k
            sw = own_constant(graph, src.matmul, 1)
            v = const_values(sw).copy()
            v[:, lo * c:hi * c] = rotate_cols(v[:, lo * c:hi * c], b)
            set_values(sw, v)
            if src.bias is not None:
                sb = own_constant(graph, src.bias_add, src.bias_add.inputs.index(src.bias))
                bv = const_values(sb).copy()
                bv[lo * c:hi * c] = rotate_cols(bv[lo * c:hi * c], b)
                set_values(sb, bv)
            report[name] = "v_fold"
        else:
            insert_online_rotation(graph, lin.matmul, b, name)
            report[name] = "online"
    return cleanup(graph)
