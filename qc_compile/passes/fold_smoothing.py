"""Fold per-input-channel smoothing into the graph, exactly (up to fp32 rounding).

Smoothing a linear ``y = x W + b`` (ONNX layout ``W [K, N]``) by ``s`` (K,) means the GEMM sees ``x / s`` and
``W' = diag(s) W``, so ``(x / s) W' = x W``: only the *quantization* changes. The division must land on an op that
already exists (DESIGN.md §4). Where, for STDiT3 (see :data:`qc_compile.linears.FOLD_BY_ROLE`):

``modulation`` (``attn.qkv``, ``mlp.fc1``, ``final_layer.linear``)
    The input is ``h = LN(x) * (1 + scale) + shift`` with ``scale = table_row + t_mlp_row`` and
    ``shift`` likewise, both ``(B, 1, C)`` vectors. ``t_mlp`` comes from the ``embed`` unit and is shared by every
    block, so the division cannot go into ``t_block``'s rows (that would smooth all blocks by the same ``s``), and
    it cannot go into the block's ``scale_shift_table`` alone either (``(1 + table + t) / s`` is not
    ``1 + table' + t`` for any table'). What *is* exact: ``h / s = LN(x) * ((1 + scale) / s) + shift / s`` — one
    ``Mul`` by ``1/s`` on each of the two ``(B, 1, C)`` modulation vectors inside the block graph. Cost: 2·B·C
    multiplies per linear, nothing per token; the per-token chain (LayerNorm, Mul, Add) is unchanged.
``v_rows`` (``attn.proj``, ``cross_attn.proj``)
    Attention is linear in V and each output channel of the attention is the same channel of V, so ``/ s`` goes into
    the V output columns (and bias) of the producing ``attn.qkv`` (columns 2C..3C) / ``cross_attn.kv_linear``
    (columns C..2C). Offline, free.
``caption`` (``cross_attn.kv_linear``)
    Its input ``y`` is the ``embed`` unit's output (``y_embedder.y_proj.fc2``), read by every block. The block graph
    only gets ``W' = diag(s) W``; the division is folded once into ``fc2``'s output columns and bias in the embed
    graph (``caption_fold=s``). The plan guarantees every kv_linear uses the same ``s`` (``plan.validate``), and the
    build applies the embed fold whenever a kv_linear smooths. Cross-unit, offline, free.
``online`` (anything else, e.g. ``cross_attn.q_linear`` whose input is the residual stream)
    No exact fold exists: an explicit ``Mul(x, 1/s)`` is inserted before the MatMul and reported as ``online``.

The weight rows are scaled in every case. A modulation pattern that is not found (a foreign graph) falls back to
``online`` and is reported.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qc_compile.linears import (CAPTION_FOLD_LINEAR, FOLD_BY_ROLE, FOLD_CAPTION, FOLD_MODULATION, FOLD_V_ROWS,
                                 unit_of)
from qc_compile.passes.common import (SHAPE_OPS, PassError, cleanup, const_values, find_linear, mul_on_edge,
                                      own_constant, producer, set_values)

V_SOURCE = {"attn.proj": ("attn.qkv", 2, 3), "cross_attn.proj": ("cross_attn.kv_linear", 1, 2)}


def _value_consumers(t: gs.Tensor) -> int:
    """Consumers that read the tensor's values (Shape only reads its shape, which the fold does not change)."""
    return sum(1 for n in t.outputs if n.op != "Shape")


