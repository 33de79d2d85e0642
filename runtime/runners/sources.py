"""Which file runs each unit and variant of a work dir, after the integrity checks (model.json, manifest sha256),
through the typed manifest (:mod:`qc_compile.manifest`) — never through the compiler."""

from __future__ import annotations

from dataclasses import dataclass

from qc_compile.manifest import Manifest, VariantSource, fp_sources


@dataclass(frozen=True)
class Sources:
    io: dict[str, dict]  # unit -> {"inputs": [...], "outputs": [...]} (model.json records)
    unit_names: tuple[str, ...]
    files: dict[str, dict[str, VariantSource]]  # unit -> variant -> verified source (same_as resolved)
    target: str | None  # the manifest target they come from (None: the exported FP graphs)
    plugins: bool = False  # built with --plugins: qc:: plugin layers (their creators must be registered first)


def unit_io(info) -> dict[str, dict]:
    """``{unit: {"inputs": [...], "outputs": [...]}}`` records from model.json."""
    return {u["name"]: {"inputs": u["inputs"], "outputs": u["outputs"]} for u in info.units}


def variant_sources(work, *, stage: str, target: str | None, need: str) -> Sources:
    """The FP graphs (``stage="fp"``) or a build's Q/DQ graphs (``need="onnx"``) / engines (``need="engine"``) for
    ``target`` (default: the first target that has them)."""
    from qc_compile.workdir import WorkDir, read_model_info

    work = work if isinstance(work, WorkDir) else WorkDir(work)
    info = read_model_info(work)
    io, names = unit_io(info), tuple(info.unit_names)
    if stage == "fp":
        return Sources(io, names, fp_sources(work, info), None)
    t = Manifest.load(work, target, info=info).target(target, "engines" if need == "engine" else "graphs")
    return Sources(io, names, t.sources(), t.name, t.plugins)
