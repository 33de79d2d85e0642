"""`qc-compile sweep`: several policies (published defaults, optional threshold grids) over prompts and seeds, one
table and one quality-vs-compute plot."""

from __future__ import annotations

import time
from pathlib import Path

import click

import qc_compile.validate as V
from qc_compile.commands.opensora_opts import opensora_options
from qc_compile.commands.parallel_opts import gpu_options, on_gpus
from qc_compile.errors import UserError

EVAL_CAPTION_SEED = 20261122  # the held-out captions (tools/eval_reference.py); tune on another seed


def _git_commit() -> str | None:
    """QC_COMMIT (set it where the tree is a copy without the right .git, e.g. the GPU machine), else git HEAD."""
    import os
    import subprocess

    if os.environ.get("QC_COMMIT"):
        return os.environ["QC_COMMIT"]

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r}: expected comma-separated integers, e.g. 0,1.") from None
    if not vals:
        raise UserError(f"{what}: give at least one value.")
    from qc_compile.validate import check_seed

    return [check_seed(v, what) for v in vals]


@click.command("sweep")
@click.argument("work", required=False, type=click.Path(path_type=Path))
@click.option("--policies", required=True, help="Comma-separated policy specs, e.g. none,quantcache,teacache,fora.")
@click.option("--prompts", "n_prompts", type=V.BoundedInt(1, V.PROMPTS_MAX), default=8, show_default=True,
              help="Number of shapes captions drawn with --caption-seed.")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None,
              help="Use these prompts (one per line) instead of drawn captions.")
@click.option("--caption-seed", type=V.SEED, default=EVAL_CAPTION_SEED, show_default=True,
              help="Seed of the caption draw (the default is the held-out evaluation set; tune on another).")
@click.option("--seeds", default="0", show_default=True, help="Noise seeds, comma-separated (prompt k: seed + k).")
@click.option("--grid", multiple=True, metavar="POLICY.PARAM=V1,V2",
              help="Threshold grid for one policy, e.g. --grid teacache.rel_l1_thresh=0.1,0.2 (repeatable; several "
                   "keys of one policy form a product).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override applied to every config of the "
              "policies that have it (policy.param=value).")
@click.option("--steps", type=V.STEPS, default=None, help="Sampling steps (model default).")
@click.option("--frames", type=V.FRAMES, default=None, help="Frames (model default).")
@click.option("--height", type=V.SIZE, default=None, help="Height in pixels (model default).")
@click.option("--width", type=V.SIZE, default=None, help="Width in pixels (model default).")
@click.option("--batch", is_flag=True, help="Run all prompts of a seed as one batch (faster on CPU; the adaptive "
              "policies then decide once for the batch).")
@click.option("--jobs", type=V.BoundedInt(1, 256), default=1, show_default=True,
              help="Worker processes (one thread each); each runs the FP reference and all configs of its prompts.")
@click.option("--model", default=None, help="Without WORK: model for the torch executor: qc-ref (default) | "
              "opensora-v1.2 | qc-ref-wan (diffusers layout, through qc_compile.enable and its own sampler).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Without WORK: weights file "
              "(qc-ref-wan: another qc-ref-wan folder).")
