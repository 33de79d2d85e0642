"""Open-Sora 1.2 rectified-flow sampling (RFLOW) with classifier-free guidance and step-policy hooks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from qc_compile.runtime.policy import STAT_NAMES, StepInfo, StepPolicy, StepStats, UnitDecision, decode_action
from qc_compile.runtime.protocols import Conditioning, Executor, caption_cut
from qc_compile.runtime.schedule import base_timesteps, sampling_timesteps, step_sizes, timestep_transform


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 30
    cfg_scale: float = 7.0
    use_timestep_transform: bool = True
    num_timesteps: int = 1000
    transform_scale: float = 1.0
    shift: float | None = None  # fixed transform ratio instead of the resolution formula (pixel-space models)


@dataclass
class StepRecord:
    index: int
    t: float
    decisions: dict[str, dict]
    stats: dict[str, dict[str, float]]
    seconds: float


@dataclass
class SampleResult:
    z: torch.Tensor  # (n, C, T, H, W) final sample
    steps: list[StepRecord] = field(default_factory=list)

    def compute_fraction(self, unit_names: tuple[str, ...]) -> float:
        """Fraction of block-unit evaluations actually computed (:func:`~qc_compile.runtime.trace.compute_fractions`)."""
        from qc_compile.runtime.trace import compute_fractions

        return compute_fractions(self.steps, unit_names)[0]


def _record(d: UnitDecision, taken: float) -> dict:
    """A decision as recorded in the trace, with the action the executor actually took (its ``action`` statistic):
    a GATED decision shows what its gate chose (and ``gated: true``); a computation whose sub-blocks all came from
    the cache (FORA) shows as ``reuse``; ``parts`` lists the sub-blocks taken from the cache."""
    rec = {"action": decode_action(taken) or d.action.value, "variant": d.variant}
    if d.action.value == "gated":
        rec["gated"] = True
    if d.parts:
        rec["parts"] = list(d.parts)
    return rec


def raise_nonfinite(step: int, num_steps: int, units: tuple[str, ...], stats: torch.Tensor) -> None:
    """Stop sampling: the latent after ``step`` holds NaN/Inf. Names the unit that first produced a non-finite value,
    read from the step's statistics (a computed block's ``in_norm`` / ``res_norm``): a block whose input is finite
    but whose residual is not; a non-finite input to the first computed block means ``embed``; all finite means
    ``final`` or the CFG combination."""
    from qc_compile.runtime.policy import STAT_INDEX
    from qc_compile.validate import NonFiniteError

    culprit = None
    for j, u in enumerate(units[1:-1], start=1):
        i_n, r_n = float(stats[j, STAT_INDEX["in_norm"]]), float(stats[j, STAT_INDEX["res_norm"]])
        if math.isnan(i_n) and math.isnan(r_n):
            continue  # not computed this step (reused / pruned): no statistics
        if not math.isfinite(i_n):
            culprit = units[0]
        elif not math.isfinite(r_n):
            culprit = u
        if culprit:
            break
    culprit = culprit or f"{units[-1]} (or the CFG combination)"
    raise NonFiniteError(f"sampling stopped at step {step + 1} of {num_steps}: the latent holds NaN or Inf; the first "
                         f"unit with a non-finite output is {culprit}. The weights, the plan's scales or the options "
                         "(e.g. --cfg) drive the model out of range; check them (qc-compile compare WORK shows per-unit "
                         "errors).")


def noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial noise drawn on the CPU from the seed, so CPU and GPU runs start from the same tensor."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


class RFlowSampler:
    def __init__(self, config: SamplerConfig) -> None:
        self.config = config

    def timesteps(self, *, height: int, width: int, num_frames: int) -> list[float]:
        c = self.config
        if c.shift is not None:
            return [timestep_transform(t, c.shift, c.num_timesteps) for t in base_timesteps(c.num_steps,
                                                                                             c.num_timesteps)]
        return sampling_timesteps(c.num_steps, height=height, width=width, num_frames=num_frames,
                                  use_transform=c.use_timestep_transform, num_timesteps=c.num_timesteps,
                                  scale=c.transform_scale)

    @torch.no_grad()
    def sample(self, executor: Executor, z: torch.Tensor, y_cond: torch.Tensor, mask: torch.Tensor,
               y_null: torch.Tensor, fps: float, *, video_size: tuple[int, int, int],
               policy: StepPolicy | None = None, progress: bool = True,
               on_step: Callable[[StepRecord], None] | None = None) -> SampleResult:
        """Denoise ``z`` (n, C, T, H, W) from t=1000 to 0.

        ``y_cond`` (n, 1, L, Cy) and ``mask`` (n, L) are the caption features; ``y_null`` (n, 1, L, Cy) the null
        caption. The CFG batch is [cond; null] with the mask tiled, as in Open-Sora; ``video_size`` is
        (frames, height, width) in pixels for the timestep transform.
        """
        c = self.config
        if policy is None:
            from qc_compile.runtime.policies import NoPolicy

            policy = NoPolicy()
        n = z.shape[0]
        device = z.device
        frames, height, width = video_size
        ts = self.timesteps(height=height, width=width, num_frames=frames)
        dts = step_sizes(ts, c.num_timesteps)
        mask2 = torch.cat([mask, mask]).bool()
        cond = Conditioning(y=torch.cat([y_cond, y_null]).to(device), mask=mask2.to(device),
                            fps=torch.full((2 * n,), float(fps), device=device),
                            caption_cut=caption_cut(mask2))  # read once per video, before the first step
        units = executor.unit_names
        use_policy = getattr(executor, "use_policy", None)
        if use_policy is not None:  # the executor's statistics level follows what the policy reads
            use_policy(policy)
        executor.reset()
        policy.reset(units, len(ts))
        result = SampleResult(z=z)
        z = z.float()
        for i, (t, dt) in enumerate(tqdm(list(zip(ts, dts)), desc="sampling", unit="step", disable=not progress,
                                         leave=False)):
            start = time.perf_counter()
            info = StepInfo(index=i, num_steps=len(ts), t=t, dt=dt, unit_names=units)
            decisions: dict[str, UnitDecision] = dict(policy.decide(info))
            z_in = torch.cat([z, z])
            timestep = torch.full((2 * n,), t, device=device)
            v, stats_dev = executor.step(z_in, timestep, cond, decisions)
            v = v[:, : z.shape[1]].float()  # pred_sigma models: channels past C_in are ignored
            v_c, v_u = v.chunk(2)
            z = z + (v_u + c.cfg_scale * (v_c - v_u)) * dt
            post_step = getattr(policy, "post_step", None)
            if post_step is not None:  # e.g. variance compensation of the latent after each step
                z = post_step(z, info)
            # the one device-to-host copy per step, with the latent's finite flag packed in
            packed = torch.cat([stats_dev.reshape(-1).float(), torch.isfinite(z).all().float().reshape(1)]).cpu()
            stats_host = packed[:-1].view(stats_dev.shape)
            if not packed[-1]:
                if getattr(executor, "stats_level", None) == "none":  # nothing measured: re-run the step measuring
                    executor.stats_level = "full"  # (failure path only) so the error can name the unit
                    try:
                        stats_host = executor.step(z_in, timestep, cond, decisions)[1].float().cpu()
                    finally:
                        executor.stats_level = "none"
                raise_nonfinite(i, len(ts), units, stats_host)
            stats = StepStats(units, {u: {s: float(stats_host[j, k]) for k, s in enumerate(STAT_NAMES)
                                          if not math.isnan(float(stats_host[j, k]))}
                                      for j, u in enumerate(units)})
            policy.observe(info, stats)
            rec = StepRecord(i, t, {u: _record(d, stats.get(u, "action")) for u, d in decisions.items()},
                             stats.values, time.perf_counter() - start)
            result.steps.append(rec)
            if on_step:
                on_step(rec)
        result.z = z
        return result
