"""VC (Q&C §3.2): per-step, per-channel variance-compensation factors fitted in closed form on calibration data.

The runtime (runtime/policies/vc.py) applies x̃_t = μ_t + K_t ⊙ (x̂_t − μ_t) after each step, μ_t the per-sample,
per-channel mean of the quantized (and cached) latent x̂_t. Here the quantized + cached trajectory is run on the
calibration prompts *with the factors fitted so far applied* (so step t is fitted on the latent the runtime will
actually see) and, at each step, per channel c, K minimises MSE(x̃, x′) + rQNSR(x̃, x′)² against the FP latent x′:

    K = [Σ (x′−μ)d + Σ (x′−μ)d / x′²] / [Σ d² + Σ d² / x′²],   d = x̂ − μ

(setting the derivative of Σ(μ + K d − x′)² + Σ((μ + K d − x′)/x′)² to zero; the cited closed form, with its
second terms written consistently). |x′| is floored at half its channel's standard deviation so near-zero reference
values do not dominate the relative term, and K is clipped to [0.5, 2].
"""

from __future__ import annotations

import torch

K_RANGE = (0.5, 2.0)


def closed_form_k(xq: torch.Tensor, xref: torch.Tensor) -> torch.Tensor:
    """xq, xref: (n, C, ...) -> K (C,)."""
    dims = tuple(range(2, xq.dim()))
    mu = xq.mean(dim=dims, keepdim=True)
    d = xq - mu
    e = xref - mu
    floor = 0.5 * xref.transpose(0, 1).reshape(xref.shape[1], -1).std(dim=1).view(1, -1, *([1] * len(dims)))
    xr = torch.where(xref.abs() < floor, floor * torch.where(xref < 0, -1.0, 1.0), xref)
    red = (0,) + dims
    num = (e * d).sum(red) + (e * d / xr ** 2).sum(red)
    den = (d * d).sum(red) + (d * d / xr ** 2).sum(red)
    return (num / den.clamp_min(1e-12)).clamp(*K_RANGE)


class _FitVC:
    """Wraps a runtime policy; its post_step fits and applies K for the step against the FP latent."""

    def __init__(self, policy, fp_latents: torch.Tensor) -> None:
        self.policy = policy
        self.name = getattr(policy, "name", "policy")
        self.fp = fp_latents  # (S, n, C, ...)
        self.k: list[torch.Tensor] = []

    def reset(self, units, num_steps):
        self.policy.reset(units, num_steps)

    def decide(self, step):
        return self.policy.decide(step)

    def observe(self, step, stats):
        self.policy.observe(step, stats)

    @property
    def requires(self):
        return getattr(self.policy, "requires", frozenset())

    def post_step(self, z, step):
        ref = self.fp[step.index].to(z.device)
        k = closed_form_k(z.float(), ref.float())
        self.k.append(k.cpu())
        mu = z.mean(dim=tuple(range(2, z.dim())), keepdim=True)
        return mu + k.view(1, -1, *([1] * (z.dim() - 2))).to(z.device) * (z - mu)


def fit(loaded, plan, captions, settings, fp_latents: torch.Tensor, policy_spec: str = "hlc",
        variant_models: dict | None = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """K (steps, C) fitted on the quantized + ``policy_spec`` trajectory; ``fp_latents`` (S, n, C, ...) the FP
    latent after each step for the same prompts and noise."""
    import copy

    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.policies import get_policy
    from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig, noise
    from qc_compile.torch_package import apply_plan, package_tensors

    if variant_models is None:
        tensors = package_tensors(loaded.model, plan)
        dev = str(loaded.model.x_embedder.proj.weight.device)
        variant_models = {v: apply_plan(copy.deepcopy(loaded), plan, tensors, variant=v, device=dev).model
                          for v in plan.variant_names}
        variant_models.setdefault("fp", loaded.model)
    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    pol = get_policy(policy_spec, None, plan, seed=settings.seed)
    wrapped = _FitVC(pol, fp_latents)
    c = loaded.config
    sampler = RFlowSampler(SamplerConfig(num_steps=settings.steps, cfg_scale=settings.cfg,
                                         use_timestep_transform=c.use_timestep_transform, shift=settings.shift))
    n = captions.y.shape[0]
    dev = loaded.model.x_embedder.proj.weight.device
    shape = (c.in_channels, g.frames, g.height, g.width)
    z = torch.stack([noise(shape, settings.seed + k) for k in range(n)]).to(dev)
    ex = torch_executor(variant_models["default"], g, variant_models=variant_models)
    res = sampler.sample(ex, z, captions.y, captions.mask, captions.y_null, settings.fps,
                         video_size=(settings.frames, settings.height, settings.width), policy=wrapped,
                         progress=progress)
    k = torch.stack(wrapped.k)
    computed = sum(1 for s in res.steps for d in s.decisions.values() if d.get("action") == "compute")
    return k, {"policy": policy_spec, "prompts": n, "steps": len(res.steps), "decisions_compute": computed}
