"""`build`: apply the passes per plan, write the Q/DQ graphs, build one engine per unit (and precision variant),
write ``manifest.json`` last. Shared by full TensorRT and TensorRT-RTX; their differences live in
:mod:`qc_compile.trt_compat`.

Consistency of the work dir (DESIGN.md §1):

* every file is written atomically (temp name + fsync + rename);
* the build runs under the work-dir lock (:mod:`qc_compile.locks`), hashes plan.json once when it reads it and
  refuses to write a manifest if the plan (or its sidecar) changed since;
* before the first artifact it hard-links what it may replace into ``.build-backup/`` and writes
  ``.build-in-progress.json``; an error, a full disk or Ctrl-C restores the previous build and removes both. A build
  killed outright leaves the marker, so :meth:`qc_compile.manifest.Manifest.load` (every executor, compare) refuses
  the work dir ("interrupted build of target T; re-run qc-compile build") instead of trusting a mix of old and new
  files, and the next build restores the backup first;
* the manifest records the sha256 of every artifact (and of model.json and the plan), so a file changed later is
  caught when it is loaded;
* a graph holding TensorRT-only ops (NVFP4) gets an onnxruntime twin beside it (``<unit>[.<v>].ort.onnx``, recorded
  as ``ort_onnx``), so the runtime and compare open files without the graph tooling;
* after the manifest is written, files under ``engines/<T>/`` that it does not reference are deleted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from qc_compile.artifacts import read_json, sha256_file, write_bytes_atomic, write_json_atomic
from qc_compile.errors import ArtifactError, UserError
from qc_compile.manifest import Manifest, check_fp_graph, remove_unreferenced, write_target
from qc_compile.onnx_utils import file_records, get_metadata, save_onnx, set_metadata
from qc_compile.plan import DEFAULT_VARIANT, Plan, load_plan
from qc_compile.trt_compat import Target, parse_target
from qc_compile.workdir import ModelInfo, WorkDir, read_model_info


class BuildError(RuntimeError):
    """TensorRT could not parse or build a graph (message carries the parser/builder log)."""


# ------------------------------------------------------------------------------------------------ passes per unit
def unit_graph(work: WorkDir, info: ModelInfo, plan: Plan, unit: str, variant: str, *, plugins: bool = False,
               report: dict | None = None, plan_sha256: str | None = None) -> onnx.ModelProto:
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
    if unit == "embed" and not info.is_diffusers:  # STDiT3's shared caption projection (Wan: online Mul per block)
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
        from qc_compile.models.units import is_block

        graph = pass_plugin_nodes(graph, entries, cache_stats=is_block(unit), report=report["plugins"])
    out = gs.export_onnx(graph)
    meta = get_metadata(proto)
    set_metadata(out, **{k: v for k, v in meta.items() if k != "format"})
    set_metadata(out, stage="q", variant=variant, plan_sha256=plan_sha256 or sha256_file(work.plan_json),
                 plugins=int(plugins))
    return out


def unit_variants(plan: Plan, info: ModelInfo, unit: str) -> dict[str, str]:
    """variant -> the variant whose graph it shares for this unit (identical entries for the unit's linears)."""
    names = [li["name"] for li in info.unit(unit)["linears"]]
    seen: dict[str, str] = {}
    out = {}
    for v in plan.used_variants():
        entries = plan.resolve(v)
        key = json.dumps([(n, entries[n].to_dict()) for n in names], sort_keys=True, default=str)  # lists inside
        out[v] = seen.setdefault(key, v)
    return out


# ------------------------------------------------------------------------------------------------ TensorRT
def _logger(trt):
    class Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []
            self.layers: list[str] = []  # the builder's per-layer listing (ProfilingVerbosity.DETAILED, verbose)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(f"[{severity.name}] {msg}")
            elif msg.startswith("Layers:"):
                self.layers.append(msg)

    return Collect()


def profile_shapes(unit_io: list[dict], max_batch: int, *, plugins: bool = False, block: bool | None = None
                   ) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """Optimisation-profile shapes of every dynamic network input: the unit's inputs from model.json, and with
    ``plugins`` the ``cached_residual`` input the plugin pass adds to block units (shaped like ``x``). Inputs whose
    shape model.json records as all-integer (Wan's RoPE tables ``[1, N, 1, D]``: the same for every batch element)
    are static and get no profile entry: min = opt = max = their recorded shape. ``block``: whether this is a block
    unit (:func:`qc_compile.models.units.is_block` of its name); None tells it from STDiT3's ``t_mlp`` input."""
    out = {}
    for io in unit_io:
        dims = io["shape"]
        if any(isinstance(d, str) for d in dims):
            mk = lambda b: [b if isinstance(d, str) else int(d) for d in dims]  # noqa: E731
            out[io["onnx_name"]] = (mk(1), mk(min(2, max_batch)), mk(max_batch))
    if block is None:
        block = any(io["onnx_name"] == "t_mlp" for io in unit_io)
    if plugins and "x" in out and block:  # block units only
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


def build_engine(trt, target: Target, path: Path, shapes: dict, *, layers: dict | None = None) -> bytes:
    """Parse ``path`` and build a serialized engine for ``target`` (shared by both TensorRT flavours). ``layers``
    (optional) receives the per-layer report: :func:`qc_compile.engine_report.layer_report`."""
    from qc_compile.engine_report import layer_report
    from qc_compile.trt_compat import configure

    builder, network, parser, logger = parse_onnx(trt, path)
    config = builder.create_builder_config()
    configure(trt, config, target)
    if layers is not None and hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
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
    blob = bytes(blob)
    if layers is not None:
        layers.update(layer_report(trt, blob, logger.layers))
    return blob


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
    """Build ``work`` for one target under the work-dir lock (see the module docstring for the guarantees)."""
    from qc_compile.locks import workdir_lock

    target = parse_target(target_name)
    work.require()
    with workdir_lock(work.root, f"build --target {target.name}"):
        return _build_locked(work, target, max_batch=max_batch, plugins=plugins, onnx_only=onnx_only,
                             progress=progress, engine_builder=engine_builder)


def _build_locked(work: WorkDir, target: Target, *, max_batch: int, plugins: bool, onnx_only: bool, progress: bool,
                  engine_builder: Callable | None) -> BuildResult:
    from tqdm.auto import tqdm

    from qc_compile import trt_compat
    from qc_compile.workdir import verify_unit_files

    info = read_model_info(work)
    plan_sha = sha256_file(work.plan_json) if work.plan_json.is_file() else None
    plan = load_plan(work.plan_json, model_info=info)
    _check_plan_unchanged(work, plan, plan_sha, "while it was read")  # the plan this build uses: hashed once
    check_plan_for_target(plan, target)
    if not 1 <= max_batch <= 256:
        raise UserError(f"--max-batch must be in 1..256, got {max_batch}.")
    if plugins and target.backend == "tensorrt_rtx":
        raise UserError("--plugins: TensorRT-RTX 1.7 cannot load the qc:: Python plugins (no plugin layers in its "
                        "Python API; its ONNX parser aborts the process on such a node). Use --target trt (full "
                        "TensorRT) or build without --plugins.")
    half = trt_compat.compute_dtype(target)
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
        verify_unit_files(work, info, unit)
    recover_interrupted_build(work)
    backup = _Backup.take(work, target)
    start = time.perf_counter()
    marker = {"target": target.name, "pid": os.getpid(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(work.build_marker, marker)
    try:
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
                proto = unit_graph(work, info, plan, unit, variant, plugins=plugins, report=report,
                                   plan_sha256=plan_sha)
                # onnxruntime runs the float32 Q/DQ graph (its CPU provider lacks bf16 kernels for most ops, and the
                # golden runs lock its numbers); TensorRT gets the precision-true graph (cast_precision).
                twin = None if plugins else (ort_twin(proto) or proto)  # no onnxruntime form for qc:: plugin nodes
                if twin is proto:
                    twin = onnx.ModelProto()
                    twin.CopyFrom(proto)
                    set_metadata(twin, stage="q-ort")
                proto = precision_graph(proto, half, report=report)
                qpath = work.q_onnx(unit, variant, plugins)
                vrec = {"onnx": file_records(save_onnx(proto, qpath), work.root), "dtype": half}
                if twin is not None:
                    vrec["ort_onnx"] = file_records(save_onnx(twin, work.q_onnx(unit, variant, ort=True)), work.root)
                audit = audit_unit(proto, plan, info, unit, variant, half, where=str(qpath))
                audit["trt_rules"] = check_trt_rules(proto, target, unit, where=str(qpath))
                reports = [write_report(work, target, unit, variant, "dtypes", audit)]
                report["dtype_audit"] = {"float32_ops": audit["float32_ops"],
                                         "by_category": audit["float32_by_category"]}
                del proto, twin
                vrec.update({"engine": None, "passes": report})
                if trt is not None:
                    layers: dict = {}
                    from qc_compile.models.units import is_block

                    shapes = profile_shapes(info.unit(unit)["inputs"], max_batch, plugins=plugins,
                                            block=is_block(unit))
                    blob = engine_builder(trt, target, qpath, shapes, layers=layers)
                    epath = work.engine(target.dir_name, unit, variant)
                    sha = write_bytes_atomic(epath, blob)
                    vrec["engine"] = {"path": work.rel(epath), "sha256": sha, "bytes": len(blob)}
                    if layers.get("layers"):
                        reports.append(write_report(work, target, unit, variant, "layers", layers))
                vrec["reports"] = reports
                vrec["seconds"] = round(time.perf_counter() - t0, 3)
                rec["variants"][variant] = vrec
        result.seconds = time.perf_counter() - start
        result.units = units_rec
        _check_plan_unchanged(work, plan, plan_sha, "during the build")
        _write_manifest(work, info, plan, target, trt, units_rec, result.seconds, max_batch, plugins, onnx_only,
                        plan_sha)
        work.build_marker.unlink(missing_ok=True)
    except BaseException:  # an error, a full disk, Ctrl-C: put the previous build back
        backup.restore()
        work.build_marker.unlink(missing_ok=True)
        backup.discard()
        raise
    backup.discard()
    remove_unreferenced(work, [work.root / "engines" / target.dir_name, work.root / "onnx" / "q"])
    return result


def _check_plan_unchanged(work: WorkDir, plan: Plan, plan_sha: str | None, when: str) -> None:
    """Refuse a plan (or its sidecar) that changed since this build hashed it."""
    now = sha256_file(work.plan_json) if work.plan_json.is_file() else None
    if now != plan_sha:
        raise ArtifactError(f"{work.plan_json}: the plan changed {when} (sha256 {str(plan_sha)[:12]}… at the start, "
                            f"{str(now)[:12]}… now); the graphs would not match the manifest's plan, so nothing was "
                            "kept and the previous build is unchanged. Do not edit the plan during a build; re-run "
                            "qc-compile build.")
    if plan.sidecar:
        side = work.plan_json.with_name(plan.sidecar["file"])
        got = sha256_file(side) if side.is_file() else None
        if got != plan.sidecar["sha256"]:
            raise ArtifactError(f"{side}: the plan's sidecar changed {when}; nothing was kept and the previous "
                                "build is unchanged. Re-run qc-compile build.")


BACKUP_DIR = ".build-backup"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # artifacts are replaced by rename, so a hard link keeps the old bytes
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class _Backup:
    """Hard links of what a build may replace (its target's engines, the Q/DQ graphs, the torch package and the
    manifest), so a failed or interrupted build restores the previous good state. ``state.json`` records which of
    them existed; restoring is idempotent (a restore that is itself interrupted is redone by the next build)."""

    work: WorkDir
    root: Path

    @staticmethod
    def scopes(work: WorkDir, target: Target) -> list[str]:
        return [work.rel(work.root / "engines" / target.dir_name), "onnx/q", "torch", "manifest.json"]

    @classmethod
    def take(cls, work: WorkDir, target: Target) -> "_Backup":
        root = work.root / BACKUP_DIR
        shutil.rmtree(root, ignore_errors=True)
        (root / "files").mkdir(parents=True)
        state = {}
        for rel in cls.scopes(work, target):
            src, dst = work.root / rel, root / "files" / rel
            state[rel] = src.exists()
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=_link_or_copy)
            elif src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(str(src), str(dst))
        write_json_atomic(root / "state.json", {"schema_version": 1, "existed": state})
        return cls(work, root)

    def restore(self) -> None:
        state = read_json(self.root / "state.json", kind="build backup state")["existed"]
        for rel, existed in state.items():
            cur, saved = self.work.root / rel, self.root / "files" / rel
            if existed and not saved.exists():
                continue  # restored already
            if cur.is_dir():
                shutil.rmtree(cur)
            elif cur.exists():
                cur.unlink()
            if existed:
                cur.parent.mkdir(parents=True, exist_ok=True)
                os.replace(saved, cur)

    def discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def recover_interrupted_build(work: WorkDir, log=None) -> bool:
    """Undo a build that was killed (SIGKILL, power loss) before it finished: with its marker and backup present,
    the previous build is put back. Returns whether anything was restored."""
    root = work.root / BACKUP_DIR
    if not root.is_dir():
        return False
    if not work.build_marker.is_file() or not (root / "state.json").is_file():
        shutil.rmtree(root, ignore_errors=True)  # killed before it changed anything, or after it finished
        return False
    b = _Backup(work, root)
    b.restore()
    work.build_marker.unlink(missing_ok=True)
    b.discard()
    if log:
        log(f"restored the previous build of {work.root} (an earlier build was interrupted).")
    return True


def precision_graph(proto: onnx.ModelProto, half: str, *, report: dict | None = None) -> onnx.ModelProto:
    """The float32 Q/DQ graph rewritten to run in ``half`` (see :mod:`qc_compile.passes.cast_precision`)."""
    from qc_compile.passes.cast_precision import export_tagged, pass_cast_precision

    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(proto))
    sub: dict = {}
    out = export_tagged(pass_cast_precision(graph, half, report=sub))
    if report is not None:
        report["cast_precision"] = sub
    set_metadata(out, **{k: v for k, v in get_metadata(proto).items() if k != "format"})
    set_metadata(out, dtype=half)
    return out


def audit_unit(proto: onnx.ModelProto, plan: Plan, info: ModelInfo, unit: str, variant: str, half: str, *,
               where: str) -> dict:
    """The dtype audit of a unit graph against the plan; UserError naming unit and op when a layer runs wider."""
    from qc_compile.passes.dtype_audit import audit, check

    names = {li["name"] for li in info.unit(unit)["linears"]}
    entries = {n: e for n, e in plan.resolve(variant).items() if n in names}
    result = audit(proto, half=half, linears=entries, unit=unit)
    result["variant"] = variant
    check(result, where=where)
    return result


def check_trt_rules(proto: onnx.ModelProto, target: Target, unit: str, *, where: str) -> dict:
    """TensorRT's documented Q/DQ rules (:mod:`qc_compile.trt_rules`); UserError on a violation. For ``trt`` this is
    the only check before the deploy machine's parser sees the graph."""
    from qc_compile.trt_rules import check_graph

    res = check_graph(proto, target.backend if target.is_trt else "tensorrt")
    if res["errors"]:
        e = res["errors"]
        raise UserError(f"{where}: the graph of unit {unit!r} breaks TensorRT's explicit-quantization rules for "
                        f"--target {target.name}: {'; '.join(e[:3])}{' …' if len(e) > 3 else ''} "
                        "(qc_compile/trt_rules.py lists the rules). This is a bug in the graph passes; report it "
                        "with the plan.")
    return res


def write_report(work: WorkDir, target: Target, unit: str, variant: str, kind: str, data: dict) -> dict:
    """``engines/<T>/<unit>[.<variant>].<kind>.json`` written atomically; its manifest file record."""
    path = work.engine(target.dir_name, unit, variant).with_suffix(f".{kind}.json")
    write_json_atomic(path, data)
    return {"path": work.rel(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


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
                    max_batch: int, plugins: bool, onnx_only: bool, plan_sha: str | None = None) -> None:
    from qc_compile import trt_compat

    plan_rec = {"path": work.rel(work.plan_json), "sha256": plan_sha or sha256_file(work.plan_json)}
    side = None
    if plan.sidecar:  # the sidecar's hash as the plan records it (checked unchanged just before)
        sp = work.plan_json.with_name(plan.sidecar["file"])
        side = {"path": work.rel(sp), "sha256": plan.sidecar["sha256"]}
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
