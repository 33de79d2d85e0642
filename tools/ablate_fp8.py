"""Issue 12 point 3 ablation: which change lifts W8A8 FP8 fidelity on qc-ref (CPU, small geometry).

Calibrates activation ranges on the built-in calibration captions (seed 1234, disjoint from the held-out set), then
samples held-out captions with the FP model and with FP8 plans that differ in one choice each: static per-tensor
vs dynamic per-token activation scales, the conditioning linears (embed unit + final layer: < 1% of the FLOPs, the
AIGQ hardware menu keeps them bf16) quantized or not, SmoothQuant α. Reports mean/min PSNR against the FP video of
the same caption and seed; writes JSON.

    python tools/ablate_fp8.py --work WORK --prompts 4 --frames 4 --height 16 --width 16 -o bench/results/methods_qc_ref_cpu/ablation_fp8.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--calib-prompts", type=int, default=4)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=None, help="comma list (default: all)")
    ap.add_argument("--work", required=True, help="a work dir exported from qc-ref (`qc-compile export`)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()

    from qc_compile.calib.ranges import RangeCollector, default_prompts
    from qc_compile.data.shapes import sample_captions
    from qc_compile.metrics.fidelity import psnr, ssim
    from qc_compile.models import load_model
    from qc_compile.plan import uniform_plan
    from qc_compile.runtime.generation import GenerationSettings, generate
    from qc_compile.torch_package import apply_plan
    from qc_compile.workdir import WorkDir, read_model_info

    torch.set_grad_enabled(False)
    loaded = load_model("qc-ref")
    kw = dict(steps=args.steps, frames=args.frames, height=args.height, width=args.width)
    s = GenerationSettings.defaults(loaded, seed=0, **kw)
    t0 = time.perf_counter()
    rc = RangeCollector(loaded.model)
    with rc:
        generate(loaded, default_prompts("qc-ref", args.calib_prompts), s, progress=False)
    ranges = rc.reduce()
    info = read_model_info(WorkDir(args.work))  # linears and model identity of an exported qc-ref work dir
    held = [c.text() for c in sample_captions(args.prompts, seed=20261122)]
    seeds = [int(x) for x in args.seeds.split(",")]
    refs = {sd: generate(loaded, held, GenerationSettings.defaults(loaded, seed=sd, **kw), progress=False)[0]
            for sd in seeds}
    cond = ("t_embedder.*", "fps_embedder.*", "t_block.*", "y_embedder.*", "final_layer.*")

    def plan_for(dynamic: bool, keep_cond: bool):
        plan, _ = uniform_plan(info, "fp8_e4m3", ranges, exclude=list(cond) if keep_cond else [])
        if dynamic:
            for e in plan.linears.values():
                if e.activation != "bf16":
                    e.act_scale = "dynamic"
        return plan

    variants = {
        "static per-tensor (old default)": lambda: plan_for(False, False),
        "static, conditioning linears bf16": lambda: plan_for(False, True),
        "per-token dynamic": lambda: plan_for(True, False),
        "per-token, conditioning linears bf16": lambda: plan_for(True, True),
        "weights fp8 only (activations bf16)": lambda: _weights_only(plan_for(False, False)),
    }
    if args.variants:
        variants = {k: v for k, v in variants.items() if any(w in k for w in args.variants.split(","))}
    rows = []
    for name, mk in variants.items():
        plan = mk()
        q = apply_plan(copy.deepcopy(loaded), plan)
        ps, ss = [], []
        for sd in seeds:
            v, _ = generate(q, held, GenerationSettings.defaults(loaded, seed=sd, **kw), progress=False)
            for i in range(len(held)):
                ps.append(psnr(v[i], refs[sd][i]))
                ss.append(ssim(v[i], refs[sd][i]))
        row = {"variant": name, "psnr_mean": sum(ps) / len(ps), "psnr_min": min(ps), "ssim": sum(ss) / len(ss),
               "psnr": ps}
        rows.append(row)
        print(f"{name:45s} {row['psnr_mean']:6.2f} / {row['psnr_min']:6.2f}  ssim {row['ssim']:.4f}", flush=True)
    out = {"schema_version": 1, "model": "qc-ref", "device": "CPU", "video": [args.frames, args.height, args.width],
           "steps": args.steps, "seeds": seeds, "prompts": held, "policy": "none (every unit computed, default "
           "variant at every step)", "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1))


def _weights_only(plan):
    for e in plan.linears.values():
        e.activation, e.act_scale = "bf16", None
    return plan


if __name__ == "__main__":
    main()
