"""Thin TensorRT IPluginV3 wrappers for the ``qc::`` ops (namespace ``qc``, version ``"1"``).

The compile path emits ONNX nodes with ``domain="qc"`` and one of the op types below; TensorRT's ONNX parser maps
such a node to the registered plugin of the same name and passes the node's attributes as plugin fields.

``RotateQuantFP8`` (optional prologue + blocked Hadamard + per-token FP8):
    attributes: ``block`` INT (0 = no rotation, else a power of two dividing K; default 0);
    ``prologue`` INT (0 none, 1 GELU-tanh, 2 LayerNorm(eps 1e-6, no affine) + ``x*(1+scale)+shift``; default 0).
    inputs: ``x[..., K]`` (float32 | float16 | bfloat16), and for prologue 2 ``shift``, ``scale`` ``[B, 1|T, K]``
    (``x`` is then ``[B, T, K]``). outputs: ``xq`` FP8 E4M3 ``[..., K]``, ``x_scale`` float32 ``[..., 1]``.
``FP8Linear`` (FP8 GEMM, per-token x per-channel dequantization + bias epilogue):
    attributes: ``has_bias`` INT (0|1; default 1); ``out_dtype`` INT (0 float32, 1 float16, 2 bfloat16; default 2).
    inputs: ``xq`` FP8 ``[..., K]``, ``x_scale`` float32 ``[..., 1]``, ``wq`` FP8 ``[N, K]``, ``w_scale`` float32
    ``[N]``, and ``bias`` ``[N]`` (float32 | float16 | bfloat16) when ``has_bias``. output: ``y[..., N]``.
``CacheStatsApply`` (cache statistics + residual, :mod:`cache_stats`):
    attributes: ``mode`` INT (0 apply: inputs ``x_in, cached_residual``, ``y = x_in + cached``; 1 compute:
    inputs ``x_in, cached_residual, out_new``, ``y = out_new - x_in``; 2 compute without cache: inputs
    ``x_in, out_new``; default 1). outputs: ``y`` (``x_in``'s shape and dtype), ``stats`` float32 ``[B, 10]``.

All attributes are serialized as INT32 plugin fields of length 1 with the attribute's name.

Where this runs: the Python-level logic (attribute validation, field (de)serialization, output shapes and dtypes,
format support) is plain functions, unit-tested without TensorRT. The IPluginV3 classes are built only when
``tensorrt`` (or else ``tensorrt_rtx``) imports, and their ``enqueue`` runs the same torch custom ops on
TensorRT's stream, copying the results into TensorRT's output buffers. **The enqueue path was never executed
under TensorRT**: full TensorRT cannot be installed on any machine here, and TensorRT-RTX 1.7 has no plugin layers
in its Python network API and aborts the process when parsing an ONNX node that resolves to a Python IPluginV3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

PLUGIN_NAMESPACE = "qc"
PLUGIN_VERSION = "1"
ONNX_DOMAIN = "qc"
NUM_CACHE_STATS = 10  # == cache_stats.NUM_STATS (kept literal: this module must import without torch)

FLOATS = ("float32", "float16", "bfloat16")
OUT_DTYPE_CODES = {0: "float32", 1: "float16", 2: "bfloat16"}
PROLOGUE_NONE, PROLOGUE_GELU, PROLOGUE_LN_MODULATE = 0, 1, 2
CACHE_APPLY, CACHE_COMPUTE, CACHE_COMPUTE_NOCACHE = 0, 1, 2


def _block_ok(v: int) -> bool:
    return v == 0 or (v > 0 and v & (v - 1) == 0)


@dataclass(frozen=True)
class Attr:
    """One INT32 attribute: name, default and a predicate with its message."""

    name: str
    default: int
    check: Callable[[int], bool]
    expects: str


SPECS: dict[str, tuple[Attr, ...]] = {
    "RotateQuantFP8": (
        Attr("block", 0, _block_ok, "0 or a power of two"),
        Attr("prologue", PROLOGUE_NONE, lambda v: v in (0, 1, 2), "0 (none), 1 (gelu) or 2 (layernorm+modulate)"),
    ),
    "FP8Linear": (
        Attr("has_bias", 1, lambda v: v in (0, 1), "0 or 1"),
        Attr("out_dtype", 2, lambda v: v in OUT_DTYPE_CODES, "0 (float32), 1 (float16) or 2 (bfloat16)"),
    ),
    "CacheStatsApply": (
        Attr("mode", CACHE_COMPUTE, lambda v: v in (0, 1, 2), "0 (apply), 1 (compute) or 2 (compute, no cache)"),
    ),
}
PLUGIN_NAMES = tuple(SPECS)


def _spec(plugin: str) -> tuple[Attr, ...]:
    if plugin not in SPECS:
        raise ValueError(f"unknown qc plugin {plugin!r}; known: {', '.join(PLUGIN_NAMES)}")
    return SPECS[plugin]


def validate_attrs(plugin: str, attrs: Mapping[str, Any]) -> dict[str, int]:
    """Fill defaults, reject unknown names and bad values; returns plain ints."""
    spec = _spec(plugin)
    names = {a.name for a in spec}
    unknown = set(attrs) - names
    if unknown:
        raise ValueError(f"{plugin}: unknown attribute(s) {sorted(unknown)}; expected {sorted(names)}")
    out = {}
    for a in spec:
        v = attrs.get(a.name, a.default)
        if isinstance(v, np.ndarray):
            if v.size != 1:
                raise ValueError(f"{plugin}.{a.name} must be a single integer, got an array of {v.size}")
            v = v.reshape(-1)[0]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{plugin}.{a.name} must be an integer, got {v!r}")
        v = int(v)
        if not a.check(v):
            raise ValueError(f"{plugin}.{a.name} must be {a.expects}, got {v}")
        out[a.name] = v
    return out


def serialize_fields(plugin: str, attrs: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """``[(name, int32 array of length 1)]`` in declaration order (TensorRT INT32 plugin fields)."""
    attrs = validate_attrs(plugin, attrs)
    return [(a.name, np.array([attrs[a.name]], dtype=np.int32)) for a in _spec(plugin)]


def deserialize_fields(plugin: str, fields: Mapping[str, Any]) -> dict[str, int]:
    """Inverse of :func:`serialize_fields`; accepts arrays, raw little-endian int32 bytes, or ints."""
    vals = {}
    for name, data in fields.items():
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = np.frombuffer(bytes(data), dtype=np.int32)
        vals[name] = np.asarray(data).astype(np.int64) if not isinstance(data, (int, np.integer)) else data
    return validate_attrs(plugin, vals)


def input_names(plugin: str, attrs: Mapping[str, Any]) -> list[str]:
    """The plugin's inputs, in order, for these attributes."""
    attrs = validate_attrs(plugin, attrs)
    if plugin == "RotateQuantFP8":
        return ["x", "shift", "scale"] if attrs["prologue"] == PROLOGUE_LN_MODULATE else ["x"]
    if plugin == "FP8Linear":
        return ["xq", "x_scale", "wq", "w_scale"] + (["bias"] if attrs["has_bias"] else [])
    return {CACHE_APPLY: ["x_in", "cached_residual"], CACHE_COMPUTE: ["x_in", "cached_residual", "out_new"],
            CACHE_COMPUTE_NOCACHE: ["x_in", "out_new"]}[attrs["mode"]]


