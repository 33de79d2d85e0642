"""`qc-compile export`: one ONNX graph per unit plus model.json, each unit checked against torch."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import click

import qc_compile.validate as V

from qc_compile.errors import UserError


# What an export owns in a work dir (and --force replaces); anything else there (runs/, the user's files) is kept.
OWNED = ("onnx", "engines", "torch", "calib", "report", "plan.json", "plan.safetensors", "manifest.json",
         "model.json", ".build-in-progress.json", ".build-backup")


def _check_workdir(work, force: bool) -> None:
    """Refuse to mix models in one work dir (before anything is loaded or written)."""
    from qc_compile.artifacts import read_json

    if work.root.exists() and not work.root.is_dir():
        raise UserError(f"--output {work.root} exists and is not a directory.")
    if not work.model_json.is_file():
        return
    try:
        old = read_json(work.model_json, kind="model.json").get("model", {}).get("name")
    except UserError:
        old = "<unreadable>"
    if not force:
        raise UserError(f"{work.root} already holds an export of {old!r} (model.json). Re-exporting would leave its "
                        "plan, graphs and engines out of step; choose an empty work dir or pass --force, which "
                        "replaces onnx/, engines/, torch/, calib/, report/, plan.json and manifest.json there once "
                        "the new export has succeeded.")


def _swap_in(staged: Path, root: Path) -> None:
    """Move the staged export into ``root``: the old export's files are moved aside first, then removed."""
    if not root.exists():
        os.replace(staged, root)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    for name in OWNED:
        if (root / name).exists() or (root / name).is_symlink():
            os.replace(root / name, trash / name)
    for entry in staged.iterdir():
        os.replace(entry, root / entry.name)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)


def _check_diffusers_options(model_name: str, checkpoint: Path | None, random_weights: bool,
                             text_length: int | None) -> None:
    """Diffusers models read their weights from a folder: refuse what does not apply before any load."""
    if random_weights:
        raise UserError(f"--random-weights: {model_name} loads its weights from its folder; drop it.")
    if checkpoint is not None and model_name != "qc-ref-wan":
        raise UserError(f"--checkpoint: {model_name} reads its weights from the folder after the colon; drop it.")


@click.command("export")
@click.argument("model_name", metavar="MODEL")
@click.option("-o", "--output", "work_dir", type=click.Path(path_type=Path), required=True,
              help="Work dir to create (or re-use with --force).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Weights (.safetensors). Default: qc-ref's shipped checkpoint; random weights for others.")
@click.option("--random-weights", is_flag=True, help="Use random weights (seeded) even where a checkpoint exists.")
@click.option("--seed", type=V.SEED, default=0, show_default=True, help="Seed for random weights.")
@click.option("--frames", type=V.FRAMES, default=None, help="Video frames (model default).")
@click.option("--height", type=V.SIZE, default=None, help="Video height in pixels (model default).")
@click.option("--width", type=V.SIZE, default=None, help="Video width in pixels (model default).")
@click.option("--opset", type=V.BoundedInt(17, 21), default=19, show_default=True,
              help="ONNX opset of the FP graphs (17-21).")
@click.option("--text-length", type=V.BoundedInt(1, 4096), default=None,
              help="wan2.1:/wan2.2:PATH: text tokens the graphs take (default 512, WanPipeline's max_sequence_length; "
                   "qc-ref-wan: its caption encoder's 12).")
@click.option("--force", is_flag=True, help="Replace an existing export in the work dir.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(model_name: str, work_dir: Path, checkpoint: Path | None, random_weights: bool, seed: int,
           frames: int | None, height: int | None, width: int | None, opset: int, text_length: int | None,
           force: bool, quiet: bool) -> None:
    """Export MODEL (qc-ref | opensora-v1.2 | qc-ref-wan | wan2.1:PATH | wan2.2:PATH) to one ONNX graph per unit in
    WORK."""
    import time

    import torch

    from qc_compile.export import export_model, weights_record
    from qc_compile.locks import workdir_lock
    from qc_compile.models import get_config, load_model
    from qc_compile.models.config import is_diffusers_spec
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.workdir import WorkDir

    diffusers = is_diffusers_spec(model_name)
    if diffusers:
        _check_diffusers_options(model_name, checkpoint, random_weights, text_length)
    else:
        cfg = get_config(model_name)
        if text_length is not None:
            raise UserError(f"--text-length is for diffusers models (wan2.1:PATH); {model_name} fixes its caption "
                            "length in its config.")
    if checkpoint is not None and random_weights:
        raise UserError("--checkpoint and --random-weights exclude each other.")
    if not diffusers and checkpoint is None and model_name != "qc-ref":
        random_weights = True  # no shipped weights for the full-size models
    work = WorkDir(work_dir)
    _check_workdir(work, force)
    if not diffusers:
        frames, height, width = frames or cfg.default_frames, height or cfg.default_height, width or cfg.default_width
        Geometry.for_model(cfg, frames, height, width)  # sizes checked before any work
    start = time.perf_counter()
    loaded = load_model(model_name, checkpoint, device="cpu", dtype=torch.float32, random_weights=random_weights,
                        seed=seed)
    if diffusers:
        from qc_compile.export_diffusers import geometry_for, weights_record as diffusers_weights

        (frames, height, width), _ = geometry_for(loaded, frames, height, width)  # sizes checked before any work
        weights = diffusers_weights(loaded, checkpoint)
    else:
        weights = weights_record(loaded, checkpoint, random_weights, seed)
    # The export is written into a fresh directory beside WORK and swapped in only when complete: a failure (or
    # Ctrl-C) leaves WORK exactly as it was.
    work.root.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{work.root.name}.export-", dir=work.root.parent))
    os.chmod(staged, 0o755)  # mkdtemp makes 0700; a new work dir gets the usual permissions
    try:
        if diffusers:
            from qc_compile.export_diffusers import export_diffusers_model

            result = export_diffusers_model(loaded, WorkDir(staged), frames=frames, height=height, width=width,
                                            text_length=text_length, opset=opset, weights=weights,
                                            progress=not quiet)
        else:
            result = export_model(loaded, WorkDir(staged), frames=frames, height=height, width=width, opset=opset,
                                  weights=weights, progress=not quiet)
        if work.root.is_dir():
            with workdir_lock(work.root, "export --force"):
                _check_workdir(work, force)  # still true now that we hold the lock
                _swap_in(staged, work.root)
        else:
            _swap_in(staged, work.root)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    worst = max(u["verify_rel_err"] for u in result.units)
    size = sum(f["bytes"] for u in result.units for f in u["onnx"])
    click.echo(f"exported {len(result.units)} units of {model_name} ({frames}x{height}x{width}, opset {opset}) to "
               f"{work.root}/onnx/fp: {size / 1e6:.1f} MB; onnxruntime vs torch max relative error {worst:.2e}; "
               f"{time.perf_counter() - start:.1f} s")