def _modulation_site(mm: gs.Node) -> tuple[gs.Node, int, gs.Node, int] | None:
    """Find ``Add(Mul(LN, one_plus_scale), shift)`` feeding the MatMul through shape-only single-consumer ops.

    Returns (add, shift_index, mul, scale_index) or None.
    """
    t = mm.inputs[0]
    while True:
        p = producer(t)
        if p is None or _value_consumers(t) != 1:
            return None
        if p.op in SHAPE_OPS:
            if p.op == "Transpose" and list(p.attrs.get("perm", []))[-1:] != [len(p.attrs.get("perm", [])) - 1]:
                return None  # the channel axis must stay last
            t = p.inputs[0]
            continue
        break
    if p.op != "Add":
        return None
    add = p
    for mi in (0, 1):
        m = producer(add.inputs[mi])
        if m is None or m.op != "Mul" or _value_consumers(add.inputs[mi]) != 1:
            continue
        for li in (0, 1):
            ln = producer(m.inputs[li])
            if ln is not None and ln.op == "LayerNormalization":
                return add, 1 - mi, m, 1 - li
    return None


def pass_fold_smoothing(graph: gs.Graph, smoothing: dict[str, np.ndarray], *,
                        caption_fold: np.ndarray | None = None, report: dict | None = None) -> gs.Graph:
    """Fold ``smoothing[linear] = s`` for the linears of this graph; ``caption_fold`` (embed graph): divide
    ``y_embedder.y_proj.fc2``'s outputs by the kv_linear smoothing vector. Linears not in the graph are ignored."""
    report = report if report is not None else {}
    present = {t.name[:-len(".weight")] for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and t.name.endswith(".weight")}
    for name, s in smoothing.items():
        if name not in present:
            continue
        s = np.asarray(s, dtype=np.float32)
        lin = find_linear(graph, name)
        if s.shape != (lin.k,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise PassError(f"smoothing for {name}: need {lin.k} finite positive values, got shape {s.shape}")
        inv = (1.0 / s.astype(np.float64)).astype(np.float32)
        w = own_constant(graph, lin.matmul, 1)
        set_values(w, const_values(w) * s[:, None])
        _, role = unit_of(name)
        how = FOLD_BY_ROLE.get(role, "online")
        if how == FOLD_MODULATION:
            site = _modulation_site(lin.matmul)
            if site is None:
                how = "online"
            else:
                add, shift_i, mul, scale_i = site
                mul_on_edge(graph, add, shift_i, inv, f"{name}.smooth_shift")
                mul_on_edge(graph, mul, scale_i, inv, f"{name}.smooth_scale")
        elif how == FOLD_V_ROWS:
            src_role, lo, hi = V_SOURCE[role]
            src = find_linear(graph, name[: -len(role)] + src_role)
            c = lin.k
            if src.n != hi * c:  # qkv: 3C (V last), kv: 2C (V last)
                raise PassError(f"{src.name}: expected {hi}*{c} outputs for the V fold, got {src.n}")
            sw = own_constant(graph, src.matmul, 1)
            v = const_values(sw).copy()
            v[:, lo * c:hi * c] *= inv[None, :]
            set_values(sw, v)
            if src.bias is not None:
                j = src.bias_add.inputs.index(src.bias)
                sb = own_constant(graph, src.bias_add, j)
                b = const_values(sb).copy()
                b[lo * c:hi * c] *= inv
                set_values(sb, b)
        elif how == FOLD_CAPTION:
            pass  # the division lives in the embed graph (caption_fold)
        if how == "online":
            mul_on_edge(graph, lin.matmul, 0, inv, f"{name}.smooth")
        report[name] = how
    if caption_fold is not None:
        s = np.asarray(caption_fold, dtype=np.float32)
        fc2 = find_linear(graph, CAPTION_FOLD_LINEAR)
        if s.shape != (fc2.n,):
            raise PassError(f"caption fold: need {fc2.n} values, got shape {s.shape}")
        inv = (1.0 / s.astype(np.float64)).astype(np.float32)
        w = own_constant(graph, fc2.matmul, 1)
        set_values(w, const_values(w) * inv[None, :])
        if fc2.bias is not None:
            b = own_constant(graph, fc2.bias_add, fc2.bias_add.inputs.index(fc2.bias))
            set_values(b, const_values(b) * inv)
        report[CAPTION_FOLD_LINEAR] = "caption_fold"
    return cleanup(graph)