@click.option("--random-weights", is_flag=True, help="Without WORK: random weights (tests, speed work).")
@click.option("--device", default="cpu", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty output directory (written whole, "
              "then swapped in).")
@opensora_options
@gpu_options
def sweep(work, policies, n_prompts, prompt_file, caption_seed, seeds, grid, sets, steps, frames, height, width,
          batch, jobs, model, checkpoint, random_weights, device, output, overwrite, text_encoder, vae, caption_cache,
          aes, flow, gpus, parallel_mode) -> None:
    """Compare step policies on the same model, prompts and seeds.

    Writes OUTPUT/sweep.{json,md} (compute fraction, block-FLOP fraction, PSNR/SSIM vs FP, caption-checker accuracy
    per config), OUTPUT/pareto.png, and OUTPUT/runs/<config>/{trace.json,metrics.json,decisions.png} for the first
    prompt and seed of each config. --model qc-ref-wan (diffusers layout) runs its own sampler with the transformer
    under qc_compile.enable (torch executor, one process, the model's own size); flags that do not apply to it are
    refused.
    """
    from qc_compile.commands.run import parse_sets
    from qc_compile.prompts import read_prompt_file
    from qc_compile.runtime.sweep import expand_configs, parse_grid

    from qc_compile.outputs import check_output_dir, fresh_dir

    specs = [s.strip() for s in policies.split(",") if s.strip()]
    if not specs:
        raise UserError("--policies: give at least one policy.")
    seed_list = _ints(seeds, "--seeds")
    configs = expand_configs(specs, parse_grid(grid), parse_sets(sets))
    from qc_compile.runtime.policies import get_policy

    plan = None  # the work dir's plan: policies that read it (schedule, aigq) are checked with it
    if work is not None:
        from qc_compile.plan import load_plan
        from qc_compile.workdir import WorkDir

        if WorkDir(work).plan_json.is_file():
            plan = load_plan(WorkDir(work).plan_json)
    for c in configs:  # every config's parameters are checked before any generation
        get_policy(c.policy, c.overrides, plan)
    if prompt_file is not None:
        prompts = read_prompt_file(prompt_file, "--prompt-file")
    else:
        if n_prompts < 1:
            raise UserError(f"--prompts must be at least 1, got {n_prompts}.")
        from qc_compile.data.shapes import sample_captions

        prompts = [c.text() for c in sample_captions(n_prompts, seed=caption_seed)]
    from qc_compile.commands import run_diffusers

    info = run_diffusers.work_info(work)
    # a diffusers work dir (every config under its plan) or qc-ref-wan / a WanPipeline folder: the model's own
    # sampler under qc_compile.enable, one process
    if info is not None or run_diffusers.takes_model(model, work):
        size = dict(frames=frames, height=height, width=width)
        inapplicable = {
            f"--jobs {jobs}": jobs > 1, f"--gpus {gpus}": gpus > 1,
            f"--parallel {parallel_mode}": parallel_mode != "auto", "--random-weights": random_weights,
            "--text-encoder": text_encoder is not None, "--vae": vae is not None,
            "--caption-cache": caption_cache is not None, f"--aes {aes}": aes != run_diffusers.AES_DEFAULT,
            f"--flow {flow}": flow is not None, "size": size}
        if info is not None:
            if checkpoint is not None:
                raise UserError("--checkpoint applies without WORK only; a work dir names its own weights.")
            run_diffusers.check_work_flags(work, info, model, inapplicable)
            source = dict(model=None, checkpoint=None, work=work, info=info)
        else:
            run_diffusers.check_flags(model, checkpoint, inapplicable)
            source = dict(model=model, checkpoint=checkpoint, size=size)
        check_output_dir(output, "--output", overwrite)
        commit = _git_commit()
        with fresh_dir(output) as tmp:
            result = run_diffusers.sweep_command(device=device, configs=configs, prompts=prompts, seeds=seed_list,
                                                 steps=steps, batch=batch, out_dir=tmp, log=click.echo, **source)
            _write_outputs(tmp, result, caption_seed=None if prompt_file else caption_seed, commit=commit)
        click.echo(f"wrote {output}/sweep.json, sweep.md, pareto.png")
        return
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}.")
    if jobs > 1 and gpus > 1:
        raise UserError(f"--jobs {jobs} with --gpus {gpus}: a --gpus run splits each video over its processes; "
                        "give one of the two.")
    parts = dict(text_encoder=text_encoder, vae=vae, caption_cache=caption_cache, aes=aes, flow=flow)
    if jobs > 1 and any(parts[k] is not None for k in ("text_encoder", "vae", "caption_cache")):
        raise UserError(f"--jobs {jobs} with --text-encoder/--vae: each worker would load its own T5 and VAE; run "
                        "opensora-v1.2 sweeps with --jobs 1 (on a GPU) or split the prompts over commands.")
    from qc_compile.models.opensora_parts import check_part_paths

    check_part_paths(text_encoder=text_encoder, vae=vae, caption_cache=caption_cache)
    check_output_dir(output, "--output", overwrite)  # before any work: a sweep must not fail at its end
    on_gpus(_sweep, dict(work=work, configs=configs, prompts=prompts, seed_list=seed_list, steps=steps, batch=batch,
                         output=output, frames=frames, height=height, width=width, jobs=jobs, model=model,
                         checkpoint=checkpoint, random_weights=random_weights, device=device,
                         caption_seed=None if prompt_file else caption_seed, parts=parts), gpus, parallel_mode, device)


