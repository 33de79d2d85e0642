"""AIGQ weight sensitivity (QuantCache Eq. 7): numerical error + perceptual distortion + temporal dynamics.

Per linear l, with *only l's weight* quantized to a probe format (the lowest weight format of the menu that fits it):

* numerical: relative L2 error of its unit's output on the calibration samples' FP unit inputs (for a block, of
  its residual output − input, which the skip connection would otherwise hide; for ``embed`` the mean over its
  outputs x/t/t_mlp/y; for ``final`` the CFG velocity);
* perceptual: relative L2 error of the x0 prediction (x0 = z_t + σ_t v, CFG applied) after running the rest of the
  model — a cheap, documented stand-in for "PSNR of the decoded video": the x0 prediction is what the step commits
  the video to, and it needs one forward instead of a whole sampling run per layer;
* temporal: coefficient of variation over steps of the layer's input |x| max (cond branch, mean over prompts) —
  layers whose ranges move a lot across steps are the ones a static scale serves badly.

Each term is divided by its maximum over layers, then S = 0.4·numerical + 0.4·perceptual + 0.2·temporal
(``WEIGHTS``): the two measured error terms carry the decision, temporal dynamics break ties between layers that
hurt equally at a favourable step but not at others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from qc_compile.calib.replay import Replay, rel_err

WEIGHTS = {"numerical": 0.4, "perceptual": 0.4, "temporal": 0.2}


@dataclass
class Sensitivity:
    probe_format: dict[str, str]
    numerical: dict[str, float]
    perceptual: dict[str, float]
    temporal: dict[str, float]
    score: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=lambda: dict(WEIGHTS))

    def to_dict(self) -> dict:
        return {"weights": self.weights, "probe_format": self.probe_format, "numerical": self.numerical,
                "perceptual": self.perceptual, "temporal": self.temporal, "score": self.score}


def quantized_weight(w: torch.Tensor, fmt: str) -> torch.Tensor:
    from qc_compile.torch_package import dequantize, quantize

    if fmt == "bf16":
        return w.detach().clone()
    return dequantize(quantize(w.detach().float(), fmt), fmt).to(device=w.device, dtype=w.dtype)


def temporal_dynamics(amax_grid: torch.Tensor) -> float:
    """(prompts, steps) |x| max -> CV over steps of the prompt-mean."""
    a = amax_grid.float().mean(0)
    return float(a.std(unbiased=False) / a.mean().clamp_min(1e-12)) if a.numel() > 1 else 0.0


def _embed_err(rep: Replay, model) -> float:
    emb = model.run_unit("embed", {"x": torch.cat([rep.z, rep.z]), "timestep": rep.timestep, "y": rep.cond.y,
                                   "mask": rep.cond.mask, "fps": rep.cond.fps}, rep.g)
    return sum(rel_err(emb[k], rep.emb[k]) for k in ("x", "t", "t_mlp", "y")) / 4.0


def measure(loaded, replays: Sequence[Replay], linears: Sequence, probe_format: dict[str, str],
            amax_grids: dict[str, torch.Tensor], *, progress: bool = True) -> Sensitivity:
    """``linears``: LinearInfo-like (name, unit); ``amax_grids``: name -> (prompts, steps) input |x| max."""
    modules = dict(loaded.model.named_modules())
    num, per, tem = {}, {}, {}
    ref_cache: dict = {}
    for li in tqdm(linears, desc="sensitivity", unit="linear", disable=not progress, leave=False):
        mod = modules[li.name]
        orig = mod.weight.data
        mod.weight.data = quantized_weight(orig, probe_format[li.name])
        try:
            n_err, p_err = [], []
            for rep in replays:
                with torch.no_grad():
                    if li.unit == "embed":
                        n_err.append(_embed_err(rep, loaded.model))
                        v = rep.forward(loaded.model, "embed")[3]
                    elif li.unit == "final":
                        v = rep._cfg(rep.unit_output("final", loaded.model))
                        n_err.append(rel_err(v, rep.v))
                    else:
                        out = rep.unit_output(li.unit, loaded.model)
                        key = (id(rep), li.unit)
                        if key not in ref_cache:
                            mod.weight.data = orig
                            ref_cache[key] = rep.unit_output(li.unit)
                            mod.weight.data = quantized_weight(orig, probe_format[li.name])
                        ref = ref_cache[key]
                        n_err.append(rel_err(out - rep.block_in[li.unit], ref - rep.block_in[li.unit]))
                        units = rep.units
                        nxt = units[units.index(li.unit) + 1]
                        v = rep.forward(loaded.model, nxt, out)[3]
                    p_err.append(rep.x0_error(v))
        finally:
            mod.weight.data = orig
        num[li.name] = sum(n_err) / len(n_err)
        per[li.name] = sum(p_err) / len(p_err)
        tem[li.name] = temporal_dynamics(amax_grids[li.name])
    sens = Sensitivity(dict(probe_format), num, per, tem)
    sens.score = combine(num, per, tem)
    return sens


def combine(num: dict[str, float], per: dict[str, float], tem: dict[str, float],
            weights: dict[str, float] = WEIGHTS) -> dict[str, float]:
    def norm(d):
        m = max(d.values()) if d else 0.0
        return {k: (v / m if m > 0 else 0.0) for k, v in d.items()}

    n, p, t = norm(num), norm(per), norm(tem)
    return {k: weights["numerical"] * n[k] + weights["perceptual"] * p[k] + weights["temporal"] * t[k] for k in num}
