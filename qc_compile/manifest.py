"""``manifest.json``: what a build wrote, written and verified in one place (DESIGN.md §1).

The build records, per target, the sha256 of every artifact (Q/DQ graphs, their onnxruntime twins, engines, the
torch package), of ``model.json`` and of the plan; this module writes that record (:func:`write_target`), reads it
back with every check (:meth:`Manifest.load`: no interrupted build, schema version, same model, sha256 of every
listed file) and resolves which files run each unit and precision variant (:meth:`TargetRecord.sources`), so no
caller sees the manifest's ``same_as`` sharing or its JSON layout.

It imports no graph tooling (onnx-graphsurgeon, the passes, export, build): the runtime uses it to load a build.
:func:`ort_session_for` opens a variant in onnxruntime — the build writes an onnxruntime-runnable twin
(``ort_onnx``) of every graph that holds TensorRT-only ops (NVFP4), so the runtime only opens files.
"""

from __future__ import annotations

import importlib.metadata as _md
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from qc_compile.artifacts import read_json, sha256_file, verify_sha256, write_json_atomic
from qc_compile.errors import ArtifactError, UserError
from qc_compile.workdir import ModelInfo, WorkDir, read_model_info

MANIFEST_SCHEMA = 2  # 2: variants record ``ort_onnx`` (the onnxruntime twin) where the graph needs one
TOOLS = ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "polygraphy", "tensorrt-rtx", "tensorrt", "qc-compile")
Need = Literal["any", "graphs", "engines", "package"]


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools an artifact depends on (None: not installed); recorded in provenance."""
    out = {}
    for name in TOOLS:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            out[name] = None
    return out


def check_fp_graph(path: Path, model_name: str, cfg_hash: str, unit: str):
    """Load an FP unit graph and check it belongs to this work dir (truncated/foreign/other model -> ArtifactError);
    returns the ``onnx.ModelProto``."""
    from qc_compile.onnx_utils import load_onnx

    return load_onnx(path, what=f"FP graph of unit {unit}", expect={"model": model_name, "config_sha256": cfg_hash,
                                                                    "unit": unit, "stage": "fp"})


# ------------------------------------------------------------------------------------------------ typed records
@dataclass(frozen=True)
class FileRecord:
    """One artifact: path relative to the work dir, sha256, size."""

    path: str
    sha256: str
    bytes: int | None = None

    @classmethod
    def of(cls, d: dict) -> "FileRecord":
        return cls(d["path"], d["sha256"], d.get("bytes"))


@dataclass(frozen=True)
class VariantSource:
    """The files that run one unit in one precision variant (sha256 verified when the manifest was loaded).

    ``onnx``: the graph TensorRT parses (``onnx_files`` lists it and its external-data file, if any); ``ort_onnx``:
    the graph onnxruntime runs — the build's twin when ``onnx`` holds TensorRT-only ops, else ``onnx`` itself, and
    None when onnxruntime cannot run this build at all (``--plugins``); ``engine``: the serialized engine or None;
    ``graph_of``: the variant whose graph this is (variants with identical entries for the unit share files)."""

    unit: str
    variant: str
    graph_of: str
    onnx: Path
    onnx_files: tuple[FileRecord, ...]
    ort_onnx: Path | None
    engine: Path | None = None
    engine_sha256: str | None = None

    @property
    def twin(self) -> bool:
        """Whether onnxruntime runs a twin graph rather than ``onnx`` itself."""
        return self.ort_onnx is not None and self.ort_onnx != self.onnx


@dataclass(frozen=True)
class TargetRecord:
    """One target's entry of the manifest. ``units`` keeps the raw per-unit records (inputs/outputs, passes report,
    timings); use :meth:`sources` for the files."""

    name: str
    root: Path
    backend: str
    engines: bool
    plugins: bool
    onnx_only: bool
    max_batch: int
    variants: tuple[str, ...]
    schedule: tuple[str, ...]
    plan: FileRecord
    plan_sidecar: FileRecord | None
    units: dict = field(repr=False)
    data: dict = field(repr=False)

    @classmethod
    def of(cls, name: str, root: Path, d: dict) -> "TargetRecord":
        side = d.get("plan_sidecar")
        return cls(name, root, d["backend"], bool(d.get("engines")), bool(d.get("plugins")),
                   bool(d.get("onnx_only")), int(d.get("max_batch", 1)), tuple(d.get("variants", ())),
                   tuple(d.get("schedule") or ()), FileRecord.of(d["plan"]), FileRecord.of(side) if side else None,
                   d.get("units", {}), d)

    @property
    def is_package(self) -> bool:
        """A ``--target torch`` build: a torch package, no graphs."""
        return "package" in self.units

    @property
    def unit_names(self) -> tuple[str, ...]:
        return () if self.is_package else tuple(self.units)

    def files(self) -> list[FileRecord]:
        """Every artifact this target references (each file once)."""
        if self.is_package:
            return [FileRecord.of(r) for r in self.units["package"]["files"]]
        out = []
        for u in self.units.values():
            for v in u["variants"].values():
                if "same_as" in v:
                    continue
                out += [FileRecord.of(r) for r in v["onnx"] + v.get("ort_onnx", []) + v.get("reports", [])]
                if v.get("engine"):
                    out.append(FileRecord.of(v["engine"]))
        return out

    def sources(self) -> dict[str, dict[str, VariantSource]]:
        """``{unit: {variant: VariantSource}}`` with shared variants resolved."""
        if self.is_package:
            raise UserError(f"target {self.name} is a torch package (build --target torch): it has no unit graphs.")
        out: dict[str, dict[str, VariantSource]] = {}
        for unit, rec in self.units.items():
            out[unit] = {}
            for variant, vrec in rec["variants"].items():
                of = vrec.get("same_as", variant)
                src = rec["variants"][of]
                onnx = self.root / src["onnx"][0]["path"]
                if src.get("ort_onnx"):
                    ort = self.root / src["ort_onnx"][0]["path"]
                else:
                    ort = None if self.plugins else onnx
                eng = src.get("engine")
                out[unit][variant] = VariantSource(unit, variant, of, onnx, tuple(FileRecord.of(r) for r in
                                                                                  src["onnx"]), ort,
                                                   self.root / eng["path"] if eng else None,
                                                   eng["sha256"] if eng else None)
        return out


@dataclass(frozen=True)
class Manifest:
    """A verified ``manifest.json``."""

    path: Path
    root: Path
    model_name: str
    config_sha256: str
    model_json: FileRecord
    tool_versions: dict
    targets: dict[str, TargetRecord]
    data: dict = field(repr=False)

    @classmethod
    def load(cls, work: WorkDir | str | Path, target: str | None = None, *,
             info: ModelInfo | None = None) -> "Manifest":
        """Read and verify the manifest of ``work``: no interrupted build, schema version, this model, and the sha256
        of ``model.json``, the plan and every artifact of ``target`` (of every target when None). ArtifactError with
        the reason and the command that repairs it."""
        work = work if isinstance(work, WorkDir) else WorkDir(work)
        info = info or read_model_info(work)
        _refuse_interrupted(work)
        data = read_json(work.manifest_json, kind="manifest", schema_version=MANIFEST_SCHEMA)
        model = data.get("model", {})
        if model.get("name") != info.name or model.get("config_sha256") != info.config_sha256:
            raise ArtifactError(f"{work.manifest_json}: manifest is for model {model.get('name')!r} with another "
                                f"configuration, not this work dir's {info.name!r}. Re-run qc-compile build.")
        if data["model_json"]["sha256"] != sha256_file(work.model_json):
            raise ArtifactError(f"{work.manifest_json}: model.json changed since the build (sha256 differs); re-run "
                                "qc-compile build.")
        targets = {n: TargetRecord.of(n, work.root, t) for n, t in data.get("targets", {}).items()}
        m = cls(work.manifest_json, work.root, info.name, info.config_sha256, FileRecord.of(data["model_json"]),
                data.get("tool_versions", {}), targets, data)
        for name in [target] if target else list(targets):
            t = m._named(name)
            for r in [t.plan] + ([t.plan_sidecar] if t.plan_sidecar else []) + t.files():
                verify_sha256(work.root / r.path, r.sha256)
        return m

    def _named(self, name: str) -> TargetRecord:
        if name not in self.targets:
            raise ArtifactError(f"{self.path}: no build for target {name!r} (built: "
                                f"{', '.join(self.targets) or 'none'}). Run qc-compile build {self.root} --target "
                                f"{name}.")
        return self.targets[name]

    def target(self, name: str | None = None, need: Need = "any") -> TargetRecord:
        """The target ``name`` (default: the first built that has what ``need`` asks for: ``graphs`` = Q/DQ ONNX
        graphs, ``engines`` = TensorRT engines, ``package`` = a torch package). UserError/ArtifactError saying which
        build to run when there is none."""
        has = {"any": lambda t: True, "graphs": lambda t: not t.is_package, "engines": lambda t: t.engines,
               "package": lambda t: t.is_package}[need]
        if name is not None:
            t = self._named(name)
        else:
            t = next((t for t in self.targets.values() if has(t)), None)
        if t is None or not has(t):
            built = ", ".join(f"{n} ({_what(r)})" for n, r in self.targets.items()) or "none"
            what = _NEED[need]
            why = f"target {name} has no {what}" if name else f"no {what} in any built target"
            raise UserError(f"{self.root}: {why} (built: {built}). {_HOW[need].format(root=self.root)}")
        return t


_NEED = {"any": "build", "graphs": "Q/DQ graphs", "engines": "TensorRT engines", "package": "torch package"}
_HOW = {"any": "Run qc-compile build {root} --target T.",
        "graphs": "Run `qc-compile build {root} --target rtx:sm89` (or another ONNX target; --target torch writes a "
                  "torch package, not graphs).",
        "engines": "A target built with --onnx-only or --target torch has none; run `qc-compile build {root} "
                   "--target trt` on the deploy machine.",
        "package": "Run `qc-compile build {root} --target torch`."}


def _what(t: TargetRecord) -> str:
    return "torch package" if t.is_package else "engines" if t.engines else "graphs only"


def _refuse_interrupted(work: WorkDir) -> None:
    from qc_compile.workdir import check_no_interrupted_build

    check_no_interrupted_build(work)


def fp_sources(work: WorkDir, info: ModelInfo | None = None) -> dict[str, dict[str, VariantSource]]:
    """The exported FP graphs as sources (``{unit: {"default": ...}}``), each checked to belong to this work dir."""
    from qc_compile.workdir import verify_unit_files

    info = info or read_model_info(work)
    _refuse_interrupted(work)
    out = {}
    for u in info.unit_names:
        path = work.fp_onnx(u)
        check_fp_graph(path, info.name, info.config_sha256, u)
        verify_unit_files(work, info, u)  # the bytes model.json recorded at export
        rec = next((tuple(FileRecord.of(r) for r in x["onnx"]) for x in info.units if x["name"] == u), ())
        out[u] = {"default": VariantSource(u, "default", "default", path, rec, path)}
    return out


def ort_session_for(source: VariantSource, threads: int | None = None, device: str = "cpu"):
    """An onnxruntime session for a variant (its twin where it has one); ArtifactError when onnxruntime cannot run
    this build (qc:: plugin nodes)."""
    from qc_compile.onnx_utils import ort_session

    if source.ort_onnx is None:
        raise ArtifactError(f"{source.onnx}: built with --plugins (qc:: plugin nodes), which onnxruntime cannot run; "
                            "rebuild without --plugins for the onnxruntime backend or compare.")
    return ort_session(source.ort_onnx, threads=threads, device=device)


# ------------------------------------------------------------------------------------------------ writing
def write_target(work: WorkDir, info: ModelInfo, name: str, record: dict) -> None:
    """Record one target's build in ``manifest.json`` (atomically; other targets of the same model are kept).
    ``record`` holds at least ``backend``, ``plan`` and ``units`` (see ``build._target_record``)."""
    old: dict = {}
    if work.manifest_json.is_file():
        try:
            old = read_json(work.manifest_json, kind="manifest", schema_version=MANIFEST_SCHEMA)
            if old.get("model", {}).get("config_sha256") != info.config_sha256:
                old = {}
        except UserError:
            old = {}
    TargetRecord.of(name, work.root, record)  # the fields readers need are there
    targets = dict(old.get("targets", {}))
    targets[name] = record
    write_json_atomic(work.manifest_json, {
        "schema_version": MANIFEST_SCHEMA, "model": {"name": info.name, "config_sha256": info.config_sha256},
        "model_json": {"path": "model.json", "sha256": sha256_file(work.model_json)},
        "tool_versions": tool_versions(), "targets": targets})


def remove_unreferenced(work: WorkDir, folders: list[Path]) -> None:
    """Delete files in ``folders`` that no target of the manifest references (stale graphs and engines)."""
    data = read_json(work.manifest_json, kind="manifest")
    keep = {r.path for n, t in data.get("targets", {}).items() for r in TargetRecord.of(n, work.root, t).files()}
    for d in folders:
        if d.is_dir():
            for p in d.iterdir():
                if p.is_file() and work.rel(p) not in keep:
                    p.unlink()
