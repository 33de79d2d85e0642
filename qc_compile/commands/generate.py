"""`qc-compile generate`: plain FP sampling (no compilation) — the baseline every speedup is measured against."""

from __future__ import annotations

import time
from pathlib import Path

import click

import qc_compile.validate as V

from qc_compile.errors import UserError


@click.command("generate")
@click.option("-p", "--prompt", "prompts", multiple=True, required=True,
              help='Caption, e.g. "a red circle moving right on a black background". Repeat for several videos.')
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out.mp4"), show_default=True,
              help="Output .mp4; a PNG strip of the frames is written beside it. With several prompts, "
                   "a suffix _<k> is added.")
@click.option("--model", default="qc-ref", show_default=True, help="Model configuration name.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Weights (.safetensors). Default for qc-ref: the checkpoint shipped with qc-compile.")
@click.option("--steps", type=V.STEPS, default=None, help="Sampling steps (model default: 30).")
@click.option("--cfg", type=V.CFG, default=None, help="Classifier-free guidance scale (model default).")
@click.option("--seed", type=V.SEED, default=0, show_default=True, help="Noise seed (prompt k uses seed + k).")
@click.option("--frames", type=V.FRAMES, default=None, help="Frames (model default).")
@click.option("--height", type=V.SIZE, default=None, help="Height in pixels (model default).")
@click.option("--width", type=V.SIZE, default=None, help="Width in pixels (model default).")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N | auto")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate(prompts: tuple[str, ...], output: Path, model: str, checkpoint: Path | None, steps: int | None,
             cfg: float | None, seed: int, frames: int | None, height: int | None, width: int | None, device: str,
             overwrite: bool, quiet: bool) -> None:
    """Generate videos from text prompts with the FP model."""
    import torch

    from qc_compile.models import load_model
    from qc_compile.models.caption_encoder import CaptionTokenizer
    from qc_compile.runtime.generation import GenerationSettings, generate as run_generation, resolve_device
    from qc_compile.video_io import write_mp4, write_png_strip

    from qc_compile.outputs import check_output_file
    from qc_compile.prompts import check_prompts

    if output.suffix.lower() != ".mp4":
        raise UserError(f"--output {output}: expected a path ending in .mp4.")
    prompts = tuple(check_prompts(prompts, "--prompt"))
    outputs = [output] if len(prompts) == 1 else [output.with_name(f"{output.stem}_{k}{output.suffix}")
                                                   for k in range(len(prompts))]
    for path in outputs:  # every output checked before any work
        check_output_file(path, "--output", overwrite)
        check_output_file(path.with_suffix(".png"), "--output (its PNG strip)", overwrite)
    device = resolve_device(device)
    loaded = load_model(model, checkpoint, device=device)
    if loaded.text_encoder is not None:  # check every prompt before any work
        CaptionTokenizer().encode(list(prompts), max_length=loaded.config.model_max_length)
    settings = GenerationSettings.defaults(loaded, steps=steps, cfg=cfg, seed=seed, frames=frames, height=height,
                                           width=width)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    videos, _ = run_generation(loaded, list(prompts), settings, progress=not quiet)
    seconds = time.perf_counter() - start
    for k, video in enumerate(videos):
        path = outputs[k]
        write_mp4(path, video, fps=settings.fps)
        strip = write_png_strip(path.with_suffix(".png"), video)
        click.echo(f"wrote {path} and {strip}")
    click.echo(f"{len(videos)} video(s), {settings.steps} steps, cfg {settings.cfg}, seed {settings.seed}, "
               f"{settings.frames}x{settings.height}x{settings.width}, {device}: {seconds:.1f} s")
