"""The ``qc::`` plugins wired end to end, as far as this machine can take them.

- TensorRT's ONNX parser (TensorRT-RTX 1.7 here, on the CPU) resolves every ``qc::`` node of a plugin-bearing qc-ref
  unit graph to our creator (by the node's domain as plugin namespace) and hands it the node's attributes as plugin
  fields; the FP8 inputs (``xq`` from the quantize plugin, ``wq`` from the weight QuantizeLinear) arrive typed FP8.
  TensorRT-RTX has no plugin layers, so each probe creator records the call and refuses to create the plugin (the
  parser then stops cleanly instead of aborting the process); the engine build needs full TensorRT.
- The plugin objects driven exactly as TensorRT's builder drives them (:mod:`trt_standin`), CPU part.
"""

from __future__ import annotations

import ctypes
import enum
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from trt_standin import CANDIDATES, DataType, build_layer, plugin_api

from qc_compile.errors import ArtifactError
from qc_compile.passes.insert_qdq import lazy_const
from qc_compile.plugins import trt_plugins as T
from qc_compile.runtime.runners.tensorrt import EngineUnit, TrtRunner

FP8 = onnx.TensorProto.FLOAT8E4M3FN


def _plugin_graph(unit: str = "spatial_0") -> Path:
    from compile_helpers import built_plugins

    work = built_plugins()
    rec = json.loads((work / "manifest.json").read_text())["targets"]["trt"]["units"][unit]["variants"]["default"]
    return work / rec["onnx"][0]["path"]


def _dims(shape) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def node_models(path: Path) -> list[tuple[str, str, dict, onnx.ModelProto]]:
    """One small model per ``qc::`` node of the graph at ``path``: the node, its constant inputs and the weight
    QuantizeLinear feeding it; other inputs become graph inputs (an FP8 one through a QuantizeLinear of a float
    input, since TensorRT network inputs are not FP8)."""
    model = onnx.load(path)
    out = []
    for i, node in enumerate(n for n in model.graph.node if n.domain == "qc"):
        g = gs.import_onnx(model)
        n = [m for m in g.nodes if m.domain == "qc"][i]
        nodes, inputs = [n], []
        for t in n.inputs:
            if isinstance(t, gs.Constant):
                continue
            prod = t.inputs[0] if t.inputs else None
            if prod is not None and prod.op == "QuantizeLinear" and isinstance(prod.inputs[0], gs.Constant):
                nodes.append(prod)  # the weight, in the form the pass emits
            elif t.dtype == FP8:
                f = gs.Variable(t.name + ".float", dtype=np.float32, shape=_dims(t.shape))
                zp = lazy_const(t.name + ".zp", np.zeros((), ml_dtypes.float8_e4m3fn))
                nodes.append(gs.Node("QuantizeLinear", inputs=[f, gs.Constant(t.name + ".s", np.array(0.05, np.float32)), zp],
                                     outputs=[t]))
                inputs.append(f)
            else:
                t.shape = _dims(t.shape)
                inputs.append(t)
        for o in n.outputs:
            o.dtype = o.dtype if o.dtype is not None else np.float32
        sub = gs.Graph(nodes=nodes, inputs=inputs, outputs=list(n.outputs), opset=g.opset,
                       import_domains=g.import_domains)
        proto = gs.export_onnx(sub)
        out.append((n.op, n.name, T.validate_attrs(n.op, n.attrs), proto))
    return out


_PARSE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from qc_compile.plugins import trt_plugins as T

    trt = T.load_tensorrt()
    Plugin, Creator = T.build_trt_classes(trt)
    calls = []

    class Probe(Creator):
        def create_plugin(self, name, fc, phase):
            calls[-1]["created"].append({"creator": self.name, "namespace": self.plugin_namespace,
                                         "version": self.plugin_version, "node": name,
                                         "fields": {f.name: np.array(f.data).reshape(-1).tolist() for f in fc},
                                         "build_phase": phase == trt.TensorRTPhase.BUILD})
            raise RuntimeError("probe: TensorRT-RTX has no plugin layers")

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
        def log(self, severity, msg):
            if " inputs: [" in msg:
                calls[-1]["inputs"].append(msg)

    keep = [Probe(n) for n in T.PLUGIN_NAMES]
    for c in keep:
        trt.get_plugin_registry().register_creator(c, T.PLUGIN_NAMESPACE)
    log = Log()
    log.min_severity = trt.Logger.VERBOSE
    for path in sys.argv[1:]:
        calls.append({"path": path, "created": [], "inputs": []})
        net = trt.Builder(log).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(net, log)
        calls[-1]["parsed"] = bool(parser.parse_from_file(path))
        calls[-1]["errors"] = [parser.get_error(i).desc() for i in range(parser.num_errors)]
    print("RESULT" + json.dumps(calls))
