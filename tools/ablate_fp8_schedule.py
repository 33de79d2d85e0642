"""Issue 12 point 3, second ablation: which steps' precision decides FP8 fidelity on qc-ref (CPU, small geometry).

A uniform FP8 plan (static per-tensor scales from WORK's `calibrate --uniform fp8` ranges) run under the `schedule`
policy with every unit computed: FP8 at every step, the first 6 steps unquantized (`fp`), or the first 6 steps with
bf16 activations only (`high`). PSNR per held-out caption against the FP video of the same seed.

    qc-compile export qc-ref -o W --quiet && qc-compile calibrate W --uniform fp8 --quiet
    python tools/ablate_fp8_schedule.py W -o bench/results/methods_qc_ref_cpu/ablation_schedule.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", help="a qc-ref work dir calibrated with --uniform fp8 (its ranges are used)")
    ap.add_argument("-o", "--out", required=True, help="JSON to write")
    ap.add_argument("--captions", type=int, default=4, help="held-out captions (sample_captions seed 20261122)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--high-steps", type=int, default=6, help="leading steps run at the higher precision")
    args = ap.parse_args(argv)

    from qc_compile.artifacts import write_json_atomic
    from qc_compile.data.shapes import sample_captions
    from qc_compile.metrics.fidelity import psnr
    from qc_compile.plan import uniform_plan
    from qc_compile.runtime import Pipeline
    from qc_compile.workdir import WorkDir, read_model_info

    torch.set_grad_enabled(False)
    work = WorkDir(args.work)
    info = read_model_info(work)
    ranges = json.loads((work.calib_dir / "ranges.json").read_text())["ranges"]
    plan, _ = uniform_plan(info, "fp8_e4m3", ranges)
    plan.variants = {"high": {"*": {"activation": "bf16"}}}
    pipe = Pipeline.from_pretrained("qc-ref")
    pipe.plan = plan
    held = [c.text() for c in sample_captions(args.captions, seed=20261122)]
    small = dict(frames=4, height=16, width=16, steps=args.steps)
    k, rest = args.high_steps, args.steps - args.high_steps
    out = {}
    for name, sched in (("default every step", ["default"] * args.steps),
                        (f"first {k} steps fp (unquantized)", ["fp"] * k + ["default"] * rest),
                        (f"first {k} steps high (bf16 activations)", ["high"] * k + ["default"] * rest)):
        t = time.time()
        r = pipe(held, policy="schedule", overrides={"schedule.steps": ",".join(sched)}, seed=0, reference=True,
                 **small)
        ps = [psnr(r.videos[i], r.fp_videos[i]) for i in range(len(held))]
        out[name] = ps
        print(name, [round(p, 2) for p in ps], round(sum(ps) / len(ps), 2), f"{time.time() - t:.0f} s", flush=True)
    write_json_atomic(args.out, {"prompts": held, "rows": out, "device": "cpu"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