def num_outputs(plugin: str) -> int:
    """RotateQuantFP8 and CacheStatsApply have two outputs, FP8Linear one."""
    _spec(plugin)
    return 1 if plugin == "FP8Linear" else 2


def output_dtypes(plugin: str, attrs: Mapping[str, Any], in_dtypes: Sequence[str]) -> list[str]:
    """Output dtype names (``float32 float16 bfloat16 fp8 int8``) given the input dtype names."""
    attrs = validate_attrs(plugin, attrs)
    _check_count(plugin, attrs, in_dtypes)
    if plugin == "RotateQuantFP8":
        return ["fp8", "float32"]
    if plugin == "FP8Linear":
        return [OUT_DTYPE_CODES[attrs["out_dtype"]]]
    return [in_dtypes[0], "float32"]


def _check_count(plugin: str, attrs: dict[str, int], inputs: Sequence[Any]) -> None:
    want = len(input_names(plugin, attrs))
    if len(inputs) != want:
        raise ValueError(f"{plugin} with {attrs} takes {want} inputs {input_names(plugin, attrs)}, got {len(inputs)}")


def output_shapes(
    plugin: str, attrs: Mapping[str, Any], in_shapes: Sequence[Sequence[Any]], const: Callable[[int], Any] = int
) -> list[list[Any]]:
    """Output shapes from input shapes. Dimensions are opaque (ints, or TensorRT IDimensionExpr); only ``const``
    makes new ones, so the same code serves unit tests and ``get_output_shapes``."""
    attrs = validate_attrs(plugin, attrs)
    _check_count(plugin, attrs, in_shapes)
    x = list(in_shapes[0])
    if not x:
        raise ValueError(f"{plugin}: the first input must have at least one dimension")
    if plugin == "RotateQuantFP8":
        if attrs["prologue"] == PROLOGUE_LN_MODULATE and len(x) != 3:
            raise ValueError(f"RotateQuantFP8 with prologue 2 needs x of rank 3 [B, T, K], got rank {len(x)}")
        return [x, x[:-1] + [const(1)]]
    if plugin == "FP8Linear":
        if len(in_shapes[2]) != 2:
            raise ValueError(f"FP8Linear weight must be 2-D [N, K], got rank {len(in_shapes[2])}")
        return [x[:-1] + [in_shapes[2][0]]]
    return [x, [x[0], const(NUM_CACHE_STATS)]]


