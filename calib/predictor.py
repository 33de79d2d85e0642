"""6Bit-Diffusion's DMPQ predictor: E = a·Γ + b per block unit, and the routing threshold.

Γ_{t−1}: the unit's relative input-to-output change ||out − in||₁ / ||in||₁ at the previous step (FP statistics pass,
both CFG rows of a prompt, as the executor's ``in_out_rel_l1`` statistic computes it over its batch). E_t: the
unit's relative quantization error at step t, ||out_q − out||₁ / ||out − in||₁ (the quantized default variant of the
block on the FP input, against its FP residual). a, b by least squares per unit (and over all units); the
threshold is the (1 − ``high_fraction``) quantile of the predicted E over the calibration pairs, so about that
fraction of (unit, step) evaluations route to ``high``. Written to ``cache_policy.params.dmpq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PredictorFit:
    pairs: dict[str, list[tuple[float, float]]]  # unit -> [(gamma_prev, err)]
    units: dict[str, dict[str, float]]
    a: float
    b: float
    threshold: float
    r: float  # Pearson correlation over all pairs

    def plan_params(self) -> dict:
        return {"a": self.a, "b": self.b, "threshold": self.threshold, "calibrated": True,
                "units": {u: {"a": d["a"], "b": d["b"]} for u, d in self.units.items()}}


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 2 or np.ptp(x) == 0:
        return 0.0, float(y.mean()) if len(y) else 0.0
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def collect_pairs(replay, q_model, store, samples, units) -> dict[str, list[tuple[float, float]]]:
    """For each sample (p, s) with s >= 1 of ``replay`` (same order), per block unit (Γ_{s−1}, E_s)."""
    n = len(samples)
    out: dict[str, list[tuple[float, float]]] = {u: [] for u in units}
    for u in units:
        with torch.no_grad():
            ref = replay.unit_output(u)
            q = replay.unit_output(u, q_model)
        x = replay.block_in[u]
        for i, (p, s) in enumerate(samples):
            if s < 1:
                continue
            rows = [i, n + i]
            res = (ref[rows] - x[rows]).float().abs().sum()
            err = float((q[rows] - ref[rows]).float().abs().sum() / res.clamp_min(1e-12))
            r1 = store.sample(p, s - 1, f"blk/{u}/res_l1", "both").sum()
            i1 = store.sample(p, s - 1, f"blk/{u}/in_l1", "both").sum()
            out[u].append((float(r1 / i1.clamp_min(1e-12)), err))
    return out


def fit(pairs: dict[str, list[tuple[float, float]]], high_fraction: float = 0.25) -> PredictorFit:
    units = {}
    preds = []
    for u, pr in pairs.items():
        if not pr:
            continue
        x, y = np.array([p[0] for p in pr]), np.array([p[1] for p in pr])
        a, b = _fit(x, y)
        units[u] = {"a": a, "b": b, "n": len(pr)}
        preds += list(a * x + b)
    allx = np.array([p[0] for pr in pairs.values() for p in pr])
    ally = np.array([p[1] for pr in pairs.values() for p in pr])
    a, b = _fit(allx, ally)
    th = float(np.quantile(np.array(preds), 1.0 - high_fraction)) if preds else 0.0
    r = float(np.corrcoef(allx, ally)[0, 1]) if len(allx) > 2 and np.ptp(allx) > 0 and np.ptp(ally) > 0 else 0.0
    return PredictorFit(pairs, units, a, b, max(th, 0.0), r)
