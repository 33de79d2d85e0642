"""The work dir: the contract between stages (DESIGN.md §1).

::

    WORK/model.json                 export: model, config hash, weights, geometry, units and their I/O
    WORK/onnx/fp/<unit>.onnx        export: FP32 graph per unit (canonical linears, qc.* metadata)
    WORK/calib/ranges.safetensors   calibrate: per-linear activation statistics
    WORK/plan.json (+ sidecar)      calibrate: the plan (qc_compile.plan)
    WORK/onnx/q/<unit>[.<v>].onnx   build: graphs after the passes
    WORK/onnx/q/<unit>[.<v>].ort.onnx   build: their onnxruntime twin, where they hold TensorRT-only ops (NVFP4)
    WORK/engines/<T>/<unit>[.<v>].engine   build
    WORK/torch/                     build --target torch
    WORK/manifest.json              build: sha256 of every artifact, written last (qc_compile.manifest)
    WORK/.build-in-progress.json    present only while (or after an interrupted) build

:class:`ModelInfo` reads and checks ``model.json``; :func:`load_model_for` rebuilds the torch model it describes and
checks that its weights are the ones that were exported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from qc_compile.artifacts import read_json, sha256_file
from qc_compile.errors import ArtifactError, UserError

MODEL_JSON_SCHEMA = 1


class WorkDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    model_json = property(lambda self: self.root / "model.json")
    plan_json = property(lambda self: self.root / "plan.json")
    manifest_json = property(lambda self: self.root / "manifest.json")
    build_marker = property(lambda self: self.root / ".build-in-progress.json")
    calib_dir = property(lambda self: self.root / "calib")
    report_dir = property(lambda self: self.root / "report")
    torch_dir = property(lambda self: self.root / "torch")

    def fp_onnx(self, unit: str) -> Path:
        return self.root / "onnx" / "fp" / f"{unit}.onnx"

    def q_onnx(self, unit: str, variant: str = "default", plugins: bool = False, ort: bool = False) -> Path:
        """The Q/DQ graph of a unit and variant; ``ort``: its onnxruntime twin (TensorRT-only ops replaced)."""
        suffix = ("" if variant == "default" else f".{variant}") + (".plugins" if plugins else "") + \
            (".ort" if ort else "")
        return self.root / "onnx" / "q" / f"{unit}{suffix}.onnx"

    def engine(self, target_dir: str, unit: str, variant: str = "default") -> Path:
        suffix = "" if variant == "default" else f".{variant}"
        return self.root / "engines" / target_dir / f"{unit}{suffix}.engine"

    def rel(self, p: Path) -> str:
        return str(Path(p).relative_to(self.root))

    def require(self) -> None:
        if not self.root.is_dir():
            raise UserError(f"work dir {self.root} does not exist; create it with `qc-compile export MODEL -o "
                            f"{self.root}`.")
        if not self.model_json.is_file():
            raise UserError(f"{self.root} is not a qc-compile work dir (no model.json); run `qc-compile export "
                            f"MODEL -o {self.root}` first.")


@dataclass
class ModelInfo:
    """The parsed ``model.json``."""

    data: dict
    path: Path

    @property
    def name(self) -> str:
        return self.data["model"]["name"]

    @property
    def config_sha256(self) -> str:
        return self.data["model"]["config_sha256"]

    @property
    def units(self) -> list[dict]:
        return self.data["units"]

    def unit(self, name: str) -> dict:
        for u in self.units:
            if u["name"] == name:
                return u
        raise UserError(f"{self.path}: no unit {name!r}; units are {', '.join(u['name'] for u in self.units)}.")

    @property
    def unit_names(self) -> list[str]:
        return [u["name"] for u in self.units]

    @property
    def family(self) -> str | None:
        """The diffusers family of the exported model (``"wan"``); None for STDiT3 models."""
        return self.data["model"].get("family")

    @property
    def is_diffusers(self) -> bool:
        return self.family is not None

    def config(self):
        """STDiT3Config, or for a diffusers export its DiffusersConfig (family + the transformer's config)."""
        if self.is_diffusers:
            from qc_compile.export_diffusers import DiffusersConfig

            return DiffusersConfig.from_dict(self.data["model"]["config"])
        from qc_compile.models.config import STDiT3Config

        return STDiT3Config.from_dict(self.data["model"]["config"])

    def geometry(self):
        g = dict(self.data["geometry"]["model"])
        g["patch_size"] = tuple(g["patch_size"])
        if self.is_diffusers:
            from qc_compile.models.diffusers_adapter import DiffusersGeometry

            return DiffusersGeometry(g["frames"], g["height"], g["width"], g["patch_size"])
        from qc_compile.models.stdit3 import Geometry

        return Geometry(**g)

    @property
    def text_length(self) -> int | None:
        """Diffusers exports: the text length the graphs were exported at (fixed; only the batch is dynamic)."""
        return self.data["geometry"].get("text_length")

    @property
    def video_size(self) -> tuple[int, int, int]:
        v = self.data["geometry"]["video"]
        return v["frames"], v["height"], v["width"]

    def linears(self) -> list[dict]:
        return [dict(li, unit=u["name"]) for u in self.units for li in u["linears"]]


def read_model_info(work: WorkDir) -> ModelInfo:
    work.require()
    data = read_json(work.model_json, kind="model.json", schema_version=MODEL_JSON_SCHEMA)
    for key in ("model", "weights", "geometry", "units"):
        if key not in data:
            raise ArtifactError(f"{work.model_json}: missing field {key!r}; the file is damaged or from another "
                                "tool. Re-run qc-compile export.")
    _check_model_json_shape(data, work.model_json)
    info = ModelInfo(data, work.model_json)
    from qc_compile.linears import config_sha256

    try:
        cfg = info.config()
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ArtifactError(f"{work.model_json}: field model.config is malformed ({type(e).__name__}: "
                            f"{str(e)[:160]}); the file was edited or damaged. Re-run qc-compile export.") from None
    if config_sha256(cfg) != info.config_sha256:
        raise ArtifactError(f"{work.model_json}: model.config does not hash to model.config_sha256; the file was "
                            "edited. Re-run qc-compile export.")
    return info


def _check_model_json_shape(data: dict, path: Path) -> None:
    """The structure every reader of model.json relies on, so a damaged or edited file is an ArtifactError that
    names the field instead of a TypeError deep inside a stage."""
    def bad(field: str, expected: str) -> ArtifactError:
        return ArtifactError(f"{path}: field {field} must be {expected}; the file was edited or damaged. Re-run "
                             "qc-compile export.")

    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or \
            not isinstance(model.get("config"), dict) or not isinstance(model.get("config_sha256"), str):
        raise bad("model", "an object with name, config and config_sha256")
    if model.get("family") not in (None, "wan"):
        raise bad("model.family", "absent (STDiT3) or 'wan'")
    if model.get("family") is not None:
        if not isinstance(data.get("weights", {}).get("files"), dict):
            raise bad("weights.files", "an object mapping weight files to their sha256")
        tl = data.get("geometry", {}).get("text_length")
        if not isinstance(tl, int) or isinstance(tl, bool) or tl < 1:
            raise bad("geometry.text_length", "a positive integer")
    w = data.get("weights")
    if not isinstance(w, dict) or w.get("source") not in ("checkpoint", "shipped", "random") or \
            not isinstance(w.get("state_sha256"), str):
        raise bad("weights", "an object with source (checkpoint | shipped | random) and state_sha256")
    geo = data.get("geometry")
    if not isinstance(geo, dict) or not isinstance(geo.get("video"), dict) or not isinstance(geo.get("model"), dict):
        raise bad("geometry", "an object with video and model sizes")
    for k in ("frames", "height", "width"):
        if not isinstance(geo["video"].get(k), int) or isinstance(geo["video"].get(k), bool) or geo["video"][k] < 1:
            raise bad(f"geometry.video.{k}", "a positive integer")
    units = data.get("units")
    if not isinstance(units, list) or not units:
        raise bad("units", "a non-empty list of unit records")
    for i, u in enumerate(units):
        if not isinstance(u, dict) or not isinstance(u.get("name"), str):
            raise bad(f"units[{i}]", "an object with a name")
        for k in ("onnx", "inputs", "outputs", "linears"):
            if not isinstance(u.get(k), list):
                raise bad(f"units[{i}].{k} ({u['name']})", "a list")
        for r in u["onnx"]:
            if not isinstance(r, dict) or not isinstance(r.get("path"), str) or not isinstance(r.get("sha256"), str):
                raise bad(f"units[{i}].onnx ({u['name']})", "a list of {path, sha256} file records")
        for li in u["linears"]:
            if not isinstance(li, dict) or not isinstance(li.get("name"), str):
                raise bad(f"units[{i}].linears ({u['name']})", "a list of {name, ...} records")


def check_no_interrupted_build(work: WorkDir) -> None:
    """Refuse a work dir whose last build did not finish (its marker is present): its artifacts may be a mix of
    old and new files. Every executor and ``compare`` call this before trusting the work dir."""
    if not work.build_marker.is_file():
        return
    try:
        m = read_json(work.build_marker, kind="build marker")
    except UserError:
        m = {}
    t = m.get("target", "T")
    raise ArtifactError(f"{work.root}: a build of target {m.get('target', '?')} started {m.get('started', '?')} did "
                        "not finish (.build-in-progress.json is present); its artifacts may be a mix of old and new "
                        f"files. Re-run `qc-compile build {work.root} --target {t}` (it first restores the previous "
                        "build when it can).")


def verify_unit_files(work: WorkDir, info: ModelInfo, unit: str) -> None:
    """The FP graph files of ``unit`` hash to what model.json recorded at export (edited weight bytes are caught
    here, before a stage trusts them)."""
    recs = info.unit(unit)["onnx"]
    if not any(r["path"] == work.rel(work.fp_onnx(unit)) for r in recs):
        raise ArtifactError(f"{info.path}: unit {unit} records no graph {work.rel(work.fp_onnx(unit))}; the file "
                            "was edited. Re-run qc-compile export.")
    for r in recs:
        p = (work.root / r["path"]).resolve()
        if work.root.resolve() not in p.parents:
            raise ArtifactError(f"{info.path}: unit {unit} records a file outside the work dir ({r['path']}); the "
                                "file was edited. Re-run qc-compile export.")
        if not p.is_file():
            raise ArtifactError(f"{p}: FP graph file of unit {unit} is missing. Re-run qc-compile export.")
        if sha256_file(p) != r["sha256"]:
            raise ArtifactError(f"{p}: FP graph file of unit {unit} does not hash to the sha256 that model.json "
                                "recorded at export; it was modified or truncated since. Re-run qc-compile export.")


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): identifies the exported weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_model_for(info: ModelInfo, *, device: str = "cpu", check_digest: bool = True):
    """The LoadedModel that ``model.json`` describes (same weights, verified by digest)."""
    from qc_compile.models import load_model

    w = info.data["weights"]
    if info.is_diffusers:
        return _load_diffusers_for(info, device=device, check_digest=check_digest)
    if w["source"] == "checkpoint":
        path = Path(w["path"])
        if not path.is_file():
            raise UserError(f"{info.path}: the checkpoint it was exported from, {path}, is gone; restore it or "
                            "re-export.")
        if sha256_file(path) != w["sha256"]:
            raise ArtifactError(f"{info.path}: checkpoint {path} changed since export (sha256 differs); re-export.")
        loaded = load_model(info.name, path, device=device)
    elif w["source"] == "shipped":
        loaded = load_model(info.name, device=device)
    else:
        loaded = load_model(info.name, device=device, random_weights=True, seed=int(w.get("seed", 0)))
    if check_digest and state_digest(loaded.model) != w["state_sha256"]:
        raise ArtifactError(f"{info.path}: the weights loaded now ({w['source']}) are not the ones exported "
                            "(state digest differs); re-run qc-compile export.")
    return loaded


def _load_diffusers_for(info: ModelInfo, *, device: str, check_digest: bool):
    """qc-ref-wan (shipped or a --checkpoint folder) or a ``wan2.1:PATH`` folder, its files checked against the
    sha256 recorded at export before anything is loaded, then the transformer's state digest."""
    from qc_compile.models import load_model

    w = info.data["weights"]
    folder = Path(w["path"])
    if not folder.is_dir():
        raise UserError(f"{info.path}: the model folder it was exported from, {folder}, is gone; restore it or "
                        "re-export.")
    for rel, sha in w["files"].items():
        f = folder / rel
        if not f.is_file() or sha256_file(f) != sha:
            raise ArtifactError(f"{info.path}: weight file {f} is missing or changed since export (sha256 differs); "
                                "re-export.")
    if info.name == "qc-ref-wan":
        loaded = load_model(info.name, None if w["source"] == "shipped" else folder, device=device)
    else:
        loaded = load_model(info.name, device=device)
    if check_digest and state_digest(loaded.transformer) != w["state_sha256"]:
        raise ArtifactError(f"{info.path}: the weights loaded now ({folder}) are not the ones exported (state "
                            "digest differs); re-run qc-compile export.")
    return loaded
