"""AIGQ activation precision per step (QuantCache Eq. 8), from a step-redundancy metric.

D_t = mean over block units and calibration prompts (cond branch) of the relative L1 change of the block's residual
between step t−1 and t (the quantity HLC also reads). Reading (runtime/policies/precision.py): D_t is a *distance*,
so a small D_t (high redundancy) tolerates fewer activation bits, a large D_t (structure forming) gets more. The
first step has no D and runs high. ``high_fraction`` of the steps run the ``high`` variant; the others ``default``.
``reading="opposite"`` gives the paper's printed direction (high bits where D_t is small) for the comparison that
shows which reading is better. The post-skip coupling (a unit recomputed after a long skip runs high) is the
runtime's ``aigq.post_skip`` parameter, written to the plan alongside.
"""

from __future__ import annotations

import math

import torch

from qc_compile.errors import UserError


def redundancy(res_change: dict[str, torch.Tensor]) -> list[float]:
    """unit -> (prompts, steps) residual change -> D per step (nan for step 0)."""
    g = torch.stack([v.float() for v in res_change.values()])  # (units, prompts, steps)
    d = g.nanmean(dim=(0, 1))
    return [float(x) for x in d]


def schedule_from(d: list[float], high_fraction: float, reading: str = "distance") -> list[str]:
    if not 0.0 <= high_fraction <= 1.0:
        raise UserError(f"--act-high-fraction must be in [0, 1], got {high_fraction}.")
    if reading not in ("distance", "opposite"):
        raise ValueError(reading)
    S = len(d)
    n_high = int(round(high_fraction * S))
    key = [(math.inf if math.isnan(x) else x) for x in d]
    if reading == "opposite":
        key = [(k if math.isinf(k) else -k) for k in key]  # step 0 (no D) stays high in both readings
    order = sorted(range(S), key=lambda i: -key[i])
    high = set(order[:n_high])
    return ["high" if i in high else "default" for i in range(S)]


def average_act_bits(schedule: list[str], bits: dict[str, float]) -> float:
    return sum(bits[v] for v in schedule) / max(1, len(schedule))