def supported_dtypes(plugin: str, attrs: Mapping[str, Any], pos: int, in_dtypes: Sequence[str]) -> tuple[str, ...]:
    """Dtype names accepted at input/output position ``pos`` given the (earlier) input dtypes already chosen."""
    attrs = validate_attrs(plugin, attrs)
    names = input_names(plugin, attrs)
    n_in = len(names)
    if pos < n_in:
        if plugin == "RotateQuantFP8":
            return FLOATS
        if plugin == "FP8Linear":
            return {"xq": ("fp8",), "wq": ("fp8",), "x_scale": ("float32",), "w_scale": ("float32",),
                    "bias": FLOATS}[names[pos]]
        # CacheStatsApply: every tensor input shares x_in's dtype
        return FLOATS if pos == 0 else (in_dtypes[0],)
    return tuple(output_dtypes(plugin, attrs, list(in_dtypes[:n_in]))[pos - n_in:pos - n_in + 1])


def run_torch(plugin: str, attrs: Mapping[str, Any], inputs: Sequence[Any]) -> list[Any]:
    """The plugin's computation through ``torch.ops.qc`` (what ``enqueue`` runs; usable on CPU in tests)."""
    import torch

    from . import ops  # noqa: F401  (registers torch.ops.qc)

    attrs = validate_attrs(plugin, attrs)
    _check_count(plugin, attrs, inputs)
    qc = torch.ops.qc
    if plugin == "RotateQuantFP8":
        p, block = attrs["prologue"], attrs["block"]
        if p == PROLOGUE_LN_MODULATE:
            return list(qc.modulate_quant_fp8(inputs[0], inputs[1], inputs[2], block))
        if p == PROLOGUE_GELU:
            return list(qc.gelu_rotate_quant_fp8(inputs[0], block))
        return list(qc.rotate_quant_fp8(inputs[0], block))
    if plugin == "FP8Linear":
        bias = inputs[4] if attrs["has_bias"] else None
        out = getattr(torch, OUT_DTYPE_CODES[attrs["out_dtype"]])
        return [qc.fp8_linear(inputs[0], inputs[1], inputs[2], inputs[3], bias, out)]
    mode = attrs["mode"]
    if mode == CACHE_APPLY:
        return list(qc.cache_stats_apply(inputs[0], inputs[1], None))
    if mode == CACHE_COMPUTE:
        return list(qc.cache_stats_apply(inputs[0], inputs[1], inputs[2]))
    return list(qc.cache_stats_apply(inputs[0], None, inputs[1]))


# CUDA array interface typestr per dtype name; bf16/fp8 travel as raw ints of their width (int16: a type every torch
# release reads from the interface) and are re-viewed by torch.
_CAI = {"float32": ("<f4", None), "float16": ("<f2", None), "bfloat16": ("<i2", "bfloat16"),
        "fp8": ("|u1", "float8_e4m3fn"), "int8": ("|i1", None), "int32": ("<i4", None)}


def cuda_array_interface(ptr: int, shape: Sequence[int], dtype: str) -> tuple[dict, str | None]:
    """``(__cuda_array_interface__ dict, torch dtype name to view as or None)`` for a device pointer."""
    if dtype not in _CAI:
        raise ValueError(f"no CUDA array interface for dtype {dtype!r}")
    typestr, view = _CAI[dtype]
    return {"shape": tuple(int(d) for d in shape), "typestr": typestr, "data": (int(ptr), False), "version": 3,
            "strides": None}, view


def load_tensorrt():
    """``tensorrt`` if installed, else ``tensorrt_rtx``, else None (the one place that picks between them)."""
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return __import__(name)
        except ImportError:
            continue
    return None


