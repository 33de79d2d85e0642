"""`qc-compile generate`: plain FP sampling (no compilation) — the baseline every speedup is measured against."""

from __future__ import annotations

import time
from pathlib import Path

import click

import qc_compile.validate as V
from qc_compile.commands.opensora_opts import opensora_options
from qc_compile.commands.parallel_opts import gpu_options, on_gpus
from qc_compile.errors import UserError


@click.command("generate")
@click.option("-p", "--prompt", "prompts", multiple=True, required=True,
              help='Caption, e.g. "a red circle moving right on a black background". Repeat for several videos.')
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out.mp4"), show_default=True,
              help="Output .mp4 (qc-ref: a PNG strip of the frames is written beside it). With several prompts, "
                   "a suffix _<k> is added.")
@click.option("--model", default="qc-ref", show_default=True,
              help="Model: qc-ref | opensora-v1.2 | qc-ref-wan (diffusers layout, its own WanPipeline-style sampler) | "
                   "wan2.1:PATH / wan2.2:PATH (a local diffusers WanPipeline folder).")
@click.option("--negative-prompt", default=None, help="--model wan2.1:PATH / wan2.2:PATH only: the negative prompt "
              "of classifier-free guidance (default: the empty string).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Weights (.safetensors; qc-ref-wan: another qc-ref-wan folder). Default for qc-ref and qc-ref-wan: "
                   "the weights shipped with qc-compile.")
@click.option("--steps", type=V.STEPS, default=None, help="Sampling steps (model default: 30).")
@click.option("--cfg", type=V.CFG, default=None, help="Classifier-free guidance scale (model default).")
@click.option("--seed", type=V.SEED, default=0, show_default=True, help="Noise seed (prompt k uses seed + k).")
@click.option("--frames", type=V.FRAMES, default=None, help="Frames (model default).")
@click.option("--height", type=V.SIZE, default=None, help="Height in pixels (model default).")
@click.option("--width", type=V.SIZE, default=None, help="Width in pixels (model default).")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N | auto")
@opensora_options
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="DiT and VAE precision; auto = bf16 for opensora-v1.2 on CUDA (as Open-Sora runs it), else fp32.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@gpu_options
def generate(prompts: tuple[str, ...], output: Path, model: str, negative_prompt: str | None,
             checkpoint: Path | None, steps: int | None,
             cfg: float | None, seed: int, frames: int | None, height: int | None, width: int | None, device: str,
             text_encoder: Path | None, vae: Path | None, caption_cache: Path | None, aes: float,
             flow: float | None, dtype: str, overwrite: bool, quiet: bool, gpus: int, parallel_mode: str) -> None:
    """Generate videos from text prompts with the FP model (--gpus N: one video split over N GPUs)."""
    from qc_compile.models.opensora_parts import check_part_paths
    from qc_compile.outputs import check_output_file
    from qc_compile.prompts import check_prompts

    if output.suffix.lower() != ".mp4":
        raise UserError(f"--output {output}: expected a path ending in .mp4.")
    prompts = tuple(check_prompts(prompts, "--prompt"))
    outputs = [output] if len(prompts) == 1 else [output.with_name(f"{output.stem}_{k}{output.suffix}")
                                                   for k in range(len(prompts))]
    for path in outputs:  # every output checked before any work (and before any process is spawned)
        check_output_file(path, "--output", overwrite)
        if vae is None:  # with a VAE the full-size frames get no PNG strip
            check_output_file(path.with_suffix(".png"), "--output (its PNG strip)", overwrite)
    from qc_compile.commands import run_diffusers

    if run_diffusers.takes_model(model):  # qc-ref-wan / wan2.1:PATH: its own sampler, one process
        run_diffusers.check_flags(model, checkpoint, {
            "--negative-prompt": negative_prompt is not None and not run_diffusers.is_pipeline(model),
            f"--gpus {gpus}": gpus > 1, f"--parallel {parallel_mode}": parallel_mode != "auto",
            "--text-encoder": text_encoder is not None, "--vae": vae is not None,
            "--caption-cache": caption_cache is not None, f"--aes {aes}": aes != run_diffusers.AES_DEFAULT,
            f"--flow {flow}": flow is not None, "size": dict(frames=frames, height=height, width=width)})
        run_diffusers.generate_command(model=model, checkpoint=checkpoint, prompts=prompts, outputs=outputs,
                                       device=device, dtype=dtype, seed=seed, steps=steps, cfg=cfg, quiet=quiet,
                                       size=dict(frames=frames, height=height, width=width),
                                       negative_prompt=negative_prompt or "")
        return
    if negative_prompt is not None:
        raise UserError("--negative-prompt applies to --model wan2.1:PATH / wan2.2:PATH (a WanPipeline folder) only.")
    check_part_paths(text_encoder=text_encoder, vae=vae, caption_cache=caption_cache)
    on_gpus(_generate, dict(prompts=prompts, outputs=outputs, model=model, checkpoint=checkpoint, steps=steps,
                            cfg=cfg, seed=seed, frames=frames, height=height, width=width, device=device,
                            text_encoder=text_encoder, vae=vae, caption_cache=caption_cache, aes=aes, flow=flow,
                            dtype=dtype, quiet=quiet),
            gpus, parallel_mode, device)


