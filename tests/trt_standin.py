"""A stand-in for the slice of TensorRT's Python plugin API that our ``qc::`` plugins use, and a driver that calls the
plugin objects in the order and with the arguments TensorRT's builder and runtime use for an IPluginV3 layer.

Why: no machine here can run a TensorRT plugin layer (full TensorRT cannot be installed; TensorRT-RTX has no plugin
layers). The plugin classes are defined against a TensorRT module (``trt_plugins.build_trt_classes(trt)``), so the same
code is built here against this module and driven like TensorRT drives it:

1. the parser: the creator's ``create_plugin(node_name, fields from the node's attributes, BUILD)``;
2. the builder: ``get_capability_interface``, ``get_output_data_types(input types)``, ``get_output_shapes(input
   DimsExprs, shape inputs, expr builder)``, ``supports_format_combination(pos, in_out, num_inputs)`` for every
   position and candidate type (the first accepted type is taken, as TensorRT's format negotiation does),
   ``configure_plugin``, ``get_workspace_size``, then ``get_fields_to_serialize`` into the engine;
3. the runtime: the creator's ``create_plugin(name, serialized fields, RUNTIME)``, ``attach_to_context``,
   ``on_shape_change`` and ``enqueue(input descs, output descs, input pointers, output pointers, workspace,
   stream)`` with integer device addresses and the integer CUDA stream handle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    FP8 = 9


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW32 = 3


class TensorRTPhase(enum.Enum):
    BUILD = 0
    RUNTIME = 1


class PluginFieldType(enum.Enum):
    INT32 = 2


class _Base:
    def __init__(self) -> None:
        pass


class PluginField:
    def __init__(self, name: str, data: np.ndarray, type: PluginFieldType) -> None:  # noqa: A002 (TensorRT's name)
        self.name, self.data, self.type = name, np.array(data, copy=True), type


class PluginFieldCollection(list):
    pass


class DimsExprs(list):
    def __init__(self, n: int) -> None:
        super().__init__([None] * n)


class ExprBuilder:
    def constant(self, v: int) -> int:
        return int(v)


@dataclass
class PluginTensorDesc:
    dims: tuple[int, ...]
    type: DataType
    format: TensorFormat = TensorFormat.LINEAR


@dataclass
class DynamicPluginTensorDesc:
    desc: PluginTensorDesc
    min: tuple[int, ...] = ()
    opt: tuple[int, ...] = ()
    max: tuple[int, ...] = ()


class Registry:
    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = ""):
        return self.creators.get((name, version, namespace))


def plugin_api() -> SimpleNamespace:
    """A fresh stand-in module (own registry)."""
    reg = Registry()
    return SimpleNamespace(
        DataType=DataType, float32=DataType.FLOAT, float16=DataType.HALF, bfloat16=DataType.BF16, fp8=DataType.FP8,
        int8=DataType.INT8, int32=DataType.INT32, bool=DataType.BOOL, TensorFormat=TensorFormat,
        TensorRTPhase=TensorRTPhase, PluginFieldType=PluginFieldType, PluginField=PluginField,
        PluginFieldCollection=PluginFieldCollection, DimsExprs=DimsExprs,
        IPluginV3=type("IPluginV3", (_Base,), {}), IPluginV3OneCore=type("IPluginV3OneCore", (_Base,), {}),
        IPluginV3OneBuild=type("IPluginV3OneBuild", (_Base,), {}),
        IPluginV3OneRuntime=type("IPluginV3OneRuntime", (_Base,), {}),
        IPluginCreatorV3One=type("IPluginCreatorV3One", (_Base,), {}),
        get_plugin_registry=lambda: reg, registry=reg)


TORCH_TO_TRT = {"float32": DataType.FLOAT, "float16": DataType.HALF, "bfloat16": DataType.BF16,
                "float8_e4m3fn": DataType.FP8, "int8": DataType.INT8, "int32": DataType.INT32}
TRT_TO_TORCH = {v: k for k, v in TORCH_TO_TRT.items()}
CANDIDATES = (DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.FP8, DataType.INT8, DataType.INT32)


@dataclass
class BuiltLayer:
    """What the builder decided for one plugin layer, and the plugin object the runtime recreated."""

    plugin: Any
    in_types: list[DataType]
    out_types: list[DataType]
    out_shapes: list[tuple[int, ...]]
    rejected: dict[int, list[DataType]] = field(default_factory=dict)  # per position: candidates refused


def build_layer(trt: SimpleNamespace, op: str, attrs: dict, in_shapes: Sequence[tuple[int, ...]],
                in_types: Sequence[DataType], name: str = "node") -> BuiltLayer:
    """Parser + builder + engine (de)serialization for one plugin node, as TensorRT does them."""
    creator = trt.registry.get_creator(op, "1", "qc")
    assert creator is not None, f"no creator qc::{op} registered"
    from qc_compile.plugins import trt_plugins as T

    arrays = T.serialize_fields(op, attrs)  # the parser turns the node's INT attributes into INT32 fields
    fc = PluginFieldCollection([PluginField(n, a, PluginFieldType.INT32) for n, a in arrays])
    p = creator.create_plugin(name, fc, TensorRTPhase.BUILD)
    core = p.get_capability_interface("CORE")
    build = p.get_capability_interface("BUILD")
    assert core.plugin_name == op and core.plugin_namespace == "qc" and core.plugin_version == "1"
    out_types = list(build.get_output_data_types(list(in_types)))
    assert len(out_types) == build.num_outputs
    dims_in = []
    for s in in_shapes:
        d = DimsExprs(len(s))
        for i, v in enumerate(s):
            d[i] = int(v)
        dims_in.append(d)
    out_shapes = [tuple(int(v) for v in d) for d in build.get_output_shapes(dims_in, [], ExprBuilder())]
    # format negotiation: per position, candidates in order; earlier positions fixed to the chosen types
    types = list(in_types) + out_types
    shapes = [tuple(s) for s in in_shapes] + out_shapes
    n_in = len(in_types)
    rejected: dict[int, list[DataType]] = {}
    chosen: list[DataType] = []
    for pos in range(len(types)):
        ok = []
        for cand in CANDIDATES:
            io = [DynamicPluginTensorDesc(PluginTensorDesc(shapes[i], chosen[i] if i < pos else
                                                           (cand if i == pos else types[i])))
                  for i in range(len(types))]
            if build.supports_format_combination(pos, io, n_in):
                ok.append(cand)
        rejected[pos] = [c for c in CANDIDATES if c not in ok]
        bad_format = [DynamicPluginTensorDesc(PluginTensorDesc(shapes[i], types[i], TensorFormat.CHW32))
                      for i in range(len(types))]
        assert not build.supports_format_combination(pos, bad_format, n_in), "only LINEAR layouts are supported"
        assert types[pos] in ok, f"{op} position {pos}: the network's type {types[pos]} is not accepted ({ok})"
        chosen.append(types[pos])
    descs = [DynamicPluginTensorDesc(PluginTensorDesc(s, t)) for s, t in zip(shapes, chosen)]
    build.configure_plugin(descs[:n_in], descs[n_in:])
    assert build.get_workspace_size(descs[:n_in], descs[n_in:]) == 0
    serialized = core.get_fields_to_serialize()  # what the engine stores
    fc2 = PluginFieldCollection([PluginField(f.name, np.array(f.data), f.type) for f in serialized])
    runtime = creator.create_plugin(name, fc2, TensorRTPhase.RUNTIME).attach_to_context(None)
    return BuiltLayer(runtime, chosen[:n_in], chosen[n_in:], out_shapes, rejected)


def enqueue(layer: BuiltLayer, inputs: Sequence[Any]) -> list[Any]:
    """The runtime's ``enqueue`` for one layer on torch's current CUDA stream (torch tensors in, torch out)."""
    import torch

    rt = layer.plugin.get_capability_interface("RUNTIME")
    in_desc = [PluginTensorDesc(tuple(t.shape), t_) for t, t_ in zip(inputs, layer.in_types)]
    out_desc = [PluginTensorDesc(s, t) for s, t in zip(layer.out_shapes, layer.out_types)]
    rt.on_shape_change([DynamicPluginTensorDesc(d) for d in in_desc], [DynamicPluginTensorDesc(d) for d in out_desc])
    outs = [torch.full(s, float("nan"), device="cuda").to(getattr(torch, TRT_TO_TORCH[t]))
            for s, t in zip(layer.out_shapes, layer.out_types)]
    for t, want in zip(inputs, layer.in_types):
        assert TORCH_TO_TRT[str(t.dtype).replace("torch.", "")] == want and t.is_contiguous()
    stream = torch.cuda.current_stream()
    rt.enqueue(in_desc, out_desc, [t.data_ptr() for t in inputs], [o.data_ptr() for o in outs], 0,
               stream.cuda_stream)
    stream.synchronize()
    return outs
