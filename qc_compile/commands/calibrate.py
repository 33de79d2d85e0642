"""`qc-compile calibrate WORK --uniform FORMAT`: activation ranges over a few prompts and all steps -> plan.json."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

import click

import qc_compile.validate as V

from qc_compile.errors import UserError


def load_for_calibration(work_dir: Path, prompts_file: Path | None, num_prompts: int, *, steps, cfg, seed,
                         hint: str, text_encoder: Path | None = None, caption_cache: Path | None = None,
                         device: str = "cpu"):
    """Shared by both calibration methods: the work dir's model, the calibration prompts (each checked against the
    caption vocabulary) and the sampling settings at the exported geometry. ``text_encoder``: opensora-v1.2's T5
    folder (prompts go through Open-Sora's conventions and T5, optionally through a caption cache)."""
    from qc_compile.calib.ranges import default_prompts
    from qc_compile.prompts import read_prompt_file
    from qc_compile.models.caption_encoder import CaptionTokenizer
    from qc_compile.runtime.generation import GenerationSettings
    from qc_compile.workdir import WorkDir, load_model_for, read_model_info

    from qc_compile.models.opensora_parts import check_part_paths

    check_part_paths(text_encoder=text_encoder, caption_cache=caption_cache)  # before any load
    work = WorkDir(work_dir)
    info = read_model_info(work)
    prompts = read_prompt_file(prompts_file) if prompts_file else default_prompts(info.name, num_prompts)
    if not prompts:
        raise UserError(f"model {info.name} has no built-in calibration prompts; pass --prompts FILE.")
    from qc_compile.runtime.generation import resolve_device

    loaded = load_model_for(info, device=resolve_device(device))
    if loaded.text_encoder is None and text_encoder is None:
        raise UserError(f"model {info.name} takes T5 caption features: pass --text-encoder with the folder of its T5 "
                        f"(T5 v1.1 XXL) to calibrate from text prompts; {hint}")
    if text_encoder is not None or caption_cache is not None:
        from qc_compile.models.opensora_parts import attach_opensora_parts

        attach_opensora_parts(loaded, text_encoder=text_encoder, caption_cache=caption_cache, need_vae=False)
    if loaded.text_encoder is not None:
        try:
            CaptionTokenizer().encode(prompts, max_length=loaded.config.model_max_length)
        except UserError as e:
            raise UserError(f"--prompts {prompts_file or '(default)'}: {e}") from None
    frames, height, width = info.video_size
    settings = GenerationSettings.defaults(loaded, steps=steps, cfg=cfg, seed=seed, frames=frames, height=height,
                                           width=width)
    return work, info, loaded, prompts, settings


def _write_report(work, plan, ranges: dict, kept: list[str], settings: dict, per_call: dict) -> Path:
    from qc_compile.artifacts import atomic_write

    lines = [f"# Calibration report: {plan.model['name']}", "",
             f"- prompts: {len(settings['prompts'])}, steps: {settings['steps']}, cfg {settings['cfg']}, "
             f"seed {settings['seed']}, method: {settings['method']}"
             + (f" (p{settings['percentile']})" if settings["percentile"] is not None else ""),
             f"- uniform format: `{settings['format']}`; kept at bf16: {len(kept)}", "",
             "| linear | unit | W | A | range used | max |", "|---|---|---|---|---|---|"]
    for name, e in plan.linears.items():
        r = ranges[name]
        lines.append(f"| `{name}` | {e.unit} | {e.weight} | {e.activation} | {r['amax']:.4g} | {r['max']:.4g} |")
    png = _write_heatmap(work, plan, per_call)
    lines += ["", f"![per-step input ranges]({png.name})"]
    path = work.report_dir / "calibration.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _write_heatmap(work, plan, per_call: dict) -> Path:
    """log10 of each linear's input |x| max per denoising step (linears x steps)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qc_compile.artifacts import write_bytes_atomic

    names = list(plan.linears)
    data = np.log10(np.maximum(np.array([per_call[n] for n in names], dtype=np.float64), 1e-6))
    fig, ax = plt.subplots(figsize=(min(4 + data.shape[1] * 0.25, 16), 2 + len(names) * 0.12))
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.set_xlabel("denoising step")
    ax.set_title(f"{plan.model['name']}: log10 max|x| at each linear's input")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = work.report_dir / "calibration_ranges.png"
    write_bytes_atomic(path, buf.getvalue())
    return path


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
@click.option("--srap-thresholds", is_flag=True,
              help="Also calibrate per-unit SRAP thresholds into the plan. Off by default: on qc-ref (H200 sweep, "
                   "bench/results/methods_qc_ref_h200) calibrated SRAP cost 17 dB and most caption-checker points.")
@click.option("--srap-quantile", type=V.FiniteFloat(0.0, 1.0), default=0.9, show_default=True,
              help="SRAP: per unit, prune above this quantile of its calibrated block-to-block cosine (both methods).")
@click.option("--srap-max-error", type=V.FiniteFloat(0.0, 1e6), default=0.5, show_default=True,
              help="SRAP: a unit whose pruning changes a calibration step's velocity by more than this (relative, "
                   "median of the validated samples) is never pruned.")
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
              act_high_fraction: float, srap_thresholds: bool, srap_quantile: float, srap_max_error: float, sampling: str, calib_samples: int, replay_samples: int, no_smoothing: bool,
              vc: bool, vc_policy: str, predictor: bool, num_prompts: int | None, fresh: bool,
              prompts_file: Path | None, percentile: float | None, steps: int | None, cfg: float | None, seed: int,
              high_variant: str, act_scales: str, exclude: tuple[str, ...], target: str, text_encoder: Path | None, caption_cache: Path | None,
              device: str, quiet: bool) -> None:
    """Calibrate the model in WORK and write WORK/plan.json: --uniform FORMAT (one format everywhere) or
    --method aigq (mixed precision per layer and per step)."""
    if (fmt is None) == (method is None):
        raise UserError("give exactly one of --uniform FORMAT or --method aigq.")
    from qc_compile.locks import workdir_lock
    from qc_compile.workdir import WorkDir

    WorkDir(work_dir).require()
    click.get_current_context().with_resource(workdir_lock(work_dir, "calibrate"))  # one writer of WORK at a time
    if method == "aigq":
        from qc_compile.commands.calibrate_aigq import run_aigq

        return run_aigq(work_dir, budget=budget, act_format=act_format, act_high_fraction=act_high_fraction,
                        srap=srap_thresholds, srap_quantile=srap_quantile, srap_max_error=srap_max_error,
                        sampling=sampling, calib_samples=calib_samples, replay_samples=replay_samples,
                        smoothing=not no_smoothing, vc=vc, vc_policy=vc_policy, predictor=predictor,
                        num_prompts=num_prompts, fresh=fresh, prompts_file=prompts_file, steps=steps, cfg=cfg,
                        seed=seed, target=target, quiet=quiet, text_encoder=text_encoder,
                        caption_cache=caption_cache, device=device)
    import torch
    from safetensors.torch import save

    from qc_compile.artifacts import write_bytes_atomic, write_json_atomic
    from qc_compile.calib.ranges import RangeCollector
    from qc_compile.manifest import tool_versions
    from qc_compile.plan import WEIGHT_FORMATS, save_plan, uniform_plan
    from qc_compile.calib import runtime_params

    fmt = {"fp8": "fp8_e4m3", "int4": "int4_b128", "fp4": "nvfp4"}.get(fmt, fmt)
    if fmt not in WEIGHT_FORMATS:
        raise UserError(f"--uniform {fmt!r}: unknown format; known: {', '.join(WEIGHT_FORMATS)} (alias fp8).")
    if not 0.0 <= act_high_fraction <= 1.0:
        raise UserError(f"--act-high-fraction must be in [0, 1], got {act_high_fraction}.")
    if not 0.0 < srap_quantile < 1.0 or srap_max_error <= 0:
        raise UserError(f"--srap-quantile must be in (0, 1) and --srap-max-error positive; got {srap_quantile} and "
                        f"{srap_max_error}.")
    if percentile is not None and not (0.0 < percentile <= 100.0):
        raise UserError(f"--percentile must be in (0, 100], got {percentile}.")
    from qc_compile.trt_compat import parse_target

    parse_target(target, allow_any=True)
    start = time.perf_counter()
    work, info, loaded, prompts, settings = load_for_calibration(
        work_dir, prompts_file, num_prompts or 4, steps=steps, cfg=cfg, seed=seed,
        hint="calibrate qc-ref, or supply a plan written elsewhere.", text_encoder=text_encoder,
        caption_cache=caption_cache, device=device)
    torch.set_grad_enabled(False)
    rc = RangeCollector(loaded.model, percentile=percentile)
    _, signals = runtime_params.measure(loaded, prompts, settings, progress=not quiet, contexts=[rc])
    ranges = rc.reduce()
    work.calib_dir.mkdir(parents=True, exist_ok=True)
    ranges_sha = write_bytes_atomic(work.calib_dir / "ranges.safetensors", save(rc.tensors()))
    calib = {"prompts": prompts, "steps": settings.steps, "cfg": settings.cfg, "seed": settings.seed,
             "video": list(info.video_size), "method": "percentile" if percentile is not None else "max",
             "percentile": percentile, "ranges_sha256": ranges_sha}
    write_json_atomic(work.calib_dir / "ranges.json", {"schema_version": 1, "calibration": calib, "ranges": ranges})
    provenance = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": f"qc-compile calibrate --uniform {fmt}", "tool_versions": tool_versions(),
                  "calibration": calib}
    plan, kept = uniform_plan(info, fmt, ranges, target=target, exclude=list(exclude), provenance=provenance)
    if act_scales == "dynamic":
        for e in plan.linears.values():
            if e.activation in ("fp8_e4m3", "int8"):
                e.act_scale = "dynamic"
    calib["act_scales"] = act_scales
    rt = runtime_params.add_runtime_params(plan, signals, runtime_params.RuntimeOptions(
        act_high_fraction=act_high_fraction, high=high_variant, srap=srap_thresholds, srap_quantile=srap_quantile,
        srap_max_error=srap_max_error))
    calib["runtime"] = rt
    from qc_compile.plan import validate

    lins = {li["name"]: li for li in info.linears()}
    validate(plan, linears=lins, model_name=info.name, config_sha256=info.config_sha256, where="calibrated plan")
    save_plan(plan, work.plan_json)
    report = _write_report(work, plan, ranges, kept,
                           {"prompts": prompts, "steps": settings.steps, "cfg": settings.cfg, "seed": settings.seed,
                            "method": calib["method"], "percentile": percentile, "format": fmt},
                           {n: st.amax for n, st in rc.stats.items()})
    sim = " (simulated format: not runnable on TensorRT targets)" if WEIGHT_FORMATS[fmt].simulated else ""
    click.echo(f"calibrated {len(ranges)} linears over {len(prompts)} prompt(s) x {settings.steps} steps "
               f"({calib['method']}); wrote {work.plan_json} with {len(plan.linears) - len(kept)} linear(s) in "
               f"{fmt}{sim}, {len(kept)} kept at bf16; report {report}; {time.perf_counter() - start:.1f} s")
    if kept:
        click.echo("kept at bf16: " + ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""))
