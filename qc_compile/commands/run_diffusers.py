"""`qc-compile run` / `generate` / `sweep` on `qc-ref-wan` and on local WanPipeline folders (`--model wan2.1:PATH` /
`wan2.2:PATH`, :mod:`qc_compile.models.diffusers_pipeline`): the diffusers model through `qc_compile.enable`.

Why a module of its own: the STDiT3 :class:`~qc_compile.runtime.pipeline.Pipeline` drives the runtime's sampler over
the step executor itself, while a diffusers model is driven by its own WanPipeline-style sampler
(:meth:`QCRefWan.sample`) with the transformer's ``forward`` replaced by :func:`qc_compile.enable`'s session (the
same StepExecutor over the torch runner). This module maps the CLI's flags onto that path, refuses the ones that do
not apply, and records the run as a :class:`~qc_compile.runtime.result.RunResult` built from the session's step
records, so ``RunResult.save`` writes the same video / trace.json / metrics.json / decisions.png as the STDiT3 run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from qc_compile.errors import UserError
from qc_compile.models.config import diffusers_cli_refusal, is_diffusers_spec
from qc_compile.diffusers_run import (CLI_MODELS, FPS, check_captions, is_pipeline, is_pipeline_work, load,
                                      load_work, plan_summary, sample_under_policy)

AES_DEFAULT = 6.5  # the --aes default of the Open-Sora options (an explicit other value is refused here)


def takes_model(model: str | None, work: Path | None = None) -> bool:
    """Whether ``model`` runs on this path: qc-ref-wan, or a ``wan2.1:PATH`` / ``wan2.2:PATH`` pipeline folder, without
    a work dir. A diffusers model it does not run (``cogvideox:PATH``, or any diffusers model with a work dir) raises
    the one-paragraph refusal; STDiT3 models return False."""
    if model is None or not is_diffusers_spec(model):
        return False
    if work is not None or not (model in CLI_MODELS or is_pipeline(model)):
        raise diffusers_cli_refusal(model)
    if is_pipeline(model):
        from qc_compile.models.diffusers_adapter import parse_model_spec

        parse_model_spec(model)  # an empty PATH is refused here, before any other check
    return True


def folder_defaults(checkpoint: Path | None):
    """The sampling defaults of a qc-ref-wan folder, read from its ``qc_ref_wan.json`` without loading weights
    (None when the file is missing: the load then says what is wrong)."""
    from qc_compile.artifacts import read_json
    from qc_compile.models.qc_ref_wan import ASSET_DIR, META_FILE, SamplingDefaults

    meta_path = Path(checkpoint if checkpoint is not None else ASSET_DIR) / META_FILE
    if not meta_path.is_file():
        return None
    try:
        return SamplingDefaults(**read_json(meta_path, kind="qc-ref-wan metadata").get("sampling", {}))
    except TypeError as e:
        raise UserError(f"{meta_path}: its 'sampling' block is not qc-ref-wan's ({e}).") from None


def check_flags(model: str, checkpoint: Path | None, flags: Mapping[str, Any]) -> None:
    """Refuse, before any load, the flags that do not apply to a diffusers model on this path. ``flags`` maps a flag
    as the user wrote it (``--executor onnxruntime``) to whether it was given with an inapplicable value; the
    ``size`` entry (``{"frames": v, "height": v, "width": v}``) is checked against qc-ref-wan's folder's own size; a
    WanPipeline folder (``wan2.1:PATH``) takes any size its VAE divides (checked at its load) and no --checkpoint."""
    flags = dict(flags)
    size = flags.pop("size", {}) or {}
    bad = [flag for flag, given in flags.items() if given]
    if is_pipeline(model):
        if checkpoint is not None:
            bad.insert(0, "--checkpoint")
        if bad:
            raise UserError(f"{', '.join(bad)}: not applicable to --model {model}, a diffusers WanPipeline folder "
                            "(the folder names the weights; its own text encoder, VAE and scheduler) that runs "
                            "through qc_compile.enable on the torch executor, one process; drop "
                            + ("it." if len(bad) == 1 else "them."))
        return
    d = folder_defaults(checkpoint)
    if d is not None:
        bad += [f"--{k} {v}" for k, v in size.items() if v is not None and v != getattr(d, k)]
    if bad:
        shape = f" at its own size {d.frames}x{d.height}x{d.width}" if d is not None else ""
        raise UserError(f"{', '.join(bad)}: not applicable to --model {model}, a diffusers-layout model that runs "
                        f"through qc_compile.enable on the torch executor{shape}, one process, with its own caption "
                        "encoder; drop " + ("it." if len(bad) == 1 else "them."))


def work_info(work: Path | None):
    """The ModelInfo of a diffusers work dir (model.json with a ``family``); None without a work dir or for an
    STDiT3 one (whose own path reports what is wrong with it)."""
    if work is None:
        return None
    from qc_compile.workdir import WorkDir, read_model_info

    wd = WorkDir(work)
    if not wd.model_json.is_file():
        return None
    info = read_model_info(wd)
    return info if info.is_diffusers else None


def check_work_flags(work: Path, info, model: str | None, flags: Mapping[str, Any]) -> None:
    """Refuse, before any load, what does not apply to a diffusers work dir: another --model, a ``wan2.1:PATH``
    transformer folder (nothing to sample with), and flags that do not apply (``flags`` as in :func:`check_flags`;
    ``--negative-prompt`` applies to WanPipeline work dirs)."""
    if model is not None and model != info.name:
        raise UserError(f"--model {model}: {work} is a work dir of {info.name} (its model.json names the model and "
                        "its weights); drop --model, or give another work dir.")
    flags = dict(flags)
    if is_pipeline_work(info):
        flags.pop("--negative-prompt", None)
    elif info.name not in CLI_MODELS:
        raise UserError(f"{work} holds {info.name}, a diffusers transformer folder exported on its own: `run` and "
                        "`sweep` sample with the model's own text encoder, tokenizer, VAE and scheduler, which a "
                        "transformer folder does not have. Export the whole WanPipeline folder instead (`qc-compile "
                        "export wan2.1:PIPELINE_FOLDER -o WORK`, model_index.json beside transformer/), run that folder "
                        "without a work dir (`qc-compile run --model wan2.1:PIPELINE_FOLDER`), or drive this transformer "
                        f"from Python with `qc_compile.enable(pipe, work='{work}', executor='onnxruntime')`.")
    size = flags.pop("size", {}) or {}
    bad = [flag for flag, given in flags.items() if given]
    frames, height, width = info.video_size
    bad += [f"--{k} {v}" for k, v in size.items() if v is not None and v != dict(frames=frames, height=height,
                                                                                  width=width)[k]]
    if bad:
        raise UserError(f"{', '.join(bad)}: not applicable to work dir {work} ({info.name}, a diffusers-layout model "
                        f"that runs its own sampler through qc_compile.enable at its exported size {frames}x{height}x"
                        f"{width}, one process, with its own caption encoder); drop "
                        + ("it." if len(bad) == 1 else "them."))


def check_work_policy(work: Path, info, policy: str, overrides: Mapping[str, Any], seed: int) -> None:
    """``policy`` and its parameters with the work dir's plan (its schedule, thresholds) before any load."""
    from qc_compile.plan import load_plan
    from qc_compile.runtime.policies import get_policy
    from qc_compile.workdir import WorkDir

    wd = WorkDir(work)
    get_policy(policy, overrides, load_plan(wd.plan_json, model_info=info) if wd.plan_json.exists() else None,
               seed=seed)


