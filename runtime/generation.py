"""Text-to-video generation with a loaded model: settings, initial noise and the sampling call shared by
`generate`, calibration, evaluation and :class:`~qc_compile.runtime.pipeline.Pipeline`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qc_compile.errors import UserError
from qc_compile.models import LoadedModel
from qc_compile.models.stdit3 import Geometry
from qc_compile.runtime.policy import StepPolicy
from qc_compile.runtime.protocols import Executor
from qc_compile.runtime.sampler import RFlowSampler, SampleResult, SamplerConfig, noise


@dataclass(frozen=True)
class GenerationSettings:
    steps: int
    cfg: float
    seed: int
    frames: int
    height: int
    width: int
    fps: int
    shift: float | None = None

    @classmethod
    def defaults(cls, loaded: LoadedModel, **overrides) -> "GenerationSettings":
        c = loaded.config
        base = dict(steps=c.default_steps, cfg=c.default_cfg, seed=0, frames=c.default_frames,
                    height=c.default_height, width=c.default_width, fps=c.default_fps, shift=c.timestep_shift)
        base.update({k: v for k, v in overrides.items() if v is not None})
        from qc_compile.validate import check_cfg, check_seed, check_steps, check_video_size

        base["steps"], base["cfg"], base["seed"] = (check_steps(base["steps"]), check_cfg(base["cfg"]),
                                                    check_seed(base["seed"]))
        base["frames"], base["height"], base["width"] = check_video_size(base["frames"], base["height"],
                                                                         base["width"])
        return cls(**base)


def resolve_device(device: str) -> str:
    """Validate a --device value, with a clear message when CUDA is asked for on a machine without it."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this machine has no CUDA GPU visible to torch "
                            f"(torch {torch.__version__}); use --device cpu.")
        return device
    if device != "cpu":
        raise UserError(f"--device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}.")
    return device


def initial_noise(loaded: LoadedModel, settings: GenerationSettings, n: int,
                  seeds: list[int] | None = None) -> torch.Tensor:
    """Per-prompt noise: prompt k uses ``seeds[k]`` (default seed + k), so a prompt's starting noise does not depend
    on what else is in the batch (a server batches requests that each carry their own seed)."""
    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    shape = (loaded.config.in_channels, g.frames, g.height, g.width)
    if seeds is not None and len(seeds) != n:
        raise UserError(f"give one seed per prompt: {n} prompts, {len(seeds)} seeds.")
    if seeds is not None:
        from qc_compile.validate import check_seed

        seeds = [check_seed(s, f"seed of prompt {k + 1}") for k, s in enumerate(seeds)]
    elif n > 1:
        from qc_compile.validate import check_seed

        check_seed(settings.seed + n - 1, f"seed + {n - 1} (the seed of the last prompt)")
    return torch.stack([noise(shape, settings.seed + k if seeds is None else int(seeds[k])) for k in range(n)])


def generate(loaded: LoadedModel, prompts: list[str], settings: GenerationSettings, *,
             policy: StepPolicy | None = None, executor: Executor | None = None,
             progress: bool = True, seeds: list[int] | None = None) -> tuple[torch.Tensor, SampleResult]:
    """Sample one video per prompt (prompt k from ``seeds[k]``, default seed + k): returns (videos (n, C, T, H, W)
    float32 on the CPU, the sampler's record)."""
    if not prompts:
        raise UserError("no prompts given.")
    y, mask = loaded.encode_prompts(prompts)
    return generate_from_features(loaded, y, mask, loaded.null_captions(len(prompts)), settings, policy=policy,
                                  executor=executor, progress=progress, seeds=seeds)


def generate_from_features(loaded: LoadedModel, y: torch.Tensor, mask: torch.Tensor, y_null: torch.Tensor,
                           settings: GenerationSettings, *, policy: StepPolicy | None = None,
                           executor: Executor | None = None, progress: bool = True,
                           seeds: list[int] | None = None) -> tuple[torch.Tensor, SampleResult]:
    """:func:`generate` from caption features already encoded (``y``, ``mask``, ``y_null``: one row per video), for
    callers that hold features, not prompts (calibration)."""
    c = loaded.config
    g = Geometry.for_model(c, settings.frames, settings.height, settings.width)
    device = loaded.model.x_embedder.proj.weight.device
    z = initial_noise(loaded, settings, y.shape[0], seeds).to(device)
    sampler = RFlowSampler(SamplerConfig(num_steps=settings.steps, cfg_scale=settings.cfg,
                                         use_timestep_transform=c.use_timestep_transform, shift=settings.shift))
    executor = executor or torch_executor(loaded.model, g)
    result = sampler.sample(executor, z, y.to(device), mask.to(device), y_null.to(device), settings.fps,
                            video_size=(settings.frames, settings.height, settings.width), policy=policy,
                            progress=progress)
    video = result.z.float().cpu()
    if c.space == "pixel":
        video = video.clamp(-1, 1)
    return video, result


def torch_executor(model, geometry, variant_models=None, stats: str | None = None):
    """The plain torch step executor for ``model`` (the FP computation unless ``variant_models`` say otherwise),
    sharded over the current parallel mesh if there is one."""
    from qc_compile.runtime.parallel import shard_runner
    from qc_compile.runtime.runners.torch import TorchRunner
    from qc_compile.runtime.step_executor import StepExecutor

    return StepExecutor(shard_runner(TorchRunner(model, geometry, variant_models), geometry), geometry, stats=stats)
