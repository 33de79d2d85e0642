"""Per-unit ONNX export of an STDiT3 model (DESIGN.md §1): ``WORK/model.json`` + ``WORK/onnx/fp/<unit>.onnx``.

Exporter: torch's TorchScript exporter (``dynamo=False``); the dynamo exporter needs onnxscript, which is not a
dependency. Default opset 19 (FP8 Q/DQ needs >= 19; the Q/DQ pass raises it to 21 for INT4 and 23 for NVFP4).
What it handles on torch 2.13:

* SDPA with a bool mask exports (as MatMul/Softmax with a Where on the mask), LayerNorm as LayerNormalization, and
  STDiT3's RMSNorm is written out in elementary ops, so aten::rms_norm never appears.
* ``Tensor.repeat_interleave`` (RoPE's cos/sin table) exports to a graph whose Reshape constants are corrupted
  (onnxruntime: "cannot reshape {2,768} to {2,6,1}" in the temporal blocks). :func:`export_patches` swaps in a
  stack/reshape form with identical values for the duration of the export.

Each graph is then put in canonical form (:func:`canonicalize`): every nn.Linear becomes
``MatMul(x, <linear>.weight [K, N]) -> Add(<linear>.bias, .)`` (the exporter's Gemm for 2-D inputs is rewritten;
deduplicated initializers are split so every linear owns its weight), and ``qc.*`` metadata is set. Outputs are named
``<name>_out`` because ONNX forbids an output with an input's name (``x`` -> ``x_out``). The batch axis is dynamic;
every other size is fixed by the geometry. Finally each unit is run in onnxruntime on fresh random inputs and compared
with torch before the command reports success.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from qc_compile.artifacts import sha256_file, write_json_atomic
from qc_compile.errors import UserError
from qc_compile.linears import config_sha256, linears_by_unit, model_linears
from qc_compile.manifest import check_fp_graph, tool_versions  # noqa: F401 (check_fp_graph: runtime/runners/sources.py)
from qc_compile.models.stdit3 import UNIT_INPUTS, UNIT_OUTPUTS, Geometry, unit_kind
from qc_compile.onnx_utils import file_records, ort_session, save_onnx, set_metadata
from qc_compile.passes.common import uid
from qc_compile.workdir import MODEL_JSON_SCHEMA, WorkDir, state_digest

DEFAULT_OPSET = 19
EXPORT_BATCH = 2  # CFG: [cond; null]
VERIFY_RTOL = 1e-4  # max |onnx - torch| / max |torch| per output, fp32

def onnx_output_name(name: str) -> str:
    return f"{name}_out"


@contextlib.contextmanager
def export_patches():
    """Export-friendly (numerically identical) replacements, active only while exporting."""
    from qc_compile.models.layers import RotaryEmbedding

    orig = RotaryEmbedding.cos_sin

    def cos_sin(self, seq_len, device, dtype):  # [θ0, θ0, θ1, θ1, …] without repeat_interleave
        pos = torch.arange(seq_len, device=device, dtype=self.freqs.dtype)
        ang = pos[:, None] * self.freqs[None, :]
        ang = torch.stack((ang, ang), dim=-1).reshape(seq_len, -1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    RotaryEmbedding.cos_sin = cos_sin
    try:
        yield
    finally:
        RotaryEmbedding.cos_sin = orig


def example_inputs(config, g: Geometry, kind: str, batch: int = EXPORT_BATCH,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs with realistic magnitudes, in UNIT_INPUTS order."""
    gen = torch.Generator().manual_seed(seed)
    C, L = config.hidden_size, config.model_max_length

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    lens = torch.randint(1, L + 1, (batch,), generator=gen)
    mask = torch.arange(L)[None] < lens[:, None]
    if kind == "embed":
        return (randn(batch, config.in_channels, g.frames, g.height, g.width),
                torch.rand(batch, generator=gen) * 1000, randn(batch, 1, L, config.caption_channels), mask,
                torch.full((batch,), float(config.default_fps)))
    if kind == "block":
        return randn(batch, g.N, C), randn(batch, 6 * C, scale=0.3), randn(batch, L, C), mask
    return randn(batch, g.N, C), randn(batch, C, scale=0.3)


def _scope_path(node_name: str) -> str:
    """'/t_block/t_block.1/Gemm' -> 't_block.1'; '/spatial_blocks.0/attn/qkv/MatMul' -> 'spatial_blocks.0.attn.qkv'."""
    parts: list[str] = []
    for seg in node_name.strip("/").split("/")[:-1]:
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts)


def _const(t) -> np.ndarray | None:
    """Values of a constant, following the Identity nodes the exporter uses for deduplicated initializers."""
    while not isinstance(t, gs.Constant):
        p = t.inputs[0] if t.inputs else None
        if p is None or p.op != "Identity":
            return None
        t = p.inputs[0]
    return np.asarray(t.values)


