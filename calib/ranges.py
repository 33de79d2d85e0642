"""Activation-range calibration: run the FP model through the sampler and record every linear's input ranges.

The simplest real calibration (issue 3): forward pre-hooks on every ``nn.Linear`` record, per call (one call per
denoising step: the CFG batch runs as one), the input's absolute maximum, optionally a percentile of ``|x|``, and
the per-input-channel maximum (what SmoothQuant-style balancing needs). Ranges are then reduced over calls:
``max`` = largest amax; ``percentile`` = largest per-step percentile (robust to rare outliers but still covering
every step).

Results go to ``WORK/calib/ranges.safetensors`` (per step and per channel) and ``WORK/calib/ranges.json`` (the
reduced value per linear + the calibration settings). The adaptive calibration (AIGQ / TAP / VC) can reuse
:class:`RangeCollector` and writes the same plan schema.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

PERCENTILE_SAMPLE = 1 << 20  # elements sampled per call for the percentile (exact below this size)


@dataclass
class LinearStats:
    in_features: int
    amax: list[float] = field(default_factory=list)  # per call
    pct: list[float] = field(default_factory=list)  # per call (percentile method)
    channel_amax: torch.Tensor | None = None  # (K,)


class RangeCollector:
    """Context manager installing the hooks on ``model``; ``stats[name]`` after the run."""

    def __init__(self, model: nn.Module, percentile: float | None = None, seed: int = 0) -> None:
        if percentile is not None and not (0.0 < percentile <= 100.0):
            raise ValueError("percentile must be in (0, 100]")
        self.model = model
        self.percentile = percentile
        self.stats: dict[str, LinearStats] = {}
        self._handles: list = []
        self._gen = torch.Generator().manual_seed(seed)

    def _hook(self, name: str):
        def hook(module: nn.Linear, args):
            x = args[0].detach().float()
            a = x.abs()
            st = self.stats[name]
            st.amax.append(float(a.max()))
            ch = a.reshape(-1, a.shape[-1]).amax(dim=0).cpu()
            st.channel_amax = ch if st.channel_amax is None else torch.maximum(st.channel_amax, ch)
            if self.percentile is not None:
                flat = a.reshape(-1)
                if flat.numel() > PERCENTILE_SAMPLE:
                    idx = torch.randint(flat.numel(), (PERCENTILE_SAMPLE,), generator=self._gen).to(flat.device)
                    flat = flat[idx]
                k = max(1, min(flat.numel(), math.ceil(self.percentile / 100.0 * flat.numel())))
                st.pct.append(float(flat.kthvalue(k).values))
        return hook

    def __enter__(self) -> "RangeCollector":
        for name, mod in self.model.named_modules():
            if isinstance(mod, nn.Linear):
                self.stats[name] = LinearStats(mod.in_features)
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reduce(self) -> dict[str, dict]:
        """name -> {"amax": reduced range used for the scale, "max": largest amax, "calls": n}."""
        out = {}
        for name, st in self.stats.items():
            if not st.amax:
                raise RuntimeError(f"linear {name} was never called during calibration")
            mx = max(st.amax)
            used = max(st.pct) if self.percentile is not None else mx
            out[name] = {"amax": used, "max": mx, "calls": len(st.amax)}
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Per-call ranges and per-channel maxima, for ``ranges.safetensors``."""
        t = {}
        for name, st in self.stats.items():
            t[f"{name}.amax_per_call"] = torch.tensor(st.amax, dtype=torch.float32)
            if st.pct:
                t[f"{name}.pct_per_call"] = torch.tensor(st.pct, dtype=torch.float32)
            if st.channel_amax is not None:
                t[f"{name}.channel_amax"] = st.channel_amax.float().contiguous()
        return t


# Built-in calibration prompts for opensora-v1.2 (written for qc-compile: varied subjects, motion and camera work, in
# the style of Open-Sora's own sample prompts; each gets " aesthetic score: 6.5." before T5, as at sampling time).
OPENSORA_PROMPTS = (
    "A drone shot of waves crashing against rugged cliffs at sunset, golden light on the wet rocks.",
    "A close-up of a cat slowly blinking on a sunny windowsill, dust floating in the warm light.",
    "A busy city street at night in the rain, neon signs reflected in puddles, people with umbrellas walking by.",
    "A timelapse of clouds rolling over snowy mountain peaks under a deep blue sky.",
    "A red sports car driving fast along a coastal highway, the camera tracking beside it.",
    "An astronaut floating inside a space station, Earth turning slowly in the window behind.",
    "A chef chopping vegetables in a bright kitchen, steam rising from a pot on the stove.",
    "A field of sunflowers swaying in the wind, the camera panning slowly to the right.",
    "A school of colourful fish swimming through a coral reef, sunlight rippling through the water.",
    "An old steam train crossing a stone bridge in autumn, smoke drifting over red and orange trees.",
    "A child running along a sandy beach flying a kite, seagulls overhead.",
    "A candle flame flickering in a dark room, wax slowly dripping down its side.",
)


def default_prompts(model_name: str, n: int = 4, seed: int = 1234) -> list[str]:
    if model_name == "qc-ref":
        from qc_compile.data.shapes import sample_captions

        return [c.text() for c in sample_captions(n, seed)]
    if model_name == "opensora-v1.2":
        return list(OPENSORA_PROMPTS[:n])
    return []
