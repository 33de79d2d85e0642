"""`qc-compile run`: generate under a step policy and write the video, the decision trace, metrics and the picture."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

import qc_compile.validate as V
from qc_compile.commands.opensora_opts import opensora_options
from qc_compile.commands.parallel_opts import gpu_options, on_gpus
from qc_compile.errors import UserError


def parse_sets(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``--set key=value`` items -> dict (values stay strings; the policies convert and range-check them)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set teacache.rel_l1_thresh=0.2.")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise UserError(f"--set {item!r}: empty key.")
        out[k] = v.strip()
    return out


def new_run_dir(root: Path, policy: str, seed: int) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", policy.lower()).strip("-") or "policy"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}-s{seed}"
    d, k = root / base, 1
    while d.exists():
        k += 1
        d = root / f"{base}-{k}"
    return d


def _policy_help() -> str:
    from qc_compile.runtime.policies import policy_names

    return ", ".join(policy_names())


@click.command("run")
@click.argument("work", required=False, type=click.Path(path_type=Path))
@click.option("-p", "--prompt", "prompts", multiple=True, help="Caption; repeat for a batch.")
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), default=None,
              help="File with one prompt per line (batch mode: one run, one video per prompt).")
@click.option("--policy", default=None,
              help="Step policy: quantcache, hlc+srap, tdc, 6bit, teacache, fora, fbcache, dbcache, pab, none, ... "
                   "or any single policy and '+' combinations (default: the plan's policy, else none).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a policy parameter, e.g. --set hlc.delta1=0.03 (repeatable).")
@click.option("--reference", is_flag=True, help="Also run the FP model (same seed) for PSNR/SSIM and the checker drop.")
@click.option("--model", default=None, help="Without WORK: the model to run on the torch executor: qc-ref (default) | "
              "opensora-v1.2 | qc-ref-wan (diffusers layout, through qc_compile.enable and its own sampler) | "
              "wan2.1:PATH / wan2.2:PATH (a local diffusers WanPipeline folder, its own pipeline under "
              "qc_compile.enable).")
@click.option("--negative-prompt", default=None, help="--model wan2.1:PATH / wan2.2:PATH only: the negative prompt "
              "of classifier-free guidance (default: the empty string).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Without WORK: weights file "
              "(qc-ref-wan: another qc-ref-wan folder).")
@click.option("--random-weights", is_flag=True, help="Without WORK: random weights (tests, speed work).")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N | auto")
@click.option("--seed", type=V.SEED, default=0, show_default=True, help="Noise seed (prompt k uses seed + k); SRAP's "
              "random draws use it too.")
@click.option("--steps", type=V.STEPS, default=None, help="Sampling steps (model default: 30).")
@click.option("--cfg", type=V.CFG, default=None, help="CFG scale (model default).")
@click.option("--frames", type=V.FRAMES, default=None, help="Frames (model default; a work dir fixes its own).")
@click.option("--height", type=V.SIZE, default=None, help="Height in pixels (model default).")
@click.option("--width", type=V.SIZE, default=None, help="Width in pixels (model default).")
@click.option("--executor", default="torch", show_default=True, help="torch | onnxruntime | tensorrt")
@click.option("--fast", is_flag=True, help="Torch executor's fast path: bf16, the plan's FP8 linears on the qc:: "
              "CUDA kernels, SDPA (needs a CUDA GPU; the --reference run stays the plain FP model).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: WORK/runs/<id>, or ./runs/<id> without WORK).")
@click.option("--overwrite", is_flag=True, help="Replace an existing, non-empty -o directory (written whole, then "
              "swapped in).")
@opensora_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@gpu_options
def run(work: Path | None, prompts: tuple[str, ...], prompt_file: Path | None, policy: str | None,
        sets: tuple[str, ...], reference: bool, model: str | None, negative_prompt: str | None,
        checkpoint: Path | None, random_weights: bool,
        device: str, seed: int,
        steps: int | None, cfg: float | None, frames: int | None, height: int | None, width: int | None,
        executor: str, fast: bool, output: Path | None, overwrite: bool, text_encoder: Path | None, vae: Path | None,
        caption_cache: Path | None, aes: float, flow: float | None, quiet: bool, gpus: int,
        parallel_mode: str) -> None:
    """Generate videos under a caching / pruning / precision policy.

    Writes RUN/video.mp4 (+ video.png frame strip; video_<k>.* for several prompts), RUN/trace.json (every decision
    per unit and step, statistics, timings), RUN/metrics.json (compute fraction; with --reference PSNR/SSIM against
    the FP video and the caption-checker drop) and RUN/decisions.png (units x steps).

    Without WORK it runs the FP model (--model, default qc-ref) on the torch executor. opensora-v1.2 (a work dir of
    it, or --model opensora-v1.2 --checkpoint DIT) takes --text-encoder and --vae: prompts go through T5 and the
    videos (and the FP reference) are decoded by the VAE before they are written and compared. With --gpus N one video is
    split over N GPUs (CFG and/or sequence parallel); the trace records whether every rank took the same decisions.
    --model qc-ref-wan (diffusers layout) runs its own sampler with the transformer under qc_compile.enable (torch
    executor, one process, the model's own size); --model wan2.1:PATH runs a local WanPipeline folder the same way
    (its text encoder, scheduler and VAE; sizes and steps from the flags, else the pipeline's defaults); flags that
    do not apply to them are refused.
    """
    from qc_compile.outputs import check_output_dir
    from qc_compile.prompts import check_prompts, read_prompt_file

    if not prompts and prompt_file is None:
        raise UserError("give a prompt with --prompt TEXT or a file with --prompts FILE.")
    all_prompts = check_prompts(prompts, "--prompt") if prompts else []
    all_prompts += read_prompt_file(prompt_file) if prompt_file else []
    if output is not None:  # checked before any work: a long run must not fail at the end on its output
        check_output_dir(output, "--output", overwrite)
    if work is not None and checkpoint is not None:
        raise UserError("--checkpoint applies without WORK only; a work dir names its own weights.")
    from qc_compile.commands import run_diffusers

    info = run_diffusers.work_info(work)
    if info is not None:  # a diffusers work dir: its model's own sampler under qc_compile.enable, with its plan
        run_diffusers.check_work_flags(work, info, model, {
            "--negative-prompt": negative_prompt is not None, "--fast": fast, f"--gpus {gpus}": gpus > 1,
            f"--parallel {parallel_mode}": parallel_mode != "auto", "--random-weights": random_weights,
            "--text-encoder": text_encoder is not None, "--vae": vae is not None,
            "--caption-cache": caption_cache is not None, f"--aes {aes}": aes != run_diffusers.AES_DEFAULT,
            f"--flow {flow}": flow is not None, "size": dict(frames=frames, height=height, width=width)})
        overrides = parse_sets(sets)
        if policy is not None:  # the policy and its parameters (with the plan's) checked before loading the model
            run_diffusers.check_work_policy(work, info, policy, overrides, seed)
        res = run_diffusers.run_work_command(work=work, info=info, prompts=all_prompts, policy=policy,
                                             overrides=overrides, reference=reference, device=device, seed=seed,
                                             steps=steps, cfg=cfg, quiet=quiet, executor=executor,
                                             negative_prompt=negative_prompt or "")
        _save_and_report(res, output or new_run_dir(work / "runs", res.policy, seed))
        return
    if run_diffusers.takes_model(model, work):  # qc-ref-wan / wan2.1:PATH: its own sampler under qc_compile.enable
        run_diffusers.check_flags(model, checkpoint, {
            "--negative-prompt": negative_prompt is not None and not run_diffusers.is_pipeline(model),
            f"--executor {executor}": executor != "torch", "--fast": fast, f"--gpus {gpus}": gpus > 1,
            f"--parallel {parallel_mode}": parallel_mode != "auto", "--random-weights": random_weights,
            "--text-encoder": text_encoder is not None, "--vae": vae is not None,
            "--caption-cache": caption_cache is not None, f"--aes {aes}": aes != run_diffusers.AES_DEFAULT,
            f"--flow {flow}": flow is not None, "size": dict(frames=frames, height=height, width=width)})
        overrides = parse_sets(sets)
        if policy is not None:  # the policy and its parameters checked before loading the model
            from qc_compile.runtime.policies import get_policy

            get_policy(policy, overrides, None, seed=seed)
        res = run_diffusers.run_command(model=model, checkpoint=checkpoint, prompts=all_prompts, policy=policy,
                                        overrides=overrides, reference=reference, device=device, seed=seed,
                                        steps=steps, cfg=cfg, quiet=quiet,
                                        size=dict(frames=frames, height=height, width=width),
                                        negative_prompt=negative_prompt or "")
        _save_and_report(res, output or new_run_dir(Path("runs"), res.policy, seed))
        return
    if negative_prompt is not None:
        raise UserError("--negative-prompt applies to --model wan2.1:PATH / wan2.2:PATH (a WanPipeline folder) only.")
    from qc_compile.models.opensora_parts import check_part_paths

    check_part_paths(text_encoder=text_encoder, vae=vae, caption_cache=caption_cache)  # before any load
    overrides = parse_sets(sets)
    if policy is not None and work is None:  # check the policy and its parameters before loading the model
        from qc_compile.runtime.policies import get_policy

        get_policy(policy, overrides, None, seed=seed)
    on_gpus(_run, dict(work=work, all_prompts=all_prompts, policy=policy, overrides=overrides, reference=reference,
                       model=model, checkpoint=checkpoint, random_weights=random_weights, device=device, seed=seed,
                       steps=steps, cfg=cfg, frames=frames, height=height, width=width, executor=executor, fast=fast,
                       output=output, parts=dict(text_encoder=text_encoder, vae=vae, caption_cache=caption_cache,
                                                 aes=aes, flow=flow), quiet=quiet), gpus, parallel_mode, device)


def _run(work, all_prompts, policy, overrides, reference, model, checkpoint, random_weights, device, seed, steps, cfg,
         frames, height, width, executor, fast, output, parts, quiet) -> None:
    """The run on this process (every rank of a --gpus run; rank 0 writes the run directory)."""
    from qc_compile.runtime.parallel import is_rank0
    from qc_compile.runtime.pipeline import Pipeline

    pipe = Pipeline(work, model=model, checkpoint=checkpoint, device=device, executor=executor,
                    random_weights=random_weights, fast=fast)
    pipe.attach_opensora_parts(**parts)  # opensora-v1.2: T5 + VAE (results are decoded frames); qc-ref: none given
    res = pipe(all_prompts, policy=policy, overrides=overrides, seed=seed, steps=steps, cfg=cfg, reference=reference,
               frames=frames, height=height, width=width, progress=not quiet and is_rank0())
    if not is_rank0():
        return
    root = (work / "runs") if work is not None else Path("runs")
    _save_and_report(res, output or new_run_dir(root, res.policy, seed))


def _save_and_report(res: "RunResult", run_dir: Path) -> None:  # noqa: F821 (imported lazily)
    """Write the run directory whole (fresh_dir) and print the summary line."""
    from qc_compile.outputs import fresh_dir

    with fresh_dir(run_dir) as tmp:  # a run dir holds one run's results, complete, or nothing new
        paths = {k: run_dir / p.relative_to(tmp) for k, p in res.save(tmp).items()}
    click.echo(summary_line(res))
    par = res.extra.get("parallel")
    if par:
        click.echo(f"{par['world_size']} processes (CFG parallel {par['cfg_parallel']}, sequence {par['sp_size']}, "
                   f"{par['backend']}): decisions identical across ranks: {par['decisions_identical_across_ranks']}")
    click.echo(f"wrote {run_dir}/ ({', '.join(sorted(p.name for p in paths.values()))})")


def summary_line(res: "RunResult") -> str:  # noqa: F821 (imported lazily)
    """The one line a run prints: policy, compute and FLOP fractions, time, and fidelity against the FP run."""
    m = res.metrics()
    line = (f"{res.policy}: {100 * m['compute_fraction']:.1f}% of unit evaluations computed "
            f"({100 * m['flop_fraction']:.1f}% of block FLOPs), {m['seconds']:.1f} s")
    if "reference" in m:
        r = m["reference"]
        line += f"; vs FP: PSNR {r['psnr_db']:.2f} dB, SSIM {r['ssim']:.4f}"
        if r.get("checker_drop_points") is not None:
            line += f", checker {100 * m['checker']['all']:.0f}% (FP {100 * r['checker_fp']['all']:.0f}%)"
    return line