def canonicalize(model: onnx.ModelProto, linears: dict[str, torch.nn.Linear], prefix: str = "") -> onnx.ModelProto:
    """Give every linear the canonical MatMul [K, N] + Add(bias) form with named, unshared constants.

    ``linears`` is keyed by the linears' names; a graph scope starting with ``prefix`` has it stripped first (a unit
    traced through a wrapper that holds the model as ``transformer`` has scopes with and without it)."""
    graph = gs.import_onnx(model)
    found: set[str] = set()
    for node in list(graph.nodes):
        if node.op not in ("MatMul", "Gemm"):
            continue
        path = _scope_path(node.name)
        path = path[len(prefix):] if prefix and path.startswith(prefix) else path
        if path not in linears:
            continue
        lin = linears[path]
        K, N = lin.in_features, lin.out_features
        w_torch = lin.weight.detach().float().cpu().numpy()  # [N, K]
        if node.op == "Gemm":
            a = node.attrs
            if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
                raise RuntimeError(f"unexpected Gemm attributes for {path}: {a}")
            w = _const(node.inputs[1])
            w = w.T if a.get("transB", 0) else w
            x, y = node.inputs[0], node.outputs[0]
            mm_out = gs.Variable(uid(f"{path}_mm"), dtype=np.float32)
            wc = gs.Constant(f"{path}.weight", np.ascontiguousarray(w, dtype=np.float32))
            mm = gs.Node("MatMul", name=node.name.replace("/Gemm", "/MatMul"), inputs=[x, wc], outputs=[mm_out])
            graph.nodes.append(mm)
            if len(node.inputs) > 2:
                bc = gs.Constant(f"{path}.bias", np.array(_const(node.inputs[2]), dtype=np.float32))
                add = gs.Node("Add", name=node.name.replace("/Gemm", "/Add"), inputs=[bc, mm_out], outputs=[y])
                graph.nodes.append(add)
            else:
                mm.outputs = [y]
            node.outputs.clear()
            node.inputs.clear()
        else:
            wv = _const(node.inputs[1])
            if wv is None:
                raise RuntimeError(f"{path}: MatMul weight is not a constant")
            node.inputs[1] = gs.Constant(f"{path}.weight", np.array(wv, dtype=np.float32, copy=True))
            adds = [n for n in node.outputs[0].outputs if n.op == "Add"]
            if lin.bias is not None:
                if len(adds) != 1:
                    raise RuntimeError(f"{path}: expected one bias Add after the MatMul, found {len(adds)}")
                add = adds[0]
                j = next(i for i, t in enumerate(add.inputs) if _const(t) is not None)
                add.inputs[j] = gs.Constant(f"{path}.bias",
                                            np.array(_const(add.inputs[j]), dtype=np.float32, copy=True))
        wv = graph.tensors()[f"{path}.weight"].values
        if wv.shape != (K, N) or not np.allclose(wv, w_torch.T, rtol=0, atol=0):
            raise RuntimeError(f"{path}: exported weight does not match the torch weight")
        found.add(path)
    missing = sorted(set(linears) - found)
    if missing:
        raise RuntimeError(f"exporter output: linears not found in the graph: {missing}")
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out


def io_records(model: onnx.ModelProto, kind: str, direction: str, unit_inputs: dict = UNIT_INPUTS,
               unit_outputs: dict = UNIT_OUTPUTS) -> list[dict]:
    """model.json's records of a graph's inputs or outputs: canonical name, ONNX name, shape, dtype (the unit
    vocabulary ``unit_inputs`` / ``unit_outputs`` of the model family; STDiT3's by default)."""
    vis = model.graph.input if direction == "inputs" else model.graph.output
    canon = unit_inputs[kind] if direction == "inputs" else unit_outputs[kind]
    by_onnx = {(n if direction == "inputs" else onnx_output_name(n)): n for n in canon}
    out = []
    for vi in vis:
        tt = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        out.append({"name": by_onnx[vi.name], "onnx_name": vi.name, "shape": shape,
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name})
    return out


