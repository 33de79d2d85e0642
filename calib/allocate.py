"""AIGQ bit allocation: weight formats from the target's menu under a budget, most sensitive layers first.

Menu per target (weight formats, lowest first; what ``trt_compat.capabilities`` says the target runs):

* Hopper / torch (``torch``, ``any``, ``trt``, ``trt:sm90``): int4_b128 (weight-only), int6_sim (*simulated*: torch
  and onnxruntime only, never a speedup), fp8_e4m3, bf16; ``int6_sim`` only where the target runs simulated formats.
* ``rtx:sm120`` (Blackwell): nvfp4, int4_b128, fp8_e4m3, bf16. ``rtx:sm89``: int4_b128, fp8_e4m3, bf16.

Budget: average weight bits over all linear parameters (Σ bits_l·params_l / Σ params_l, nominal bits: block scales
not counted), or bytes (converted to the same average). Allocation is greedy by damage removed per bit: the damage
of layer l in format f is modelled as d_l(f) = S_l · r_l(f) / r_l(probe), with S_l its sensitivity score measured at
the probe format and r_l(f) the relative weight error ||W − Q_f(W)|| / ||W|| (bf16 = 0). Every layer starts at its
cheapest format; the upgrade with the largest (d_l(f) − d_l(f')) / ((bits_f' − bits_f)·params_l) that still fits
the budget is taken until none fits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from qc_compile.errors import UserError
from qc_compile.plan import WEIGHT_FORMATS

HOPPER_MENU = ("int4_b128", "int6_sim", "fp8_e4m3", "bf16")


def menu_for(target: str, *, simulated: bool = True) -> tuple[str, ...]:
    """Weight formats the allocation may use for ``target``, cheapest first (UserError for an unknown target)."""
    from qc_compile.trt_compat import capabilities, parse_target

    t = parse_target(target, allow_any=True)
    if t.backend in ("torch", "any"):
        menu = HOPPER_MENU
    else:
        w, _ = capabilities(t)
        menu = tuple(f for f in ("nvfp4", "int4_b128", "fp8_e4m3", "bf16") if f in w)
    if not simulated:
        menu = tuple(f for f in menu if not WEIGHT_FORMATS[f].simulated)
    return tuple(sorted(menu, key=lambda f: (WEIGHT_FORMATS[f].bits, f != "nvfp4")))


def fits(fmt: str, in_features: int) -> bool:
    b = WEIGHT_FORMATS[fmt].block
    return not b or in_features % b == 0


def parse_budget(text: str | float, total_params: int) -> float:
    """'6' / 6.0 -> 6 average bits; '1.5MB' / '2000000B' -> bytes converted to average bits."""
    s = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?", s, flags=re.I)
    if not m:
        raise UserError(f"--budget {text!r}: expected average weight bits (e.g. 6) or a size in bytes (e.g. 1.5MB).")
    value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if not unit:
        if value <= 0:
            raise UserError(f"--budget {text}: must be positive.")
        return value
    mult = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}[unit]
    return value * mult * 8.0 / total_params


@dataclass
class Allocation:
    formats: dict[str, str]
    avg_bits: float
    budget_bits: float
    min_bits: float
    damage: dict[str, float]
    rel_error: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        return {"formats": self.formats, "avg_bits": self.avg_bits, "budget_bits": self.budget_bits,
                "min_bits": self.min_bits, "damage": self.damage, "rel_weight_error": self.rel_error}


def weight_rel_errors(weights: dict[str, torch.Tensor], menu: Sequence[str]) -> dict[str, dict[str, float]]:
    from qc_compile.calib.sensitivity import quantized_weight

    out = {}
    for name, w in weights.items():
        k = w.shape[1]
        d = {}
        for f in menu:
            if not fits(f, k):
                continue
            d[f] = 0.0 if f == "bf16" else float((quantized_weight(w, f).float() - w.float()).norm()
                                                 / w.float().norm().clamp_min(1e-12))
        out[name] = d
    return out


def allocate(score: dict[str, float], params: dict[str, int], rel_error: dict[str, dict[str, float]],
             probe: dict[str, str], budget_bits: float) -> Allocation:
    bits = {f: WEIGHT_FORMATS[f].bits for f in WEIGHT_FORMATS}
    total = sum(params.values())
    options = {n: sorted(rel_error[n], key=lambda f: (bits[f], rel_error[n][f])) for n in score}

    def damage(n, f):
        r0 = rel_error[n].get(probe[n], 0.0)
        return score[n] * (rel_error[n][f] / r0) if r0 > 0 else 0.0

    cur = {n: options[n][0] for n in score}
    min_bits = sum(bits[cur[n]] * params[n] for n in score) / total
    if budget_bits + 1e-9 < min_bits:
        lowest = ", ".join(sorted({cur[n] for n in score}))
        raise UserError(f"--budget {budget_bits:.3g} average weight bits is below what the menu can reach: "
                        f"{min_bits:.3f} bits with every layer in its cheapest format ({lowest}; layers whose input "
                        "size does not divide a format's block keep a wider one). Raise the budget.")
    used = min_bits * total
    cap = budget_bits * total
    while True:
        best, best_gain = None, 0.0
        for n in score:
            for f in options[n]:
                extra = (bits[f] - bits[cur[n]]) * params[n]
                if extra <= 0 or used + extra > cap + 1e-6:
                    continue
                gain = (damage(n, cur[n]) - damage(n, f)) / extra
                if gain > best_gain:
                    best, best_gain = (n, f, extra), gain
        if best is None:
            break
        n, f, extra = best
        cur[n] = f
        used += extra
    return Allocation(cur, used / total, budget_bits, min_bits, {n: damage(n, cur[n]) for n in score}, rel_error)


def average_bits(formats: dict[str, str], params: dict[str, int]) -> float:
    total = sum(params.values())
    return sum(WEIGHT_FORMATS[formats[n]].bits * params[n] for n in formats) / total
