"""The user-facing runtime API: ``Pipeline``.

    from qc_compile.runtime import Pipeline

    pipe = Pipeline.from_pretrained("qc-ref")                 # FP model, torch runner (no compilation needed)
    pipe = Pipeline("WORK")                                   # a work dir: its model, plan thresholds, graphs
    pipe = Pipeline("WORK", executor="onnxruntime")           # any registered backend (runtime/runners)
    res = pipe("a red circle moving left on a black background", policy="quantcache", seed=0, reference=True)
    res.compute_fraction, res.metrics()["reference"]["psnr_db"]
    res.save("runs/demo")                                     # video.mp4, video.png, trace.json, metrics.json, decisions.png

A run is: a backend's unit runner (:mod:`qc_compile.runtime.runners`) under the one
:class:`~qc_compile.runtime.step_executor.StepExecutor`, driven by the sampler under a step policy.
``qc-compile run`` is a thin shell over this class.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from qc_compile.errors import UserError
from qc_compile.runtime.generation import GenerationSettings, generate, resolve_device
from qc_compile.runtime.result import RunResult
from qc_compile.runtime.runners import BACKENDS, RunnerRequest, check_backend, get_backend, load_runner
from qc_compile.runtime.step_executor import StepExecutor

EXECUTORS = tuple(BACKENDS)


def parallel_record(mesh, steps: list) -> dict:
    """What a parallel run records in its trace: the mesh, and whether every rank took the same decisions (a hash
    of all its decisions, compared over ranks with one all_gather)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps([s.decisions for s in steps], sort_keys=True).encode()).digest()
    return dict(mesh.describe(), decisions_identical_across_ranks=mesh.agree(digest))