def run_work_command(*, work: Path, info, prompts: list[str], policy: str | None, overrides: Mapping[str, Any],
                     reference: bool, device: str, seed: int, steps: int | None, cfg: float | None, quiet: bool,
                     executor: str = "torch", negative_prompt: str = ""):
    """`qc-compile run WORK` on a diffusers work dir: its model (checked against model.json) under its plan."""
    check_captions(prompts, info.name)
    loaded, _ = load_work(work, info, device, negative_prompt)
    return sample_under_policy(loaded, prompts, policy=policy, overrides=overrides, seed=seed, steps=steps, cfg=cfg,
                               reference=reference, progress=not quiet, work=work, executor=executor)


def run_command(*, model: str, checkpoint: Path | None, prompts: list[str], policy: str | None,
                overrides: Mapping[str, Any], reference: bool, device: str, seed: int, steps: int | None,
                cfg: float | None, quiet: bool, size: Mapping[str, int | None] | None = None,
                negative_prompt: str = ""):
    """`qc-compile run --model qc-ref-wan | wan2.1:PATH`: load and sample; the caller (commands/run.py) writes the
    run directory and prints the summary, as for STDiT3 runs."""
    loaded = load(model, checkpoint, device, size=size, negative_prompt=negative_prompt)
    return sample_under_policy(loaded, prompts, policy=policy, overrides=overrides, seed=seed, steps=steps, cfg=cfg,
                               reference=reference, progress=not quiet)


