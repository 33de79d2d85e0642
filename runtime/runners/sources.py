"""Which file runs each unit and variant of a work dir, after the integrity checks (model.json, manifest sha256)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qc_compile.errors import UserError


@dataclass(frozen=True)
class Sources:
    io: dict[str, dict]  # unit -> {"inputs": [...], "outputs": [...]} (model.json records)
    unit_names: tuple[str, ...]
    files: dict[str, dict[str, Path]]  # unit -> variant -> graph or engine file (sha256 verified)
    target: str | None  # the manifest target they come from (None: the exported FP graphs)


def unit_io(info) -> dict[str, dict]:
    """``{unit: {"inputs": [...], "outputs": [...]}}`` records from model.json."""
    return {u["name"]: {"inputs": u["inputs"], "outputs": u["outputs"]} for u in info.units}


def variant_sources(work, *, stage: str, target: str | None, need: str) -> Sources:
    """The files of the FP graphs (``stage="fp"``) or of a build's ONNX graphs
    (``need="onnx"``) / engines (``need="engine"``) for ``target`` (default: the first target that has them)."""
    from qc_compile.build import verify_manifest
    from qc_compile.workdir import WorkDir, read_model_info

    work = work if isinstance(work, WorkDir) else WorkDir(work)
    info = read_model_info(work)
    from qc_compile.workdir import check_no_interrupted_build

    check_no_interrupted_build(work)
    io, names = unit_io(info), tuple(info.unit_names)
    if stage == "fp":
        from qc_compile.export import check_fp_graph
        from qc_compile.workdir import verify_unit_files

        for u in names:
            check_fp_graph(work.fp_onnx(u), info.name, info.config_sha256, u)
            verify_unit_files(work, info, u)  # the bytes model.json recorded at export
        return Sources(io, names, {u: {"default": work.fp_onnx(u)} for u in names}, None)
    manifest = verify_manifest(work, target, info=info)
    targets = manifest["targets"]
    if need == "engine":
        name = target or next((t for t, r in targets.items() if r.get("engines")), None)
        if name is None or name not in targets or not targets[name].get("engines"):
            built = ", ".join(targets) or "none"
            raise UserError(f"{work.root}: no TensorRT engines to run (targets built: {built}; a target built with "
                            "--onnx-only or --target torch has none). Run `qc-compile build WORK --target trt` on "
                            "the deploy machine.")
    else:
        name = target or next((t for t, r in targets.items() if r["backend"] != "torch"), None)
        if name is None or "package" in targets[name]["units"]:
            raise UserError("no Q/DQ graphs in this work dir's manifest; run qc-compile build first")
    sources: dict[str, dict[str, Path]] = {}
    for u, rec in targets[name]["units"].items():
        sources[u] = {}
        for v, vrec in rec["variants"].items():
            src = rec["variants"][vrec["same_as"]] if "same_as" in vrec else vrec
            if need == "engine":
                if not src.get("engine"):
                    raise UserError(f"{work.root}: unit {u} variant {v} of {name} has no engine; re-run build.")
                sources[u][v] = work.root / src["engine"]["path"]
            else:
                sources[u][v] = work.root / src["onnx"][0]["path"]
    return Sources(io, names, sources, name)