""")


@pytest.mark.slow  # builds a plugin graph set (~60 s cold, export + calibrate included)
def test_onnx_parser_maps_qc_nodes_to_our_creators(tmp_path: Path) -> None:
    if T.load_tensorrt() is None:
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed")
    cases = node_models(_plugin_graph())
    ops = sorted({c[0] for c in cases})
    assert ops == ["CacheStatsApply", "FP8Linear", "RotateQuantFP8"], ops
    assert any(c[2].get("prologue") == 2 for c in cases)  # the fused LayerNorm + modulation form is in the unit
    paths = []
    for i, (_, _, _, proto) in enumerate(cases):
        paths.append(tmp_path / f"node{i}.onnx")
        onnx.save(proto, paths[-1])
    r = subprocess.run([sys.executable, "-c", _PARSE, *map(str, paths)], capture_output=True, text=True, timeout=300)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT")), None)
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(line[len("RESULT"):])
    for (op, name, attrs, _), res in zip(cases, results):
        assert len(res["created"]) == 1, (op, res)
        c = res["created"][0]
        assert (c["creator"], c["namespace"], c["version"], c["node"]) == (op, "qc", "1", name)
        assert {k: v[0] for k, v in c["fields"].items()} == attrs and all(len(v) == 1 for v in c["fields"].values())
        assert c["build_phase"]
        assert not res["parsed"] and any("Could not create the plugin" in e for e in res["errors"]), res["errors"]
        seen = next(m for m in res["inputs"] if f"[{op}]" in m)
        if op == "FP8Linear":  # both quantized operands reach the plugin as FP8 tensors, the scales as FLOAT
            xq, xs, wq, ws = seen.split("], [")[:4]
            assert xq.endswith("[FP8]") and wq.endswith("[FP8]") and "[FLOAT]" in xs and "[FLOAT]" in ws, seen
        else:
            assert "[FP8]" not in seen and "[BF16]" in seen, seen  # activations arrive in the graph's bf16


# ------------------------------------------------------------------------------------------------ the runner's binding
class _IOMode(enum.Enum):
    INPUT = 0
    OUTPUT = 1


class _BindContext:
    """Reads the bound host addresses like an engine reads device addresses (CPU stand-in)."""

    def __init__(self, engine: "_BindEngine") -> None:
        self.engine, self.shapes, self.addr, self.reads = engine, {}, {}, []

    def set_input_shape(self, name, shape) -> bool:
        assert name in self.engine.inputs, name
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> None:
        assert name in self.engine.inputs + self.engine.outputs, name
        self.addr[name] = ptr

    def _read(self, name) -> np.ndarray:
        shape = self.shapes[name]
        return np.frombuffer(ctypes.string_at(self.addr[name], 4 * int(np.prod(shape))), np.float32).reshape(shape)

    def get_tensor_shape(self, name):
        x = self.shapes["x"]
        return (x[0], 10) if name == "cache_stats_out" else x

    def execute_async_v3(self, stream: int) -> bool:
        assert stream == 0
        assert set(self.addr) == set(self.engine.inputs + self.engine.outputs), "an engine tensor was not bound"
        ins = {n: self._read(n).copy() for n in self.engine.inputs}
        self.reads.append(ins)
        x, out = ins["x"], ins["x"] * 2 + ins["t_mlp"].sum()
        res = out - x
        stats = np.stack([np.abs(res - ins["cached_residual"]).reshape(len(x), -1).sum(1)] * 10, 1)
        for name, arr in (("x_out", out), ("residual_out", res), ("cache_stats_out", stats)):
            arr = np.ascontiguousarray(arr, np.float32)
            ctypes.memmove(self.addr[name], arr.ctypes.data, arr.nbytes)
        return True


class _BindEngine:
    def __init__(self, inputs=("x", "t_mlp", "cached_residual"),
                 outputs=("x_out", "residual_out", "cache_stats_out")) -> None:
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.contexts = []

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name):
        return _IOMode.INPUT if name in self.inputs else _IOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    def create_execution_context(self):
        self.contexts.append(_BindContext(self))
        return self.contexts[-1]


_IO = {"spatial_0": {"inputs": [{"name": "x", "onnx_name": "x", "dtype": "float32"},
                                {"name": "t_mlp", "onnx_name": "t_mlp", "dtype": "float32"}],
                     "outputs": [{"name": "x", "onnx_name": "x_out", "dtype": "float32"}]}}


def _fake_trt():
    trt = plugin_api()
    trt.TensorIOMode = _IOMode
    return trt


def test_trt_runner_binds_every_engine_input_and_carries_the_cached_residual() -> None:
    trt, eng = _fake_trt(), _BindEngine()
    runner = TrtRunner({"spatial_0": {"default": EngineUnit(trt, eng, Path("s.engine"), _IO["spatial_0"])}}, _IO,
                       ("spatial_0",), device="cpu")
    g = torch.Generator().manual_seed(0)
    x1, x2, t = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g), torch.randn(2, 3, generator=g)
    o1 = runner.run_unit("spatial_0", "default", {"x": x1, "t_mlp": t})
    ctx = eng.contexts[0]
    assert set(o1) == {"x", "residual_out", "cache_stats_out"}  # every engine output comes back
    assert torch.allclose(o1["x"], x1 * 2 + t.sum()) and torch.allclose(o1["residual_out"], o1["x"] - x1)
    assert np.array_equal(ctx.reads[0]["cached_residual"], np.zeros((2, 4, 8), np.float32))  # no cache yet
    o2 = runner.run_unit("spatial_0", "default", {"x": x2, "t_mlp": t})
    assert np.array_equal(ctx.reads[1]["cached_residual"], o1["residual_out"].numpy())  # the previous residual
    want = (o2["residual_out"] - o1["residual_out"]).abs().reshape(2, -1).sum(1)
    assert torch.allclose(o2["cache_stats_out"][:, 0], want, rtol=1e-5)
    runner.reset()
    runner.run_unit("spatial_0", "default", {"x": x2, "t_mlp": t})
    assert not ctx.reads[2]["cached_residual"].any()
    with pytest.raises(ValueError, match="'t_mlp'"):
        runner.run_unit("spatial_0", "default", {"x": x2})


def test_trt_runner_refuses_engines_with_inputs_it_cannot_bind() -> None:
    trt = _fake_trt()
    with pytest.raises(ArtifactError, match=r"\['foo'\].*model.json"):
        EngineUnit(trt, _BindEngine(inputs=("x", "t_mlp", "foo")), Path("s.engine"), _IO["spatial_0"])
    with pytest.raises(ArtifactError, match="no 'residual_out' output"):
        EngineUnit(trt, _BindEngine(outputs=("x_out",)), Path("s.engine"), _IO["spatial_0"])


def test_trt_runner_registers_plugin_creators_before_deserializing(tmp_path: Path, monkeypatch) -> None:
    from qc_compile.manifest import VariantSource
    from qc_compile.runtime.runners import tensorrt as R
    from qc_compile.runtime.runners.sources import Sources

    trt, seen = _fake_trt(), []
    engine_file = tmp_path / "spatial_0.engine"
    engine_file.write_bytes(b"engine")

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, blob: bytes):
            seen.append({n: trt.registry.get_creator(n, "1", "qc") is not None for n in T.PLUGIN_NAMES})
            return _BindEngine()

    trt.Runtime, trt.Logger = Runtime, type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    src = VariantSource("spatial_0", "default", "default", tmp_path / "s.onnx", (), None, engine_file)
    for plugins in (False, True):
        monkeypatch.setattr(R, "variant_sources", lambda *a, **k: Sources(
            _IO, ("spatial_0",), {"spatial_0": {"default": src}}, "trt", plugins))
        runner = TrtRunner.from_workdir(tmp_path, "trt", trt=trt, device="cpu", check_runnable=False)
        assert seen[-1] == {n: plugins for n in T.PLUGIN_NAMES}  # registered before the engine was read
        assert len(runner.plugin_creators) == (3 if plugins else 0)
    assert TrtRunner.from_workdir(tmp_path, "trt", trt=trt, device="cpu", check_runnable=False).plugin_creators \
        == runner.plugin_creators  # idempotent: TensorRT refuses a second creator of the same name


# ------------------------------------------------------------------------------------------------ builder stand-in
CONFIGS = [  # (op, attrs, input shapes, input types)
    ("RotateQuantFP8", {"block": 64, "prologue": 0}, [(2, 9, 128)], ["BF16"]),
    ("RotateQuantFP8", {"block": 0, "prologue": 1}, [(2, 9, 128)], ["FLOAT"]),
    ("RotateQuantFP8", {"block": 32, "prologue": 2}, [(2, 9, 128), (2, 1, 128), (2, 1, 128)], ["BF16"] * 3),
    ("FP8Linear", {"has_bias": 1, "out_dtype": 2}, [(2, 9, 128), (2, 9, 1), (64, 128), (64,), (64,)],
     ["FP8", "FLOAT", "FP8", "FLOAT", "BF16"]),
    ("FP8Linear", {"has_bias": 0, "out_dtype": 0}, [(18, 128), (18, 1), (64, 128), (64,)],
     ["FP8", "FLOAT", "FP8", "FLOAT"]),
    ("CacheStatsApply", {"mode": 0}, [(2, 9, 128)] * 2, ["FLOAT"] * 2),
    ("CacheStatsApply", {"mode": 1}, [(2, 9, 128)] * 3, ["BF16"] * 3),
    ("CacheStatsApply", {"mode": 2}, [(2, 9, 128)] * 2, ["FLOAT"] * 2),
]


@pytest.mark.parametrize("op,attrs,shapes,types", CONFIGS)
def test_builder_standin_shapes_types_formats(op, attrs, shapes, types) -> None:
    trt = plugin_api()
    T.register_plugins(trt)
    layer = build_layer(trt, op, attrs, shapes, [DataType[t] for t in types])
    want = T.output_shapes(op, attrs, shapes)
    assert [list(s) for s in layer.out_shapes] == want
    dt = {"float32": "FLOAT", "bfloat16": "BF16", "float16": "HALF", "fp8": "FP8"}
    assert [t.name for t in layer.out_types] == [dt[n] for n in T.output_dtypes(op, attrs, [
        {"FLOAT": "float32", "BF16": "bfloat16", "FP8": "fp8"}[t] for t in types])]
    if op == "FP8Linear":  # the quantized operands only as FP8, the scales only as FLOAT
        assert set(layer.rejected[0]) == set(layer.rejected[2]) == set(CANDIDATES) - {DataType.FP8}
        assert set(layer.rejected[1]) == set(CANDIDATES) - {DataType.FLOAT}
    if op == "RotateQuantFP8":
        assert layer.out_types == [DataType.FP8, DataType.FLOAT] and DataType.FP8 in layer.rejected[0]


@pytest.mark.slow  # shares the plugin build of the parser test
def test_every_dynamic_input_of_a_plugin_graph_has_a_profile() -> None:
    """Full TensorRT needs an optimisation-profile shape for every dynamic network input, including the plugin
    pass's ``cached_residual``; the build derives them from model.json (+ that one input)."""
    from compile_helpers import built_plugins

    from qc_compile.build import profile_shapes
    from qc_compile.workdir import WorkDir, read_model_info

    info = read_model_info(WorkDir(built_plugins()))
    for unit in ("embed", "spatial_0", "temporal_0", "final"):
        proto = onnx.load(_plugin_graph(unit), load_external_data=False)
        dynamic = {i.name for i in proto.graph.input
                   if any(d.dim_param or d.dim_value <= 0 for d in i.type.tensor_type.shape.dim)}
        shapes = profile_shapes(info.unit(unit)["inputs"], 4, plugins=True)
        assert set(shapes) == dynamic, unit
        if "cached_residual" in shapes:
            assert shapes["cached_residual"] == shapes["x"] == ([1, 256, 128], [2, 256, 128], [4, 256, 128])
    assert "cached_residual" in profile_shapes(info.unit("spatial_0")["inputs"], 2, plugins=True)
