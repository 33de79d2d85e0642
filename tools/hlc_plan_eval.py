"""Held-out check of a plan's calibrated HLC thresholds: ``quantcache`` on the plan's quantized computation with the
plan's thresholds (what the runtime reads by default) against the same run at HLC's default thresholds, and
optionally quantcache on the unquantized model (the compute the calibration aims at). Per caption: compute
fraction, PSNR / SSIM against the FP run, checker. Writes OUT/hlc_plan_eval.json and OUT/hlc_plan_eval.md.

    python tools/hlc_plan_eval.py WORK --prompts 6 --out bench/results/hlc_plan_qc_ref_cpu [--unquantized]

Captions: ``sample_captions(n, seed=20261122)`` (issue 12's held-out set, never used by calibration), one noise seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _row(pipe, prompts, seed, steps, overrides=None) -> dict:
    recs = []
    for k, p in enumerate(prompts):
        res = pipe(p, policy="quantcache", overrides=overrides, seed=seed, steps=steps, reference=True)
        m = res.metrics()
        pv = m["reference"]["per_video"][0]
        recs.append({"prompt": p, "compute_fraction": m["compute_fraction"], "psnr_db": pv["psnr_db"],
                     "ssim": pv["ssim"], "checker_ok": m["checker"]["per_video"][0] if m.get("checker") else None,
                     "seconds": res.seconds})
    n = len(recs)
    chk = [r["checker_ok"] for r in recs if r["checker_ok"] is not None]
    return {"compute_percent": 100 * sum(r["compute_fraction"] for r in recs) / n,
            "psnr_db_mean": sum(r["psnr_db"] for r in recs) / n, "psnr_db_min": min(r["psnr_db"] for r in recs),
            "ssim_mean": sum(r["ssim"] for r in recs) / n,
            "checker_percent": 100 * sum(chk) / len(chk) if chk else None, "videos": recs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--caption-seed", type=int, default=20261122)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--unquantized", action="store_true", help="also quantcache on the FP model (no plan)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)

    import torch

    from qc_compile.artifacts import write_json_atomic
    from qc_compile.calib.hlc_thresholds import defaults
    from qc_compile.data.shapes import sample_captions
    from qc_compile.runtime import Pipeline

    torch.set_grad_enabled(False)
    prompts = [c.text() for c in sample_captions(a.prompts, seed=a.caption_seed)]
    pipe = Pipeline(a.work, device=a.device)
    plan_hlc = (pipe.plan.cache_policy or {}).get("params", {}).get("hlc", {})
    d1, d2 = defaults()
    t0 = time.perf_counter()
    rows = {"plan thresholds": _row(pipe, prompts, a.seed, a.steps),
            "default thresholds": _row(pipe, prompts, a.seed, a.steps, {"hlc.delta1": d1, "hlc.delta2": d2})}
    if a.unquantized:
        # the plan's policy parameters (SRAP, AIGQ schedule) on the unquantized model: calibrate's target
        fp = Pipeline(a.work, device=a.device)
        fp.make_executor = lambda settings, quantized=True: Pipeline.make_executor(fp, settings, quantized=False)
        fp._fp_cache = pipe._fp_cache  # the same FP references
        rows["unquantized model, default thresholds"] = _row(fp, prompts, a.seed, a.steps)
    cal = ((pipe.plan.provenance or {}).get("calibration", {}).get("runtime", {}) or {}).get("hlc")
    out = {"schema_version": 1, "work": str(a.work), "plan_hlc": plan_hlc, "default_hlc": {"delta1": d1, "delta2": d2},
           "calibration_report": cal, "captions": {"n": a.prompts, "seed": a.caption_seed}, "noise_seed": a.seed,
           "steps": a.steps, "device": a.device, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out / "hlc_plan_eval.json", out)
    lines = [f"# quantcache with the plan's HLC thresholds vs the defaults ({a.work.name})", "",
             f"{a.prompts} held-out captions (`sample_captions({a.prompts}, seed={a.caption_seed})`), noise seed "
             f"{a.seed}, {a.device}. Plan thresholds: {plan_hlc or 'none (defaults)'}; defaults {d1:g}/{d2:g}.", "",
             "| row | compute % | PSNR mean / min (dB) | SSIM | checker % |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        chk = "-" if r["checker_percent"] is None else f"{r['checker_percent']:.0f}"
        lines.append(f"| {name} | {r['compute_percent']:.1f} | {r['psnr_db_mean']:.2f} / {r['psnr_db_min']:.2f} | "
                     f"{r['ssim_mean']:.4f} | {chk} |")
    (a.out / "hlc_plan_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
