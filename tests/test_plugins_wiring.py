"""The ``qc::`` plugins wired end to end, as far as this machine can take them.

- TensorRT's ONNX parser (TensorRT-RTX 1.7 here, on the CPU) resolves every ``qc::`` node of a plugin-bearing qc-ref
  unit graph to our creator (by the node's domain as plugin namespace) and hands it the node's attributes as plugin
  fields; the FP8 inputs (``xq`` from the quantize plugin, ``wq`` from the weight QuantizeLinear) arrive typed FP8.
  TensorRT-RTX has no plugin layers, so each probe creator records the call and refuses to create the plugin (the
  parser then stops cleanly instead of aborting the process); the engine build needs full TensorRT.
- The plugin objects driven exactly as TensorRT's builder drives them (:mod:`trt_standin`), CPU part.
"""

from __future__ import annotations

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

from qc_compile.passes.insert_qdq import lazy_const
from qc_compile.plugins import trt_plugins as T

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
            assert "[FP8]" not in seen and "[FLOAT]" in seen, seen