def build_trt_classes(trt):
    """Define the IPluginV3 plugin and creator classes against the given TensorRT module."""
    dt_to_name = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.fp8: "fp8",
                  trt.int8: "int8", trt.int32: "int32"}
    name_to_dt = {v: k for k, v in dt_to_name.items()}

    class QcPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """One class for the three plugins; behaviour comes from the pure functions above."""

        def __init__(self, plugin_name: str, attrs: Mapping[str, Any]):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = plugin_name
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.attrs = validate_attrs(plugin_name, attrs)
            self.num_outputs = num_outputs(plugin_name)

        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            return QcPlugin(self.plugin_name, dict(self.attrs))

        def get_fields_to_serialize(self):
            # PluginField keeps a raw pointer into the array: the arrays must outlive the collection
            self._field_arrays = serialize_fields(self.plugin_name, self.attrs)
            return trt.PluginFieldCollection([trt.PluginField(n, a, trt.PluginFieldType.INT32)
                                              for n, a in self._field_arrays])

        def get_output_data_types(self, input_types):
            names = output_dtypes(self.plugin_name, self.attrs, [dt_to_name[t] for t in input_types])
            return [name_to_dt[n] for n in names]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            shapes = output_shapes(self.plugin_name, self.attrs, [[d[i] for i in range(len(d))] for d in inputs],
                                   const=expr_builder.constant)
            outs = []
            for s in shapes:
                dims = trt.DimsExprs(len(s))
                for i, d in enumerate(s):
                    dims[i] = d
                outs.append(dims)
            return outs

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR or desc.type not in dt_to_name:
                return False
            chosen = [dt_to_name.get(in_out[i].desc.type, "?") for i in range(min(pos, num_inputs))]
            return dt_to_name[desc.type] in supported_dtypes(self.plugin_name, self.attrs, pos, chosen)

        def configure_plugin(self, inp, out):
            pass

        def on_shape_change(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            def wrap(ptr, desc):
                cai, view = cuda_array_interface(ptr, tuple(desc.dims), dt_to_name[desc.type])
                holder = type("CudaBuf", (), {"__cuda_array_interface__": cai})()
                t = torch.as_tensor(holder, device="cuda")
                return t.view(getattr(torch, view)) if view else t

            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                ins = [wrap(p, d) for p, d in zip(inputs, input_desc)]
                results = run_torch(self.plugin_name, self.attrs, ins)
                for p, d, r in zip(outputs, output_desc, results):
                    wrap(p, d).copy_(r)

    class QcPluginCreator(trt.IPluginCreatorV3One):
        """Creator registered once per plugin name under namespace ``qc``."""

        def __init__(self, plugin_name: str):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = plugin_name
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self._field_arrays = [(a.name, np.array([a.default], dtype=np.int32)) for a in _spec(plugin_name)]
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(n, arr, trt.PluginFieldType.INT32) for n, arr in self._field_arrays])

        def create_plugin(self, name, fc, phase):
            return QcPlugin(self.name, deserialize_fields(self.name, {f.name: f.data for f in fc}))

    return QcPlugin, QcPluginCreator


# id(TensorRT module) -> (the module, our creators in its registry): kept alive, TensorRT holds raw pointers to them
_REGISTERED: dict[int, tuple[Any, list[Any]]] = {}


def register_plugins(trt=None) -> list[Any]:
    """Register one creator per plugin with TensorRT's plugin registry; returns the creators (keep them alive).

    Must run before an engine holding ``qc::`` layers is deserialized: Python plugins are not serialized into the
    engine, TensorRT recreates them through the registry. Idempotent per registry (a second TrtRunner in the same
    process reuses the creators; registering a name twice is an error in TensorRT)."""
    trt = trt or load_tensorrt()
    if trt is None:
        raise RuntimeError("neither tensorrt nor tensorrt_rtx is installed")
    if id(trt) in _REGISTERED:
        return _REGISTERED[id(trt)][1]
    registry = trt.get_plugin_registry()
    _, creator_cls = build_trt_classes(trt)
    creators = [creator_cls(name) for name in PLUGIN_NAMES]
    for c in creators:
        if registry.get_creator(c.name, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            registry.register_creator(c, PLUGIN_NAMESPACE)
        if registry.get_creator(c.name, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise RuntimeError(f"TensorRT did not register the plugin creator qc::{c.name} (version {PLUGIN_VERSION})")
    _REGISTERED[id(trt)] = (trt, creators)
    return creators