def _sweep(work, configs, prompts, seed_list, steps, batch, output, frames, height, width, jobs, model, checkpoint,
           random_weights, device, caption_seed, parts) -> None:
    """The sweep on this process (every rank of a --gpus run; rank 0 writes the outputs)."""
    import contextlib

    from qc_compile.outputs import fresh_dir
    from qc_compile.runtime.parallel import current_mesh, is_rank0
    from qc_compile.runtime.pipeline import Pipeline
    from qc_compile.runtime.sweep import run_sweep

    pipe_kwargs = dict(work_dir=work, model=model, checkpoint=checkpoint, device=device, random_weights=random_weights)
    pipe = Pipeline(**pipe_kwargs)  # also checks the model / work dir before any worker starts
    pipe.attach_opensora_parts(**parts)  # opensora-v1.2: T5 + VAE, fidelity on decoded frames
    commit = _git_commit()  # the code that runs: HEAD may move while a long sweep runs
    rank0 = is_rank0()
    # rank 0 writes into a fresh dir swapped in whole at the end: the output holds this sweep, complete, or is left
    # as it was
    with fresh_dir(output) if rank0 else contextlib.nullcontext(None) as tmp:
        result = run_sweep(pipe, configs, prompts, seed_list, steps=steps, batch=batch, out_dir=tmp,
                           size={"frames": frames, "height": height, "width": width}, jobs=jobs,
                           pipe_kwargs=pipe_kwargs, log=click.echo if rank0 else (lambda *a, **k: None))
        if not rank0:
            return
        mesh = current_mesh()
        if mesh is not None:
            result["parallel"] = mesh.describe()
        result["model"] = pipe.loaded.config.name
        result["checkpoint"] = pipe.loaded.checkpoint
        result["device"] = pipe.device
        result["steps"] = steps or pipe.loaded.config.default_steps
        _write_outputs(tmp, result, caption_seed=caption_seed, commit=commit)
    click.echo(f"wrote {output}/sweep.json, sweep.md, pareto.png")


def _write_outputs(tmp: Path, result: dict, *, caption_seed: int | None, commit: str | None) -> None:
    """sweep.json, sweep.md and pareto.png of a finished sweep (``result`` names its model, checkpoint, device and
    steps), for the STDiT3 pipeline and qc-ref-wan alike."""
    from qc_compile.artifacts import atomic_write, write_json_atomic
    from qc_compile.runtime.sweep import plot_pareto, to_markdown

    result["caption_seed"] = caption_seed
    if result["device"].startswith("cuda"):
        import torch

        result["device_name"] = torch.cuda.get_device_name()
    result["date"] = time.strftime("%Y-%m-%d")
    result["commit"] = commit
    write_json_atomic(tmp / "sweep.json", result)
    md = to_markdown(result, title=f"Policy sweep on {result['model']} ({result['device']})")
    with atomic_write(tmp / "sweep.md", "w") as f:
        f.write(md)
    plot_pareto(result, tmp / "pareto.png", title=f"{result['model']}: quality vs compute")
