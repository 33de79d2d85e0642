"""`build`: apply the passes per plan, write the Q/DQ graphs, build one engine per unit (and precision variant),
write ``manifest.json`` last. Shared by full TensorRT and TensorRT-RTX; their differences live in
:mod:`qc_compile.trt_compat`.

Consistency of the work dir (DESIGN.md §1):

* every file is written atomically (temp name + fsync + rename);
* ``.build-in-progress.json`` is written before the first artifact and removed only after ``manifest.json`` has
  been written; a build that dies in between leaves the marker, and :meth:`qc_compile.manifest.Manifest.load` then
  refuses the work dir ("interrupted build of target T; re-run qc-compile build") instead of trusting a mix of old
  and new files;
* the manifest records the sha256 of every artifact (and of model.json and the plan), so a file changed later is
  caught when it is loaded;
* a graph holding TensorRT-only ops (NVFP4) gets an onnxruntime twin beside it (``<unit>[.<v>].ort.onnx``, recorded
  as ``ort_onnx``), so the runtime and compare open files without the graph tooling;
* after the manifest is written, files under ``engines/<T>/`` that it does not reference are deleted.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from qc_compile.artifacts import sha256_file, write_bytes_atomic, write_json_atomic
from qc_compile.errors import UserError
from qc_compile.manifest import Manifest, check_fp_graph, remove_unreferenced, write_target
from qc_compile.onnx_utils import file_records, get_metadata, save_onnx, set_metadata
from qc_compile.plan import DEFAULT_VARIANT, Plan, load_plan
from qc_compile.trt_compat import Target, parse_target
from qc_compile.workdir import ModelInfo, WorkDir, read_model_info


class BuildError(RuntimeError):
    """TensorRT could not parse or build a graph (message carries the parser/builder log)."""


# ------------------------------------------------------------------------------------------------ passes per unit
def unit_graph(work: WorkDir, info: ModelInfo, plan: Plan, unit: str, variant: str, *, plugins: bool = False,
               report: dict | None = None) -> onnx.ModelProto:
    """The FP graph of ``unit`` after fold -> rotate -> Q/DQ (-> plugin nodes) for ``variant`` of the plan."""
    from qc_compile.passes.fold_smoothing import pass_fold_smoothing
    from qc_compile.passes.insert_qdq import pass_insert_qdq
    from qc_compile.passes.rotate import pass_rotate

    from qc_compile.passes.common import reset_uids

    report = report if report is not None else {}
    reset_uids()
    proto = check_fp_graph(work.fp_onnx(unit), info.name, info.config_sha256, unit)
    proto = onnx.shape_inference.infer_shapes(proto)
    graph = gs.import_onnx(proto)
    entries = plan.resolve(variant)
    smoothing = {n: plan.smoothing_vector(n) for n, e in plan.linears.items() if e.smoothing is not None}
    caption = None
    if unit == "embed":
        kv = [s for n, s in smoothing.items() if n.endswith("cross_attn.kv_linear")]
        caption = kv[0] if kv else None
    report["fold"], report["rotate"], report["qdq"] = {}, {}, {}
    graph = pass_fold_smoothing(graph, smoothing, caption_fold=caption, report=report["fold"])
    graph = pass_rotate(graph, {n: e.rotation for n, e in plan.linears.items() if e.rotation},
                        head_dim=info.config().head_dim, report=report["rotate"])
    graph = pass_insert_qdq(graph, entries, report=report["qdq"])
    if plugins:
        from qc_compile.passes.plugin_nodes import pass_plugin_nodes

        report["plugins"] = {}
        graph = pass_plugin_nodes(graph, entries, report=report["plugins"])
    out = gs.export_onnx(graph)
    meta = get_metadata(proto)
    set_metadata(out, **{k: v for k, v in meta.items() if k != "format"})
    set_metadata(out, stage="q", variant=variant, plan_sha256=sha256_file(work.plan_json), plugins=int(plugins))
    return out


def unit_variants(plan: Plan, info: ModelInfo, unit: str) -> dict[str, str]:
    """variant -> the variant whose graph it shares for this unit (identical entries for the unit's linears)."""
    names = [li["name"] for li in info.unit(unit)["linears"]]
    seen: dict[tuple, str] = {}
    out = {}
    for v in plan.used_variants():
        entries = plan.resolve(v)
        key = tuple((n, tuple(sorted(entries[n].to_dict().items(), key=str))) for n in names)
        out[v] = seen.setdefault(key, v)
    return out


# ------------------------------------------------------------------------------------------------ TensorRT
def _logger(trt):
    class Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(f"[{severity.name}] {msg}")

    return Collect()


def profile_shapes(unit_io: list[dict], max_batch: int, *, plugins: bool = False
                   ) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """Optimisation-profile shapes of every dynamic network input: the unit's inputs from model.json, and with
    ``plugins`` the ``cached_residual`` input the plugin pass adds to block units (shaped like ``x``)."""
    out = {}
    for io in unit_io:
        dims = io["shape"]
        if any(isinstance(d, str) for d in dims):
            mk = lambda b: [b if isinstance(d, str) else int(d) for d in dims]  # noqa: E731
            out[io["onnx_name"]] = (mk(1), mk(min(2, max_batch)), mk(max_batch))
    if plugins and "x" in out and any(io["onnx_name"] == "t_mlp" for io in unit_io):  # block units only
        out["cached_residual"] = out["x"]
    return out


def parse_onnx(trt, path: Path):
    logger = _logger(trt)
    builder = trt.Builder(logger)
    from qc_compile.trt_compat import create_network

    network = create_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errs = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise BuildError(f"{path}: the TensorRT ONNX parser rejected the graph: {errs[:1500]}")
    return builder, network, parser, logger


def build_engine(trt, target: Target, path: Path, shapes: dict) -> bytes:
    """Parse ``path`` and build a serialized engine for ``target`` (shared by both TensorRT flavours)."""
    from qc_compile.trt_compat import configure

    builder, network, parser, logger = parse_onnx(trt, path)
    config = builder.create_builder_config()
    configure(trt, config, target)
    if shapes:
        prof = builder.create_optimization_profile()
        for name, (mn, opt, mx) in shapes.items():
            prof.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(prof)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        msgs = [m for m in logger.messages if "[ERROR]" in m or "[INTERNAL_ERROR]" in m]
        raise BuildError(f"{path}: TensorRT could not build an engine for {target.name}: "
                         f"{' | '.join(msgs)[-1500:] or 'no message'}")
    return bytes(blob)


# ------------------------------------------------------------------------------------------------ orchestration
@dataclass
class BuildResult:
    target: str
    units: dict = field(default_factory=dict)
    seconds: float = 0.0

    def graphs(self) -> list[tuple[str, dict]]:
        """``(unit, variant record)`` for every graph written (variants that share another's graph left out)."""
        return [(u, v) for u, r in self.units.items() if u != "package" for v in r["variants"].values()
                if "same_as" not in v]


def check_plan_for_target(plan: Plan, target: Target) -> None:
    """Refuse, with the reason, a plan whose formats the target cannot run."""
    from qc_compile.trt_compat import refusal_reason

    problems: dict[str, list[str]] = {}
    for v in plan.used_variants():
        for name, e in plan.resolve(v).items():
            why = refusal_reason(target, e.weight, e.activation)
            if why:
                problems.setdefault(why, []).append(name if v == DEFAULT_VARIANT else f"{name} (variant {v})")
    if problems:
        why, names = next(iter(problems.items()))
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        raise UserError(f"plan cannot be built for --target {target.name}: {why} (linears {', '.join(names[:2])}"
                        f"{more}). Re-calibrate for this target (e.g. --uniform fp8 for rtx:sm89) or choose a "
                        "target that runs these formats.")


def build_workdir(work: WorkDir, target_name: str, *, max_batch: int = 2, plugins: bool = False,
                  onnx_only: bool = False, progress: bool = True,
                  engine_builder: Callable | None = None) -> BuildResult:
    from tqdm.auto import tqdm

    from qc_compile import trt_compat

    target = parse_target(target_name)
    info = read_model_info(work)
    plan = load_plan(work.plan_json, model_info=info)
    check_plan_for_target(plan, target)
    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}.")
    if plugins and target.backend == "tensorrt_rtx":
        raise UserError("--plugins: TensorRT-RTX 1.7 cannot load the qc:: Python plugins (no plugin layers in its "
                        "Python API; its ONNX parser aborts the process on such a node). Use --target trt (full "
                        "TensorRT) or build without --plugins.")
    trt = None
    if target.is_trt and not onnx_only:
        trt = trt_compat.load_trt(target)
        trt_compat.check_build_host(trt, target)
        if plugins:
            from qc_compile.plugins.trt_plugins import register_plugins

            register_plugins(trt)
    engine_builder = engine_builder or build_engine
    for unit in info.unit_names:  # bad inputs are refused before anything is written
        check_fp_graph(work.fp_onnx(unit), info.name, info.config_sha256, unit)
    start = time.perf_counter()
    marker = {"target": target.name, "pid": os.getpid(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(work.build_marker, marker)
    result = BuildResult(target.name)
    units_rec: dict[str, dict] = {}
    if target.backend == "torch":
        from qc_compile.torch_package import write_package

        pkg = write_package(work, info, plan)
        units_rec = {"package": pkg}
    else:
        todo = [(u, v, same) for u in info.unit_names for v, same in unit_variants(plan, info, u).items()]
        for unit, variant, same in tqdm(todo, desc=f"build {target.name}", unit="graph", disable=not progress):
            rec = units_rec.setdefault(unit, {"inputs": info.unit(unit)["inputs"],
                                              "outputs": info.unit(unit)["outputs"], "variants": {}})
            if same != variant:
                rec["variants"][variant] = dict(rec["variants"][same], same_as=same)
                continue
            t0 = time.perf_counter()
            report: dict = {}
            proto = unit_graph(work, info, plan, unit, variant, plugins=plugins, report=report)
            twin = None if plugins else ort_twin(proto)  # onnxruntime cannot run qc:: plugin nodes anyway
            qpath = work.q_onnx(unit, variant, plugins)
            vrec = {"onnx": file_records(save_onnx(proto, qpath), work.root)}
            if twin is not None:
                vrec["ort_onnx"] = file_records(save_onnx(twin, work.q_onnx(unit, variant, ort=True)), work.root)
            del proto, twin
            vrec.update({"engine": None, "passes": report})
            if trt is not None:
                blob = engine_builder(trt, target, qpath, profile_shapes(info.unit(unit)["inputs"], max_batch,
                                                                         plugins=plugins))
                epath = work.engine(target.dir_name, unit, variant)
                sha = write_bytes_atomic(epath, blob)
                vrec["engine"] = {"path": work.rel(epath), "sha256": sha, "bytes": len(blob)}
            vrec["seconds"] = round(time.perf_counter() - t0, 3)
            rec["variants"][variant] = vrec
    result.seconds = time.perf_counter() - start
    result.units = units_rec
    _write_manifest(work, info, plan, target, trt, units_rec, result.seconds, max_batch, plugins, onnx_only)
    work.build_marker.unlink(missing_ok=True)
    remove_unreferenced(work, [work.root / "engines" / target.dir_name, work.root / "onnx" / "q"])
    return result


def ort_twin(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """The onnxruntime twin of a Q/DQ graph (same numbers, standard ops), or None when the graph runs as it is."""
    from qc_compile.passes.ort_twin import needs_twin, pass_ort_twin

    graph = gs.import_onnx(proto)
    if not needs_twin(graph):
        return None
    twin = gs.export_onnx(pass_ort_twin(graph))
    set_metadata(twin, **{k: v for k, v in get_metadata(proto).items() if k != "format"})
    set_metadata(twin, stage="q-ort")
    return twin


def _write_manifest(work: WorkDir, info: ModelInfo, plan: Plan, target: Target, trt, units: dict, seconds: float,
                    max_batch: int, plugins: bool, onnx_only: bool) -> None:
    from qc_compile import trt_compat

    plan_rec = {"path": work.rel(work.plan_json), "sha256": sha256_file(work.plan_json)}
    side = None
    if plan.sidecar:
        sp = work.plan_json.with_name(plan.sidecar["file"])
        side = {"path": work.rel(sp), "sha256": sha256_file(sp)}
    write_target(work, info, target.name, {
        "backend": target.backend, "sm": target.sm,
        "tool": None if trt is None else {"name": target.backend, "version": trt_compat.version(trt)},
        "engines": trt is not None, "onnx_only": onnx_only, "plugins": plugins, "max_batch": max_batch,
        "plan": plan_rec, "plan_sidecar": side, "variants": plan.used_variants(), "schedule": plan.schedule,
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "seconds": round(seconds, 2),
        "units": units,
    })


def verify_manifest(work: WorkDir, target_name: str | None = None, *, info: ModelInfo | None = None) -> dict:
    """The raw manifest dict after :meth:`qc_compile.manifest.Manifest.load`'s checks. Kept only for
    ``runtime/runners/sources.py`` until it switches to :mod:`qc_compile.manifest`; new code uses ``Manifest``."""
    return Manifest.load(work, target_name, info=info).data
