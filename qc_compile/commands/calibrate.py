"""`qc-compile calibrate WORK --uniform FORMAT | --method aigq`: options and messages; the work is in
``calib/uniform.py`` and ``calib/aigq.py`` (through ``commands/calibrate_aigq.py``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

import qc_compile.validate as V

from qc_compile.errors import UserError


@click.command("calibrate")
@click.argument("work_dir", metavar="WORK", type=click.Path(path_type=Path))
@click.option("--uniform", "fmt", default=None,
              help="Format for every linear: fp8_e4m3 (alias fp8) | int8 | int4_b64 | int4_b128 (weight-only) | "
                   "nvfp4 | int6_sim (simulated) | bf16. The simplest calibration (ranges only).")
@click.option("--method", type=click.Choice(["aigq"]), default=None,
              help="Adaptive calibration: AIGQ sensitivity-driven weight formats under --budget, per-step activation "
                   "schedule, per-layer smoothing/rotation (+ --vc, --predictor). Give --uniform or --method.")
@click.option("--budget", default="6", show_default=True,
              help="aigq: average weight bits over all linear parameters (e.g. 6), or a size (e.g. 1.5MB).")
@click.option("--act-format", default="fp8_e4m3", show_default=True,
              help="aigq: activation format of the default variant (bf16 = weight-only; int6_sim simulated).")
@click.option("--act-high-fraction", type=V.FiniteFloat(0.0, 1.0), default=0.3, show_default=True,
              help="Fraction of steps whose activations run the plan's `high` variant (bf16): those with the largest "
                   "feature change (both methods; the plan's schedule).")
@click.option("--srap-thresholds/--no-srap-thresholds", default=True, show_default=True,
              help="Calibrate per-unit SRAP thresholds into the plan (both methods): candidate thresholds run end to "
                   "end on the calibration prompts under HLC and the most permissive one within --srap-budget-db "
                   "that saves --srap-min-saving points is written; when none is, thresholds that never prune, with "
                   "the reason in the plan's provenance (calibration.runtime.srap).")
@click.option("--srap-budget-db", type=V.FiniteFloat(1e-9, 100.0), default=0.5, show_default=True,
              help="SRAP: the most mean PSNR (dB, against full compute) its pruning may cost on the calibration "
                   "prompts, relative to HLC alone (a prompt may lose at most twice this).")
@click.option("--srap-min-saving", type=V.FiniteFloat(0.0, 100.0), default=3.0, show_default=True,
              help="SRAP: the fewest percentage points of block computations its pruning must save to be written.")
@click.option("--srap-max-error", type=V.FiniteFloat(0.0, 1e6), default=0.5, show_default=True,
              help="SRAP: a unit whose pruning changes a calibration step's velocity by more than this (relative, "
                   "median of the replayed samples) is not a candidate.")
@click.option("--hlc-thresholds/--no-hlc-thresholds", default=True, show_default=True,
              help="Quantized plans (both methods): measure the plan's own quantized run under quantcache on the "
                   "calibration prompts and, when quantization raises its compute above the unquantized model's at "
                   "HLC's default thresholds, write the smallest scaled thresholds (x1.05 .. x2) that bring it back, "
                   "if they cost <= 0.5 dB mean PSNR (cache_policy.params.hlc; else defaults, with the reason in "
                   "calibration.runtime.hlc).")
@click.option("--sampling", type=click.Choice(["tap", "uniform"]), default="tap", show_default=True,
              help="aigq: how calibration samples (prompt, step) are chosen: Q&C temporal-aware clustering or uniform.")
@click.option("--calib-samples", type=V.BoundedInt(1, 100000), default=32, show_default=True,
              help="aigq: calibration samples drawn from prompts x steps (ranges are taken over these).")
@click.option("--replay-samples", type=V.BoundedInt(1, 10000), default=4, show_default=True,
              help="aigq: samples replayed per layer for sensitivity and the smoothing search (cost grows linearly).")
@click.option("--no-smoothing", is_flag=True, help="aigq: skip the per-layer smoothing/rotation search.")
@click.option("--vc", is_flag=True, help="aigq: fit Q&C variance-compensation factors (plan vc).")
@click.option("--vc-policy", default="hlc", show_default=True, help="aigq: caching policy the VC fit runs under.")
@click.option("--predictor", is_flag=True, help="aigq: fit the 6Bit-style DMPQ predictor (cache_policy.params.dmpq).")
@click.option("--num-prompts", type=V.BoundedInt(1, V.PROMPTS_MAX), default=None,
              help="Built-in calibration prompts to use (default 4 for --uniform, 8 for aigq).")
@click.option("--fresh", is_flag=True, help="aigq: discard statistics of an earlier run instead of resuming.")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Text file, one prompt per line (default: qc-ref shapes captions drawn with seed 1234, disjoint "
                   "from the held-out evaluation seed).")
@click.option("--percentile", type=V.FiniteFloat(1e-9, 100.0), default=None,
              help="--uniform: use this percentile of |x| (per step, then the max over steps) instead of the max.")
@click.option("--steps", type=V.STEPS, default=None, help="Sampling steps (model default).")
@click.option("--cfg", type=V.CFG, default=None, help="CFG scale (model default).")
@click.option("--seed", type=V.SEED, default=0, show_default=True, help="Noise seed.")
@click.option("--high-variant", type=click.Choice(["activations", "fp"]), default="fp", show_default=True,
              help="--uniform: what the schedule's `high` steps run: the unquantized model (fp: bf16 weights and "
                   "activations; +1.6 dB mean / +5.3 dB min over `activations` on a small CPU ablation, "
                   "bench/results/methods_qc_ref_cpu/ablation_fp8.md) or bf16 activations with the quantized weights.")
@click.option("--act-scales", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="--uniform fp8/int8: activation scales per tensor from the calibrated range (static) or per token "
                   "at run time (dynamic: what the fast FP8 kernels compute; the Q/DQ graphs compute row scales).")
@click.option("--exclude", multiple=True, help="--uniform: fnmatch pattern of linears to keep at bf16 (repeatable), "
                                               "e.g. 't_embedder.*'.")
@click.option("--quantize-embed-final", is_flag=True,
              help="--uniform: quantize the embed and final units' linears too (timestep / caption embedders, final "
                   "projection). Off by default: a small share of the compute whose outputs modulate every block; "
                   "ModelOpt's diffusion recipes leave them unquantized as well.")
@click.option("--target", default="any", show_default=True,
              help="Target the plan is made for; aigq takes its format menu from it (torch/any/trt: int4_b128, "
                   "int6_sim (simulated, torch/any only), fp8_e4m3, bf16; rtx:sm120 adds nvfp4).")
@click.option("--text-encoder", type=click.Path(path_type=Path), default=None,
              help="opensora-v1.2: folder of its T5 v1.1 XXL; prompts get Open-Sora's conventions (aesthetic score "
                   "6.5) and go through T5.")
@click.option("--caption-cache", type=click.Path(path_type=Path), default=None,
              help="opensora-v1.2: safetensors file of T5 features, read and extended (T5 runs only on new prompts).")
@click.option("--device", default="cpu", show_default=True, help="Where the calibration passes run (cpu, cuda, auto).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def calibrate(work_dir: Path, fmt: str | None, method: str | None, budget: str, act_format: str,
              act_high_fraction: float, srap_thresholds: bool, srap_budget_db: float, srap_min_saving: float,
              srap_max_error: float, hlc_thresholds: bool, sampling: str, calib_samples: int, replay_samples: int, no_smoothing: bool,
              vc: bool, vc_policy: str, predictor: bool, num_prompts: int | None, fresh: bool,
              prompts_file: Path | None, percentile: float | None, steps: int | None, cfg: float | None, seed: int,
              high_variant: str, act_scales: str, exclude: tuple[str, ...], quantize_embed_final: bool, target: str, text_encoder: Path | None, caption_cache: Path | None,
              device: str, quiet: bool) -> None:
    """Calibrate the model in WORK and write WORK/plan.json: --uniform FORMAT (one format everywhere) or
    --method aigq (mixed precision per layer and per step)."""
    if (fmt is None) == (method is None):
        raise UserError("give exactly one of --uniform FORMAT or --method aigq.")
    from qc_compile.locks import workdir_lock
    from qc_compile.workdir import WorkDir

    WorkDir(work_dir).require()
    click.get_current_context().with_resource(workdir_lock(work_dir, "calibrate"))  # one writer of WORK at a time
    from qc_compile.workdir import read_model_info

    info = read_model_info(WorkDir(work_dir))
    if info.is_diffusers:
        return _calibrate_diffusers(info, work_dir, fmt=fmt, method=method, act_high_fraction=act_high_fraction,
                                    high_variant=high_variant, srap=srap_thresholds, hlc=hlc_thresholds,
                                    num_prompts=num_prompts, prompts_file=prompts_file, percentile=percentile,
                                    steps=steps, cfg=cfg, seed=seed, act_scales=act_scales, exclude=exclude,
                                    quantize_embed_final=quantize_embed_final, target=target,
                                    text_encoder=text_encoder, caption_cache=caption_cache, device=device,
                                    quiet=quiet)
    if method == "aigq":
        from qc_compile.commands.calibrate_aigq import run_aigq

        return run_aigq(work_dir, budget=budget, act_format=act_format, act_high_fraction=act_high_fraction,
                        srap=srap_thresholds, srap_budget_db=srap_budget_db,
                        srap_min_saving=srap_min_saving, srap_max_error=srap_max_error, hlc=hlc_thresholds,
                        sampling=sampling, calib_samples=calib_samples, replay_samples=replay_samples,
                        smoothing=not no_smoothing, vc=vc, vc_policy=vc_policy, predictor=predictor,
                        num_prompts=num_prompts, fresh=fresh, prompts_file=prompts_file, steps=steps, cfg=cfg,
                        seed=seed, target=target, quiet=quiet, text_encoder=text_encoder,
                        caption_cache=caption_cache, device=device)
    import torch

    from qc_compile.calib import runtime_params
    from qc_compile.calib.hlc_thresholds import summary_line as hlc_summary
    from qc_compile.calib.inputs import load_for_calibration
    from qc_compile.calib.srap import summary_line as srap_summary
    from qc_compile.calib.uniform import UniformOptions, calibrate_uniform

    opts = UniformOptions(fmt=fmt, percentile=percentile, exclude=tuple(exclude), target=target,
                          act_scales=act_scales, quantize_embed_final=quantize_embed_final).checked()  # before any load
    if srap_max_error <= 0:
        raise UserError(f"--srap-max-error must be positive; got {srap_max_error}.")
    runtime = runtime_params.RuntimeOptions(act_high_fraction=act_high_fraction, high=high_variant,
                                            srap=srap_thresholds, srap_budget_db=srap_budget_db,
                                            srap_min_saving=srap_min_saving, srap_max_error=srap_max_error,
                                            hlc=hlc_thresholds)
    start = time.perf_counter()
    work, info, loaded, prompts, settings = load_for_calibration(
        work_dir, prompts_file, num_prompts or 4, steps=steps, cfg=cfg, seed=seed,
        hint="calibrate qc-ref, or supply a plan written elsewhere.", text_encoder=text_encoder,
        caption_cache=caption_cache, device=device)
    torch.set_grad_enabled(False)
    res = calibrate_uniform(work, info, loaded, prompts, settings, dataclasses.replace(opts, runtime=runtime),
                            progress=not quiet)
    _echo_uniform_result(res, work, len(prompts), f"{settings.steps} steps", opts.fmt, percentile, start)
    rt = (res.plan.provenance or {}).get("calibration", {}).get("runtime", {})
    for line in (srap_summary(rt.get("srap")), hlc_summary(rt.get("hlc"))):
        if line:
            click.echo(line)


def _calibrate_diffusers(info, work_dir: Path, *, fmt, method, act_high_fraction, high_variant, srap, hlc,
                         num_prompts, prompts_file, percentile, steps, cfg, seed, act_scales, exclude,
                         quantize_embed_final, target, text_encoder, caption_cache, device, quiet) -> None:
    """`calibrate --uniform` on a diffusers (qc-ref-wan) work dir: ``calib/diffusers_uniform.py``."""
    import torch

    from qc_compile.calib import diffusers_uniform as DU
    from qc_compile.calib import runtime_params
    from qc_compile.calib.uniform import UniformOptions

    if method == "aigq":
        raise DU.refuse_aigq(info)
    DU.check_calibratable(info)
    given = [f for f, v in (("--text-encoder", text_encoder), ("--caption-cache", caption_cache)) if v is not None]
    if given:
        raise UserError(f"{', '.join(given)}: opensora-v1.2 options; {info.name} encodes its captions with its own "
                        "caption encoder. Drop " + ("it." if len(given) == 1 else "them."))
    opts = UniformOptions(fmt=fmt, percentile=percentile, exclude=tuple(exclude), target=target,
                          act_scales=act_scales, quantize_embed_final=quantize_embed_final).checked()
    runtime = runtime_params.RuntimeOptions(act_high_fraction=act_high_fraction, high=high_variant, srap=srap,
                                            hlc=hlc)
    start = time.perf_counter()
    work, info, loaded, prompts, settings = DU.load_for_calibration(work_dir, prompts_file, num_prompts or 4,
                                                                   steps=steps, cfg=cfg, seed=seed, device=device)
    torch.set_grad_enabled(False)
    res = DU.calibrate_uniform(work, info, loaded, prompts, settings, dataclasses.replace(opts, runtime=runtime),
                               progress=not quiet)
    _echo_uniform_result(res, work, len(prompts), f"{settings['steps']} steps of {info.name}'s own sampler", opts.fmt,
                         percentile, start)
    for line in DU.summary_lines(res.plan):
        click.echo(line)
    if opts.fmt in ("int8", "nvfp4", "int6_sim"):  # a valid plan, but not one the torch executor runs
        click.echo(f"note: {opts.fmt} activations run only through `qc-compile build {work_dir} --target T` and "
                   "`run --executor onnxruntime|tensorrt`; `run` on the torch executor (qc-compile's FastLinear) takes "
                   "fp8, int4_b128, int4_b64 or bf16 plans.")


def _echo_uniform_result(res, work, n_prompts: int, steps: str, fmt: str, percentile, start: float) -> None:
    """What both `calibrate --uniform` paths print: linears calibrated over ``n_prompts`` x ``steps`` (e.g. "4 steps"),
    the plan written, the linears kept at bf16."""
    n_lin, kept = len(res.plan.linears), res.kept
    sim = " (simulated format: not runnable on TensorRT targets)" if res.simulated else ""
    click.echo(f"calibrated {len(res.ranges)} linears over {n_prompts} prompt(s) x {steps} "
               f"({'percentile' if percentile is not None else 'max'}); wrote {work.plan_json} with "
               f"{n_lin - len(kept)} linear(s) in {fmt}{sim}, {len(kept)} kept at bf16; report {res.report}; "
               f"{time.perf_counter() - start:.1f} s")
    if kept:
        click.echo("kept at bf16: " + ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""))