class Pipeline:
    """Text-to-video with per-step policies. ``Pipeline(work_dir)`` uses a work dir (model.json, plan.json, graphs);
    ``Pipeline.from_pretrained(name)`` the FP model directly with the torch executor."""

    def __init__(self, work_dir: str | Path | None = None, *, model: str | None = None,
                 checkpoint: str | Path | None = None, device: str = "cpu", executor: str = "torch",
                 random_weights: bool = False, loaded: Any = None, fast: bool = False,
                 executor_options: Mapping[str, Any] | None = None) -> None:
        if fast:  # --fast is the torch-fast backend (bf16 + the qc:: CUDA kernels)
            if executor not in ("torch", "torch-fast"):
                raise UserError(f"--fast runs the torch executor's fast path; it does not combine with --executor "
                                f"{executor}. Drop one of the two.")
            executor = "torch-fast"
        if str(device).startswith("cuda") and executor == "onnxruntime":
            get_backend(executor).check(device)  # no CUDA provider: say so before "no CUDA GPU" (the fix differs)
        self.device = resolve_device(device)
        check_backend(executor, self.device, work_dir is not None)
        self.fast = executor == "torch-fast"
        self.executor_options = dict(executor_options or {})
        self._runner_cache: dict = {}
        self.executor_kind = executor
        self.work = Path(work_dir) if work_dir is not None else None
        self.plan = None
        self._workdir = None
        self.video_size: tuple[int, int, int] | None = None
        if self.work is not None:
            from qc_compile.workdir import WorkDir, check_no_interrupted_build, load_model_for, read_model_info

            wd = WorkDir(self.work)
            info = read_model_info(wd)
            check_no_interrupted_build(wd)  # every executor refuses a half-finished build
            if model is not None and model != info.name:
                raise UserError(f"--model {model}: work dir {self.work} holds model {info.name!r}.")
            self.loaded = load_model_for(info, device=self.device)
            self.video_size = info.video_size
            if wd.plan_json.exists() or wd.plan_json.is_symlink():  # a plan that is not a file is refused
                from qc_compile.plan import load_plan

                self.plan = load_plan(wd.plan_json, model_info=info)
            self._workdir = wd
        else:
            if loaded is not None:
                self.loaded = loaded
            else:
                from qc_compile.models import load_model
                from qc_compile.models.config import diffusers_cli_refusal, is_diffusers_spec

                if is_diffusers_spec(model or "qc-ref"):  # the Pipeline's executors run STDiT3 units
                    raise diffusers_cli_refusal(model)
                self.loaded = load_model(model or "qc-ref", checkpoint, device=self.device,
                                         random_weights=random_weights)
        self._fp_cache: dict[tuple, tuple[torch.Tensor, float]] = {}
        self.fp_cache_size = 8  # FP reference runs kept (oldest dropped first)
        self.decoder = None  # a latent model's VAE (attach_opensora_parts): results are decoded frames

    def attach_opensora_parts(self, *, text_encoder=None, vae=None, caption_cache=None, aes: float | None = 6.5,
                              flow: float | None = None) -> None:
        """Give opensora-v1.2 its T5 (prompts -> caption features) and VAE: every result's videos, and the FP
        reference, are then decoded frames in [-1, 1], so PSNR/SSIM compare what users see. A pixel-space model
        refuses these parts (UserError)."""
        from qc_compile.models.opensora_parts import attach_opensora_parts

        dtype = next(self.loaded.model.parameters()).dtype
        self.decoder = attach_opensora_parts(self.loaded, text_encoder=text_encoder, vae=vae,
                                             caption_cache=caption_cache, aes=aes, flow=flow, dtype=dtype)

    @classmethod
    def from_pretrained(cls, name: str = "qc-ref", checkpoint: str | Path | None = None, *, device: str = "cpu",
                        random_weights: bool = False, fast: bool = False) -> "Pipeline":
        return cls(None, model=name, checkpoint=checkpoint, device=device, random_weights=random_weights, fast=fast)

    # ------------------------------------------------------------------------------------------------ internals
    def settings(self, seed: int, steps: int | None, cfg: float | None, **kw) -> GenerationSettings:
        if self.video_size is not None:  # a work dir's graphs have the geometry they were exported with
            fixed = dict(zip(("frames", "height", "width"), self.video_size))
            for k, v in kw.items():
                if v is not None and k in fixed and v != fixed[k]:
                    raise UserError(f"--{k} {v}: work dir {self.work} was exported for {k} {fixed[k]}; re-export "
                                    "for another size.")
            kw = {**kw, **fixed}
        return GenerationSettings.defaults(self.loaded, steps=steps, cfg=cfg, seed=seed, **kw)

    def make_executor(self, settings: GenerationSettings, quantized: bool = True) -> StepExecutor:
        """The step executor for a run over this pipeline's backend: with a plan (and ``quantized``), the plan's
        computation (fake-quantized torch copies per variant, the fast kernels, the build's Q/DQ graphs or
        engines); ``quantized=False`` gives the FP reference computation."""
        from qc_compile.models.stdit3 import Geometry

        g = Geometry.for_model(self.loaded.config, settings.frames, settings.height, settings.width)
        key = ("runner", quantized, g)  # runners are loaded once (sessions, engines, CUDA graphs) and reused
        if key not in self._runner_cache:
            req = RunnerRequest(loaded=self.loaded, geometry=g, device=self.device, plan=self.plan,
                                work=self._workdir, quantized=quantized,
                                options=self.executor_options, cache=self._runner_cache)
            self._runner_cache[key] = load_runner(self.executor_kind, req)
        from qc_compile.runtime.parallel import shard_runner

        return StepExecutor(shard_runner(self._runner_cache[key], g), g)

    @property
    def quantized(self) -> bool:
        """Whether runs execute the plan's quantized computation (else the FP model)."""
        if self.executor_kind in ("onnxruntime", "tensorrt"):
            return self._workdir.manifest_json.is_file()
        return self.plan is not None

    def plan_models(self) -> dict:
        """``{variant: model}`` of the torch backend: the plan applied to copies of the model (built once)."""
        from qc_compile.runtime.runners import plan_models

        if "plan_models" not in self._runner_cache:
            self._runner_cache["plan_models"] = plan_models(self.loaded, self.plan, self.device)
        return self._runner_cache["plan_models"]

    def build_policy(self, policy: Any, overrides: Mapping[str, Any] | None, seed: int):
        from qc_compile.runtime.policies import get_policy, plan_policy_name

        if policy is None:
            policy = plan_policy_name(self.plan) or "none"
        if isinstance(policy, str):
            return policy, get_policy(policy, overrides, self.plan, seed=seed)
        if overrides:
            raise UserError("overrides apply to a policy given by name, not to a policy object.")
        return getattr(policy, "name", type(policy).__name__), policy

    def fp_reference(self, prompts: list[str], settings, progress: bool = False) -> tuple[torch.Tensor, float]:
        """The FP videos (policy none) for these prompts and settings, cached per pipeline."""
        return self._fp_run(prompts, settings, progress)[:2]

    @torch.no_grad()
    def _fp_run(self, prompts: list[str], settings, progress: bool = False, seeds: list[int] | None = None):
        key = (tuple(prompts), settings, None if seeds is None else tuple(seeds))
        if key not in self._fp_cache:
            start = time.perf_counter()
            videos, sample = generate(self.loaded, prompts, settings,
                                      executor=self.make_executor(settings, quantized=False), progress=progress,
                                      seeds=seeds)
            while len(self._fp_cache) >= self.fp_cache_size:  # bounded: a server runs many prompts
                self._fp_cache.pop(next(iter(self._fp_cache)))
            self._fp_cache[key] = (videos, time.perf_counter() - start, sample.steps)
        return self._fp_cache[key]

    def clear_cache(self) -> None:
        """Forget the cached FP reference runs."""
        self._fp_cache.clear()

    @torch.no_grad()  # local, not global: a library must not switch autograd off in its caller's process
    def __call__(self, prompt: str | Sequence[str], *, policy: Any = None, overrides: Mapping[str, Any] | None = None,
                 seed: int = 0, steps: int | None = None, cfg: float | None = None, reference: bool = False,
                 frames: int | None = None, height: int | None = None, width: int | None = None,
                 progress: bool = False, seeds: Sequence[int] | None = None) -> RunResult:
        """Generate one video per prompt under ``policy`` (a name such as ``quantcache``, ``hlc+srap``, or a policy
        object; default: the plan's policy, else none). ``reference=True`` also runs the FP model with the same
        seed for PSNR/SSIM and the caption-checker drop. ``seeds`` gives each prompt its own seed (default: prompt k
        uses ``seed + k``); ``seed`` then only seeds the policy."""
        from qc_compile.runtime.policies import NoPolicy
        from qc_compile.runtime.trace import unit_flops

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = None if seeds is None else [int(s) for s in seeds]
        from qc_compile.prompts import check_prompts

        prompts = check_prompts(prompts)
        if self.loaded.text_encoder is not None:
            from qc_compile.models.caption_encoder import CaptionTokenizer

            CaptionTokenizer().encode(prompts, max_length=self.loaded.config.model_max_length)
        settings = self.settings(seed, steps, cfg, frames=frames, height=height, width=width)
        if self.decoder is not None:
            self.decoder.check_geometry(self.loaded.config, settings.frames, settings.height, settings.width)
        name, pol = self.build_policy(policy, overrides, seed)
        executor = self.make_executor(settings)
        missing = set(getattr(pol, "requires", ())) - set(executor.supports)
        if missing:
            raise UserError(f"policy {name} needs executor features {sorted(missing)} (sub-block caches / in-step "
                            f"gates) that the {self.executor_kind} executor does not have; run it with --executor "
                            "torch.")
        if isinstance(pol, NoPolicy) and not self.quantized and not self.fast:
            videos, seconds, steps_rec = self._fp_run(prompts, settings, progress, seeds)  # its own reference
        else:
            start = time.perf_counter()
            videos, sample = generate(self.loaded, prompts, settings, policy=pol, executor=executor,
                                      progress=progress, seeds=seeds)
            seconds, steps_rec = time.perf_counter() - start, sample.steps
        costs = unit_flops(self.loaded.config, executor.g)
        desc = pol.describe() if hasattr(pol, "describe") else {"name": name}
        desc = dict(desc, spec=name)
        res = RunResult(prompts=prompts, videos=videos, policy=name, policy_config=desc, seed=seed,
                        settings={"model": self.loaded.config.name, "steps": settings.steps, "cfg": settings.cfg,
                                  "seed": settings.seed, "frames": settings.frames, "height": settings.height,
                                  "width": settings.width, "fps": settings.fps, "shift": settings.shift,
                                  "device": self.device, "work_dir": str(self.work) if self.work else None,
                                  "plan": bool(self.plan is not None), "quantized": self.quantized},
                        unit_names=tuple(executor.unit_names), steps=steps_rec, costs=costs, seconds=seconds,
                        executor=self.executor_kind)
        hist = getattr(pol, "history", None)
        if hist:
            res.extra["gate_history"] = [{k: (None if isinstance(v, float) and (math.isinf(v) or math.isnan(v))
                                              else v) for k, v in h.items()} for h in hist]
        if reference:
            res.fp_videos, res.fp_seconds = self._fp_run(prompts, settings, progress, seeds)[:2]
        from qc_compile.runtime.parallel import current_mesh

        mesh = current_mesh()
        if mesh is not None:
            res.extra["parallel"] = parallel_record(mesh, steps_rec)
        # latents -> frames in [-1, 1]; in a --gpus run rank 0 alone writes and compares, so it alone decodes
        if self.decoder is not None and (mesh is None or mesh.rank == 0):
            res.decode_with(self.decoder)
        return res