class SweepCaller:
    """The loaded model as the Pipeline call that :func:`qc_compile.runtime.sweep.run_sweep` makes per config
    (``pipe(prompts, policy=, overrides=, seed=, steps=, reference=True)``), so a qc-ref-wan sweep reuses the sweep's
    loop, aggregation and outputs as they are. Why not ``sample_under_policy(reference=True)``: the configs of one
    call share prompts and seed, so the plain sampler's videos are computed once per call (the first config's) and
    attached to every config's RunResult."""

    def __init__(self, loaded, work: Path | None = None) -> None:
        self.loaded = loaded
        self.work = work  # a diffusers work dir: every config runs under its plan
        self._key: tuple | None = None
        self._ref: tuple[torch.Tensor, float] | None = None

    def reference(self, prompts: Sequence[str], seed: int, steps: int, cfg: float) -> tuple[torch.Tensor, float]:
        """The plain sampler's videos (nothing enabled) and their seconds, kept for the last prompts/seed/settings."""
        key = (tuple(prompts), seed, steps, cfg)
        if key != self._key:
            start = time.perf_counter()
            videos = self.loaded.sample(list(prompts), seed=seed, steps=steps, cfg=cfg)
            self._key, self._ref = key, (videos, time.perf_counter() - start)
        return self._ref

    def __call__(self, prompts: Sequence[str], *, policy: str | None = None,
                 overrides: Mapping[str, Any] | None = None, seed: int = 0, steps: int | None = None,
                 reference: bool = False, **size: Any):
        if any(v is not None for v in size.values()):  # the CLI refused these; the folder fixes its size
            raise UserError(f"{sorted(size)}: qc-ref-wan samples at its folder's own size.")
        res = sample_under_policy(self.loaded, prompts, policy=policy, overrides=overrides, seed=seed, steps=steps,
                                  work=self.work)
        if reference:
            res.fp_videos, res.fp_seconds = self.reference(prompts, seed, res.settings["steps"], res.settings["cfg"])
        return res


def sweep_command(*, model: str | None, checkpoint: Path | None, device: str, configs: Sequence,
                  prompts: Sequence[str], seeds: Sequence[int], steps: int | None, batch: bool, out_dir: Path | None,
                  log: Callable[[str], None], size: Mapping[str, int | None] | None = None,
                  negative_prompt: str = "", work: Path | None = None, info=None) -> dict:
    """`qc-compile sweep --model qc-ref-wan`: every config over prompts x seeds (per prompt, noise seed + k; or one
    batch per seed), against the plain sampler, as :func:`~qc_compile.runtime.sweep.run_sweep`'s result dict with
    the model, folder, device and steps filled in; the caller (commands/sweep.py) writes sweep.json/md/png.
    ``work`` (with its ``info``): a diffusers work dir's model, every config under its plan (``sweep WORK``)."""
    from qc_compile.runtime.sweep import run_sweep

    check_captions(prompts, model if work is None else info.name)  # before the load: unknown words are a UserError
    if work is not None:
        loaded, _ = load_work(work, info, device)
    else:
        loaded = load(model, checkpoint, device, size=size, negative_prompt=negative_prompt)
    result = run_sweep(SweepCaller(loaded, work), configs, prompts, seeds, steps=steps, batch=batch, out_dir=out_dir,
                       jobs=1, log=log)
    result.update(model=loaded.name, checkpoint=loaded.checkpoint, device=str(loaded.device),
                  steps=steps or loaded.defaults.steps)
    if work is not None:
        result.update(work_dir=str(work), plan=plan_summary(work))
    return result


def generate_command(*, model: str, checkpoint: Path | None, prompts: Sequence[str], outputs: Sequence[Path],
                     device: str, dtype: str, seed: int, steps: int | None, cfg: float | None, quiet: bool,
                     size: Mapping[str, int | None] | None = None, negative_prompt: str = "") -> None:
    """`qc-compile generate --model qc-ref-wan | wan2.1:PATH`: the plain sampler (nothing enabled), an mp4 + PNG
    strip each (dtype auto: fp32 for qc-ref-wan; bf16 on CUDA, fp32 on the CPU for a pipeline folder)."""
    import click

    from qc_compile.video_io import write_mp4, write_png_strip

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    loaded = load(model, checkpoint, device, torch_dtype, size=size, negative_prompt=negative_prompt)
    check_captions(prompts, model)
    d = loaded.defaults
    steps = steps or d.steps
    cfg = d.cfg if cfg is None else cfg
    start = time.perf_counter()
    videos = loaded.sample(list(prompts), seed=seed, steps=steps, cfg=cfg, progress=not quiet)
    seconds = time.perf_counter() - start
    for path, video in zip(outputs, videos):
        write_mp4(path, video, fps=getattr(loaded, "fps", FPS), upscale=getattr(loaded, "frame_upscale", 8))
        strip = write_png_strip(path.with_suffix(".png"), video, upscale=getattr(loaded, "strip_upscale", 4))
        click.echo(f"wrote {path} and {strip}")
    click.echo(f"{len(videos)} video(s), {steps} steps, cfg {cfg}, seed {seed}, {d.frames}x{d.height}x{d.width}, "
               f"{loaded.device}: {seconds:.1f} s")
