"""The builder's per-layer report of an engine (layer, kind, tactic, input/output data types, the ONNX nodes fused
into it), saved by ``build`` as ``engines/<T>/<unit>[.<variant>].layers.json``.

Two sources, same JSON shape:

* the engine inspector (``ICudaEngine.create_engine_inspector``, ``LayerInformationFormat.JSON``) — needs the engine
  deserialized, i.e. a GPU the runtime accepts (full TensorRT builds on the deploy GPU, so this is its path);
* the builder's verbose ``Layers:`` listing, printed when ``ProfilingVerbosity.DETAILED`` is set — TensorRT-RTX
  prints it while building on the CPU (checked with tensorrt-rtx 1.7), where no engine can be deserialized.
"""

from __future__ import annotations

import json
import re
from collections import Counter

_NAME = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),")
_DTYPE = re.compile(r"Datatype: (\w+)")
_ONNX = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def _section(line: str, start: str, end: str) -> str:
    i = line.find(start)
    if i < 0:
        return ""
    j = line.find(end, i + len(start))
    return line[i + len(start): j if j >= 0 else None]


def parse_layer_listing(messages: list[str]) -> list[dict]:
    """Layers from the builder's ``Layers:`` log message(s) (one layer per line)."""
    out = []
    for msg in messages:
        for line in msg.splitlines()[1:]:
            m = _NAME.match(line.strip())
            if not m:
                continue
            out.append({
                "name": m["name"], "type": m["type"],
                "inputs": _DTYPE.findall(_section(line, "Inputs: [", "], Constants: [")),
                "constants": _DTYPE.findall(_section(line, "Constants: [", "], Outputs: [")),
                "outputs": _DTYPE.findall(_section(line, "Outputs: [", "], TacticName:")),
                "tactic": _section(line, "TacticName: ", ", StreamId:").strip(),
                "onnx_nodes": _ONNX.findall(line),
            })
    return out


def _from_inspector(trt, blob: bytes) -> list[dict] | None:
    try:
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            return None
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception:  # noqa: BLE001 (no GPU / runtime refuses this GPU: fall back to the builder's listing)
        return None
    layers = []
    for lay in info.get("Layers", []):
        if isinstance(lay, str):
            layers.append({"name": lay})
            continue
        layers.append({
            "name": lay.get("Name"), "type": lay.get("LayerType"),
            "inputs": [i.get("Format/Datatype") for i in lay.get("Inputs", [])],
            "outputs": [o.get("Format/Datatype") for o in lay.get("Outputs", [])],
            "tactic": lay.get("TacticName", ""), "onnx_nodes": _ONNX.findall(str(lay.get("Metadata", ""))),
        })
    return layers


def layer_report(trt, blob: bytes, listing: list[str]) -> dict:
    """``{"source", "layers", "output_dtypes"}`` for a built engine (empty ``layers`` when neither source works)."""
    layers, source = None, "engine inspector"
    if not listing:
        layers = _from_inspector(trt, blob)
    if layers is None:
        layers, source = parse_layer_listing(listing), "builder log (ProfilingVerbosity.DETAILED)"
    dtypes = Counter(d for lay in layers for d in lay.get("outputs", []) if d)
    return {"source": source, "tool": getattr(trt, "__name__", "tensorrt"), "layers": layers,
            "output_dtypes": dict(dtypes)}
