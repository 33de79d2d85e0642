"""The user-facing runtime API: ``Pipeline`` and ``RunResult``.

    from qc_compile.runtime import Pipeline

    pipe = Pipeline.from_pretrained("qc-ref")                 # FP model, torch executor (no compilation needed)
    pipe = Pipeline("WORK")                                   # a work dir: its model, plan thresholds, executors
    res = pipe("a red circle moving left on a black background", policy="quantcache", seed=0, reference=True)
    res.compute_fraction, res.metrics()["reference"]["psnr_db"]
    res.save("runs/demo")                                     # video.mp4, video.png, trace.json, metrics.json, decisions.png

``qc-compile run`` is a thin shell over this class.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from qc_compile.errors import UserError

METRICS_SCHEMA_VERSION = 1
EXECUTORS = ("torch", "onnxruntime", "tensorrt")


@dataclass
class RunResult:
    """One run: the videos, every decision, and (with ``reference=True``) fidelity to the FP run."""

    prompts: list[str]
    videos: torch.Tensor  # (n, C, T, H, W) float32, CPU
    policy: str
    policy_config: dict
    seed: int
    settings: dict
    unit_names: tuple[str, ...]
    steps: list  # sampler StepRecords
    costs: dict
    seconds: float
    executor: str = "torch"
    fp_videos: torch.Tensor | None = None
    fp_seconds: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def compute_fraction(self) -> float:
        from qc_compile.runtime.trace import compute_fractions

        return compute_fractions(self.steps, self.unit_names, self.costs)[0]

    @property
    def flop_fraction(self) -> float:
        from qc_compile.runtime.trace import compute_fractions

        return compute_fractions(self.steps, self.unit_names, self.costs)[1]

    def trace(self) -> dict:
        from qc_compile.runtime.trace import build_trace

        return build_trace(policy=self.policy_config, unit_names=self.unit_names, steps=self.steps,
                           settings=dict(self.settings, executor=self.executor), prompts=self.prompts,
                           costs=self.costs, seconds=self.seconds, extra=self.extra or None)

    def checker(self, videos: torch.Tensor | None = None) -> dict | None:
        """Caption-checker accuracy of ``videos`` (default: this run's) against the prompts; None if a prompt is not
        a shapes caption (the checker reads only qc-ref's domain)."""
        from qc_compile.metrics.caption_checker import score_videos

        try:
            s = score_videos(list(self.videos if videos is None else videos), self.prompts)
        except UserError:
            return None
        out = {k: s[k] for k in ("n", "color", "shape", "direction", "background", "all")}
        out["per_video"] = [r.all_ok for r in s["results"]]
        return out

    def metrics(self) -> dict:
        m: dict[str, Any] = {
            "schema_version": METRICS_SCHEMA_VERSION, "policy": self.policy, "executor": self.executor,
            "seed": self.seed, "steps": self.settings.get("steps"), "prompts": self.prompts,
            "compute_fraction": self.compute_fraction, "flop_fraction": self.flop_fraction,
            "seconds": round(self.seconds, 3), "seconds_per_video": round(self.seconds / max(1, len(self.prompts)), 3),
            "checker": self.checker(),
            "note": "seconds are wall-clock of the torch run on this machine (CPU unless the device says otherwise); "
                    "compute_fraction counts block-unit evaluations, flop_fraction block FLOPs.",
        }
        if self.fp_videos is not None:
            from qc_compile.metrics.fidelity import compare_videos

            per = []
            for k, (v, r) in enumerate(zip(self.videos, self.fp_videos)):
                c = compare_videos(v, r)
                per.append({"prompt": self.prompts[k], "psnr_db": c["psnr_db"], "ssim": c["ssim"]})
            fp_check = self.checker(self.fp_videos)
            ref = {
                "what": "FP run (policy none) of the same model, prompts, seed and settings",
                "fp_seconds": None if self.fp_seconds is None else round(self.fp_seconds, 3),
                "psnr_db": sum(p["psnr_db"] for p in per) / len(per),
                "ssim": sum(p["ssim"] for p in per) / len(per),
                "psnr_db_min": min(p["psnr_db"] for p in per),
                "per_video": per,
                "checker_fp": fp_check,
            }
            if fp_check is not None and m["checker"] is not None:
                ref["checker_drop_points"] = 100.0 * (fp_check["all"] - m["checker"]["all"])
            m["reference"] = ref
        return m

    def save(self, run_dir: str | Path) -> dict[str, Path]:
        """Write video(s) (.mp4 + PNG strip), trace.json, metrics.json and decisions.png into ``run_dir``."""
        from qc_compile.artifacts import write_json_atomic
        from qc_compile.runtime.trace import plot_decisions
        from qc_compile.video_io import write_mp4, write_png_strip

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        fps = int(self.settings.get("fps", 8))
        for k, v in enumerate(self.videos):
            stem = "video" if len(self.videos) == 1 else f"video_{k}"
            paths[f"{stem}.mp4"] = write_mp4(run_dir / f"{stem}.mp4", v, fps=fps)
            paths[f"{stem}.png"] = write_png_strip(run_dir / f"{stem}.png", v)
        trace = self.trace()
        write_json_atomic(run_dir / "trace.json", trace)
        paths["trace.json"] = run_dir / "trace.json"
        write_json_atomic(run_dir / "metrics.json", self.metrics())
        paths["metrics.json"] = run_dir / "metrics.json"
        plot_decisions(trace, run_dir / "decisions.png")
        paths["decisions.png"] = run_dir / "decisions.png"
        return paths


def _executor_available(kind: str) -> None:
    if kind not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}.")
    if kind == "tensorrt":
        from importlib.util import find_spec

        if find_spec("tensorrt") is None and find_spec("tensorrt_rtx") is None:
            raise UserError("--executor tensorrt: TensorRT is not installed on this machine (neither `tensorrt` nor "
                            "`tensorrt_rtx` imports). Engines run on a server with TensorRT; here use --executor "
                            "torch or onnxruntime.")


class Pipeline:
    """Text-to-video with per-step policies. ``Pipeline(work_dir)`` uses a work dir (model.json, plan.json, graphs);
    ``Pipeline.from_pretrained(name)`` the FP model directly with the torch executor."""

    def __init__(self, work_dir: str | Path | None = None, *, model: str | None = None,
                 checkpoint: str | Path | None = None, device: str = "cpu", executor: str = "torch",
                 random_weights: bool = False, loaded: Any = None, fast: bool = False) -> None:
        from qc_compile.runtime.pipeline import resolve_device

        _executor_available(executor)
        self.device = resolve_device(device)
        self.fast = bool(fast)
        if self.fast:  # the fast path (runtime/fast_executor.py): bf16 + the qc:: CUDA kernels
            from qc_compile.runtime.fast_executor import check_fast_available

            if executor != "torch":
                raise UserError(f"--fast runs the torch executor's fast path; it does not combine with --executor "
                                f"{executor}. Drop one of the two.")
            check_fast_available(self.device)
        self._fast_model = None
        if executor == "onnxruntime" and self.device != "cpu":
            raise UserError("--executor onnxruntime runs on the CPU here; use --device cpu.")
        if executor == "tensorrt" and not self.device.startswith("cuda"):
            raise UserError("--executor tensorrt runs engines on a CUDA GPU: add --device cuda (on a machine with an "
                            "NVIDIA GPU and the TensorRT flavour the engines were built with).")
        self.executor_kind = executor
        self.work = Path(work_dir) if work_dir is not None else None
        self.plan = None
        self.video_size: tuple[int, int, int] | None = None
        if self.work is not None:
            from qc_compile.workdir import WorkDir, load_model_for, read_model_info

            wd = WorkDir(self.work)
            info = read_model_info(wd)
            if model is not None and model != info.name:
                raise UserError(f"--model {model}: work dir {self.work} holds model {info.name!r}.")
            self.loaded = load_model_for(info, device=self.device)
            self.video_size = info.video_size
            if wd.plan_json.is_file():
                from qc_compile.plan import load_plan

                self.plan = load_plan(wd.plan_json, model_info=info)
            self._workdir = wd
        else:
            if executor != "torch":
                raise UserError(f"--executor {executor} runs the graphs of a work dir; give WORK (from "
                                "`qc-compile export`), or use --executor torch.")
            if loaded is not None:
                self.loaded = loaded
            else:
                from qc_compile.models import load_model

                self.loaded = load_model(model or "qc-ref", checkpoint, device=self.device,
                                         random_weights=random_weights)
        self._fp_cache: dict[tuple, tuple[torch.Tensor, float]] = {}
        self._plan_models: dict | None = None

    @classmethod
    def from_pretrained(cls, name: str = "qc-ref", checkpoint: str | Path | None = None, *, device: str = "cpu",
                        random_weights: bool = False, fast: bool = False) -> "Pipeline":
        return cls(None, model=name, checkpoint=checkpoint, device=device, random_weights=random_weights, fast=fast)

    # ------------------------------------------------------------------------------------------------ internals
    def settings(self, seed: int, steps: int | None, cfg: float | None, **kw):
        from qc_compile.runtime.pipeline import GenerationSettings

        if self.video_size is not None:  # a work dir's graphs have the geometry they were exported with
            fixed = dict(zip(("frames", "height", "width"), self.video_size))
            for k, v in kw.items():
                if v is not None and k in fixed and v != fixed[k]:
                    raise UserError(f"--{k} {v}: work dir {self.work} was exported for {k} {fixed[k]}; re-export "
                                    "for another size.")
            kw = {**kw, **fixed}
        return GenerationSettings.defaults(self.loaded, steps=steps, cfg=cfg, seed=seed, **kw)

    def make_executor(self, settings, quantized: bool = True):
        """The executor for a run: with a plan (and ``quantized``), the plan's computation — the Q/DQ graphs of the
        build in onnxruntime, or fake-quantized torch copies per precision variant (``fp`` = the FP model);
        ``quantized=False`` gives the FP model (the reference)."""
        from qc_compile.models.stdit3 import Geometry
        from qc_compile.runtime.executor import TorchExecutor

        if self.executor_kind == "onnxruntime":
            from qc_compile.runtime.ort_executor import OrtExecutor

            stage = "q" if quantized and self._workdir.manifest_json.is_file() else "fp"
            return OrtExecutor.from_workdir(self._workdir, stage=stage)
        if self.executor_kind == "tensorrt" and quantized:
            from qc_compile.runtime.trt_executor import TrtExecutor

            return TrtExecutor.from_workdir(self._workdir, device=self.device)
        g = Geometry.for_model(self.loaded.config, settings.frames, settings.height, settings.width)
        if self.fast and quantized:  # the FP reference (quantized=False) stays the plain fp32 torch run
            from qc_compile.runtime.fast_executor import FastExecutor

            if self._fast_model is None:
                import copy

                m = self.loaded.model
                self._fast_model = m if m.dtype == torch.bfloat16 else copy.deepcopy(m).to(torch.bfloat16)
            return FastExecutor(self._fast_model, g, self.plan)
        if quantized and self.plan is not None:
            models = self.plan_models()
            return TorchExecutor(models["default"], g, variant_models=models)
        return TorchExecutor(self.loaded.model, g)

    @property
    def quantized(self) -> bool:
        """Whether runs execute the plan's quantized computation (else the FP model)."""
        if self.executor_kind in ("onnxruntime", "tensorrt"):
            return self._workdir.manifest_json.is_file()
        return self.plan is not None

    def plan_models(self) -> dict:
        """``{variant: STDiT3}``: the plan applied to copies of the model (built once; fake quantization, the same
        computation as the Q/DQ graphs), plus ``fp`` (the unquantized model) unless the plan defines it."""
        if self._plan_models is None:
            import copy

            from qc_compile.torch_package import apply_plan, package_tensors

            tensors = package_tensors(self.loaded.model, self.plan)
            models = {v: apply_plan(copy.deepcopy(self.loaded), self.plan, tensors, variant=v,
                                    device=self.device).model for v in self.plan.variant_names}
            models.setdefault("fp", self.loaded.model)
            self._plan_models = models
        return self._plan_models

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

    def _fp_run(self, prompts: list[str], settings, progress: bool = False, seeds: list[int] | None = None):
        from qc_compile.runtime.pipeline import generate

        key = (tuple(prompts), settings, None if seeds is None else tuple(seeds))
        if key not in self._fp_cache:
            start = time.perf_counter()
            videos, sample = generate(self.loaded, prompts, settings,
                                      executor=self.make_executor(settings, quantized=False), progress=progress,
                                      seeds=seeds)
            self._fp_cache[key] = (videos, time.perf_counter() - start, sample.steps)
        return self._fp_cache[key]

    def __call__(self, prompt: str | Sequence[str], *, policy: Any = None, overrides: Mapping[str, Any] | None = None,
                 seed: int = 0, steps: int | None = None, cfg: float | None = None, reference: bool = False,
                 frames: int | None = None, height: int | None = None, width: int | None = None,
                 progress: bool = False, seeds: Sequence[int] | None = None) -> RunResult:
        """Generate one video per prompt under ``policy`` (a name such as ``quantcache``, ``hlc+srap``, or a policy
        object; default: the plan's policy, else none). ``reference=True`` also runs the FP model with the same
        seed for PSNR/SSIM and the caption-checker drop. ``seeds`` gives each prompt its own seed (default: prompt k
        uses ``seed + k``); ``seed`` then only seeds the policy."""
        from qc_compile.runtime.pipeline import generate
        from qc_compile.runtime.trace import unit_flops

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = None if seeds is None else [int(s) for s in seeds]
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UserError("give at least one non-empty prompt.")
        if self.loaded.text_encoder is not None:
            from qc_compile.models.caption_encoder import CaptionTokenizer

            CaptionTokenizer().encode(prompts, max_length=self.loaded.config.model_max_length)
        settings = self.settings(seed, steps, cfg, frames=frames, height=height, width=width)
        name, pol = self.build_policy(policy, overrides, seed)
        executor = self.make_executor(settings)
        missing = set(getattr(pol, "requires", ())) - set(getattr(executor, "supports", ()))
        if missing:
            raise UserError(f"policy {name} needs executor features {sorted(missing)} (sub-block caches / in-step "
                            f"gates) that the {self.executor_kind} executor does not have; run it with --executor "
                            "torch.")
        torch.set_grad_enabled(False)
        if type(pol).__name__ in ("NoPolicy", "ComputeAll") and not self.quantized and not self.fast:
            videos, seconds, steps_rec = self._fp_run(prompts, settings, progress, seeds)  # its own reference
        else:
            start = time.perf_counter()
            videos, sample = generate(self.loaded, prompts, settings, policy=pol, executor=executor,
                                      progress=progress, seeds=seeds)
            seconds, steps_rec = time.perf_counter() - start, sample.steps
        g = executor.g if hasattr(executor, "g") else None
        costs = unit_flops(self.loaded.config, g) if g is not None else {}
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
        return res