def verify_unit(path: Path, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], kind: str,
                unit_inputs: dict = UNIT_INPUTS, unit_outputs: dict = UNIT_OUTPUTS) -> float:
    """max over outputs of max|onnx - torch| / max|torch|; onnxruntime on fresh inputs."""
    sess = ort_session(path)
    names = {i.name for i in sess.get_inputs()}
    feed = {n: t.numpy() for n, t in zip(unit_inputs[kind], inputs) if n in names}
    got = sess.run([onnx_output_name(n) for n in unit_outputs[kind]], feed)
    with torch.no_grad():
        ref = module(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    err = 0.0
    for g_, r in zip(got, ref):
        r = r.float().numpy()
        if g_.shape != r.shape:
            return float("inf")
        err = max(err, float(np.abs(g_ - r).max() / max(np.abs(r).max(), 1e-12)))
    return err


@dataclass
class ExportResult:
    units: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def check_opset(opset: int) -> None:
    if opset < 17 or opset > 21:
        raise UserError(f"--opset must be between 17 and 21, got {opset} (the Q/DQ pass raises it as formats need).")


def export_model(loaded, work: WorkDir, *, frames: int, height: int, width: int, opset: int = DEFAULT_OPSET,
                 weights: dict, progress: bool = True, verify: bool = True, log=print) -> ExportResult:
    """Export every unit of ``loaded`` into ``work`` and write ``model.json`` last."""
    from tqdm.auto import tqdm

    check_opset(opset)
    model, cfg = loaded.model.float().eval(), loaded.config
    g = Geometry.for_model(cfg, frames, height, width)
    linears = model_linears(model)
    by_unit = linears_by_unit(linears)
    modules = dict(model.named_modules())
    cfg_hash = config_sha256(cfg)
    start = time.perf_counter()
    result = ExportResult()
    torch.set_grad_enabled(False)
    names = model.unit_names()
    for name in tqdm(names, desc="export", unit="unit", disable=not progress):
        t0 = time.perf_counter()
        kind = unit_kind(name)
        module = model.unit_module(name, g)
        ins = example_inputs(cfg, g, kind, seed=1)
        out_names = [onnx_output_name(n) for n in UNIT_OUTPUTS[kind]]
        unit_lins = {li.name: modules[li.name] for li in by_unit.get(name, [])}
        with tempfile.TemporaryDirectory() as tmp, export_patches(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python branches on fixed geometry sizes
            tmp_path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(module, ins, str(tmp_path), input_names=list(UNIT_INPUTS[kind]),
                              output_names=out_names, opset_version=opset, dynamo=False, do_constant_folding=True,
                              dynamic_axes={n: {0: "batch"} for n in list(UNIT_INPUTS[kind]) + out_names})
            proto = onnx.load(str(tmp_path))
        proto = canonicalize(proto, unit_lins)
        set_metadata(proto, model=cfg.name, config_sha256=cfg_hash, unit=name, stage="fp",
                     geometry=f"{g.frames}x{g.height}x{g.width}")
        path = work.fp_onnx(name)
        files = save_onnx(proto, path)
        err = None
        if verify:
            err = verify_unit(path, module, example_inputs(cfg, g, kind, seed=2), kind)
            if not err <= VERIFY_RTOL:
                raise RuntimeError(f"unit {name}: onnxruntime output differs from torch by {err:.3g} (relative, "
                                   f"tolerance {VERIFY_RTOL}); the exported graph is wrong. This is a bug.")
        result.units.append({
            "name": name, "kind": kind,
            "onnx": file_records(files, work.root),
            "inputs": io_records(proto, kind, "inputs"), "outputs": io_records(proto, kind, "outputs"),
            "linears": [{"name": li.name, "role": li.role, "in_features": li.in_features,
                         "out_features": li.out_features} for li in by_unit.get(name, [])],
            "verify_rel_err": err, "seconds": round(time.perf_counter() - t0, 3),
        })
        del proto
    result.seconds = time.perf_counter() - start
    write_model_json(work, {"name": cfg.name, "config": cfg.to_dict(), "config_sha256": cfg_hash}, weights,
                     {"video": {"frames": frames, "height": height, "width": width},
                      "model": {"frames": g.frames, "height": g.height, "width": g.width,
                                "patch_size": list(g.patch_size), "height_px": g.height_px, "width_px": g.width_px},
                      "grid": list(g.grid), "tokens": g.N}, opset, result)
    return result


def write_model_json(work: WorkDir, model: dict, weights: dict, geometry: dict, opset: int,
                     result: ExportResult) -> None:
    """``model.json``, written last and atomically (every family: the model record and geometry are its own)."""
    write_json_atomic(work.model_json, {
        "schema_version": MODEL_JSON_SCHEMA, "model": model, "weights": weights, "geometry": geometry,
        "batch": {"export": EXPORT_BATCH, "dynamic": True},
        "opset": opset, "dtype": "float32",
        "units": result.units,
        "tool_versions": tool_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(result.seconds, 2),
    })


def weights_record(loaded, checkpoint: Path | None, random_weights: bool, seed: int) -> dict:
    digest = state_digest(loaded.model)
    if checkpoint is not None:
        return {"source": "checkpoint", "path": str(Path(checkpoint).resolve()), "sha256": sha256_file(checkpoint),
                "state_sha256": digest}
    if random_weights:
        return {"source": "random", "seed": seed, "state_sha256": digest}
    return {"source": "shipped", "path": loaded.checkpoint, "sha256": sha256_file(loaded.checkpoint),
            "state_sha256": digest}
