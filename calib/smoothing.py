"""Channel balancing: a SmoothQuant strength searched per layer, and a Hadamard rotation where outliers remain.

For every linear whose activations are quantized: s_j = max|X_j|^α / max|W_j|^(1−α) for α in ``ALPHAS`` (or no
smoothing), each scored by the error of its unit's output (a block's residual) with only this layer quantized in its
plan formats (weight of W·diag(s), activation x/s with the static scale from the calibrated per-channel maxima); the
best wins — one α per layer, not one global α. ``cross_attn.kv_linear`` layers share one vector (it folds into
``y_proj.fc2``, read by every block): one α for all of them, chosen on the sum of their errors, s from the shared
input's maxima and the largest weight column over all of them. Then, where the smoothed input still has channel
outliers (max/median of the channel maxima > ``ROT_OUTLIER``), a blocked Hadamard rotation (largest power of two ≤
128 dividing K) is tried and kept if it lowers the error (scale from the rotated maxima on the replay samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from qc_compile.calib.replay import Replay, rel_err
from qc_compile.models.units import is_block
from qc_compile.plan import LinearPlan, act_scale_for

ALPHAS = (0.25, 0.5, 0.75)
ROT_OUTLIER = 8.0


@dataclass
class Balance:
    alpha: dict[str, float | None] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    rotation: dict[str, int] = field(default_factory=dict)
    act_amax: dict[str, float] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)


def smoothing_vector(ch_amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    s = ch_amax.float().clamp_min(1e-5) ** alpha / wmax.float().clamp_min(1e-5) ** (1.0 - alpha)
    s = s / s.log().mean().exp()  # geometric mean 1: keeps the magnitudes of x and W comparable
    return s.clamp(1e-4, 1e4)


def rotation_block(k: int) -> int:
    b = 1
    while b * 2 <= 128 and k % (b * 2) == 0:
        b *= 2
    return b


def _install(mod, e: LinearPlan, s: torch.Tensor | None, rot: int | None):
    from qc_compile.torch_package import dequantize, quantize, transform_activation, transformed_weight

    orig = mod.weight.data
    ee = LinearPlan(unit=e.unit, weight=e.weight, rotation=rot)
    w = transformed_weight(orig, ee, None if s is None else s.to(orig.device).float())
    if e.weight != "bf16":
        w = dequantize(quantize(w, e.weight), e.weight)
    mod.weight.data = w.to(orig.device, orig.dtype)

    def hook(module, args):
        return (transform_activation(args[0], e, s, rot),) + tuple(args[1:])
    h = mod.register_forward_pre_hook(hook)

    def undo():
        h.remove()
        mod.weight.data = orig
    return undo


def _unit_error(rep: Replay, unit: str, model) -> float:
    out = rep.unit_output(unit, model)
    if not is_block(unit):
        ref = rep.unit_output(unit)
        return rel_err(out, ref)
    return rel_err(out - rep.block_in[unit], rep.unit_output(unit) - rep.block_in[unit])


def _rotated_amax(model, mod, replays: Sequence[Replay], unit: str, s: torch.Tensor | None, rot: int) -> float:
    from qc_compile.torch_package import _hadamard_rows

    seen = []

    def hook(module, args):
        x = args[0].float()
        if s is not None:
            x = x / s.to(x.device)
        seen.append(float(_hadamard_rows(x.reshape(-1, x.shape[-1]), rot).abs().max()))
    h = mod.register_forward_pre_hook(hook)
    try:
        for rep in replays:
            rep.unit_output(unit, model)
    finally:
        h.remove()
    return max(seen)


def search(loaded, replays: Sequence[Replay], entries: dict[str, LinearPlan], ch_amax: dict[str, torch.Tensor],
           *, alphas: Sequence[float] = ALPHAS, rotate: bool = True) -> Balance:
    """``entries``: the default-variant plan entries; ``ch_amax``: name -> per-channel |x| max over the calibration
    samples. Only linears with quantized activations are balanced."""
    model = loaded.model
    modules = dict(model.named_modules())
    out = Balance()

    def score(names: list[str], vec: dict[str, torch.Tensor | None], rot: dict[str, int | None],
              amax: dict[str, float]) -> float:
        tot = 0.0
        for n in names:
            e = entries[n]
            ee = LinearPlan(unit=e.unit, weight=e.weight, activation=e.activation, act_amax=amax[n])
            ee.act_scale = act_scale_for(e.activation, amax[n])
            undo = _install(modules[n], ee, vec[n], rot[n])
            try:
                with torch.no_grad():
                    tot += sum(_unit_error(r, e.unit, model) for r in replays) / len(replays)
            finally:
                undo()
        return tot

    quant = [n for n, e in entries.items() if e.activation != "bf16"]
    kv = [n for n in quant if n.endswith("cross_attn.kv_linear")]
    groups = [[n] for n in quant if n not in kv] + ([kv] if kv else [])
    for names in groups:
        x = torch.stack([ch_amax[n] for n in names]).amax(0)
        wmax = torch.stack([modules[n].weight.detach().float().abs().amax(0).cpu() for n in names]).amax(0)
        base_amax = {n: float(ch_amax[n].max()) for n in names}
        best = (score(names, {n: None for n in names}, {n: None for n in names}, base_amax), None, None)
        errs = {"none": best[0]}
        for a in alphas:
            s = smoothing_vector(x, wmax, a)
            amax = {n: float((ch_amax[n] / s).max()) for n in names}
            err = score(names, {n: s for n in names}, {n: None for n in names}, amax)
            errs[f"alpha={a}"] = err
            if err < best[0]:
                best = (err, a, s)
        _, a, s = best
        for n in names:
            out.alpha[n] = a
            out.errors[n] = errs
            if s is not None:
                out.vectors[n] = s
            out.act_amax[n] = float((ch_amax[n] / (s if s is not None else 1.0)).max())
        if not rotate or names is kv:
            continue
        n = names[0]
        k = ch_amax[n].numel()
        b = rotation_block(k)
        xs = ch_amax[n] / (s if s is not None else 1.0)
        ratio = float(xs.max() / xs.median().clamp_min(1e-12))
        if b < 2 or ratio <= ROT_OUTLIER:
            continue
        ram = _rotated_amax(model, modules[n], replays, entries[n].unit, s, b)
        err = score([n], {n: s}, {n: b}, {n: ram})
        errs[f"rotation={b}"] = err
        if err < best[0]:
            out.rotation[n] = b
            out.act_amax[n] = ram
    return out