def _generate(prompts, outputs, model, checkpoint, steps, cfg, seed, frames, height, width, device, text_encoder, vae,
              caption_cache, aes, flow, dtype, quiet) -> None:
    """The generation on this process (every rank of a --gpus run; rank 0 writes the videos)."""
    import torch

    from qc_compile.models import get_config, load_model
    from qc_compile.models.caption_encoder import CaptionTokenizer
    from qc_compile.models.opensora_parts import attach_opensora_parts
    from qc_compile.runtime.generation import GenerationSettings, generate as run_generation, resolve_device
    from qc_compile.runtime.parallel import current_mesh, is_rank0
    from qc_compile.video_io import write_mp4, write_png_strip

    device = resolve_device(device)
    latent = get_config(model).space == "latent"
    torch_dtype = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and latent and device != "cpu") \
        else torch.float32
    loaded = load_model(model, checkpoint, device=device, dtype=torch_dtype)
    decoder = attach_opensora_parts(loaded, text_encoder=text_encoder, vae=vae, caption_cache=caption_cache,
                                    aes=aes, flow=flow, dtype=torch_dtype)
    if loaded.text_encoder is not None:  # check every prompt before any work
        CaptionTokenizer().encode(list(prompts), max_length=loaded.config.model_max_length)
    settings = GenerationSettings.defaults(loaded, steps=steps, cfg=cfg, seed=seed, frames=frames, height=height,
                                           width=width)
    if decoder is not None:
        decoder.check_geometry(loaded.config, settings.frames, settings.height, settings.width)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    videos, _ = run_generation(loaded, list(prompts), settings, progress=not quiet and is_rank0())
    if not is_rank0():
        return
    if decoder is not None:  # latents -> frames in [-1, 1] (Open-Sora 1.2's VAE)
        videos = decoder.decode(videos, num_frames=settings.frames, out_device="cpu")
        V.check_finite(videos, "the VAE's decoded frames (--vae)")
        videos = videos.clamp(-1, 1)
    seconds = time.perf_counter() - start
    mesh = current_mesh()
    if mesh is not None:
        device = f"{mesh.world_size} x {device} ({mesh.describe()['backend']})"
    for k, video in enumerate(videos):
        path = outputs[k]
        if decoder is not None:  # full-size frames: no upscale (x2 only if a side is odd), no PNG strip
            write_mp4(path, video, fps=settings.fps, upscale=2 if (video.shape[-1] | video.shape[-2]) % 2 else 1)
            click.echo(f"wrote {path}")
            continue
        write_mp4(path, video, fps=settings.fps)
        strip = write_png_strip(path.with_suffix(".png"), video)
        click.echo(f"wrote {path} and {strip}")
    click.echo(f"{len(videos)} video(s), {settings.steps} steps, cfg {settings.cfg}, seed {settings.seed}, "
               f"{settings.frames}x{settings.height}x{settings.width}, {device}: {seconds:.1f} s")
