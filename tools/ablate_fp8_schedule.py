"""Issue 12 point 3, second ablation: which steps' precision decides FP8 fidelity on qc-ref (CPU, small geometry).

A uniform FP8 plan (static per-tensor scales from WORK's `calibrate --uniform fp8` ranges) run under the `schedule`
policy with every unit computed: FP8 at every step, the first 6 steps unquantized (`fp`), or the first 6 steps with
bf16 activations only (`high`). Writes /tmp/h11/abl2.json (copied to bench/results/methods_qc_ref_cpu/).

    python tools/ablate_fp8_schedule.py     # expects /tmp/h11/w_fp8 = qc-compile export + calibrate --uniform fp8
"""
import json, time, torch
from qc_compile.runtime import Pipeline
from qc_compile.plan import uniform_plan
from qc_compile.workdir import WorkDir, read_model_info
from qc_compile.data.shapes import sample_captions
from qc_compile.metrics.fidelity import psnr
torch.set_grad_enabled(False)
info = read_model_info(WorkDir("/tmp/h11/w_fp8"))
ranges = json.load(open("/tmp/h11/w_fp8/calib/ranges.json"))["ranges"]
plan, _ = uniform_plan(info, "fp8_e4m3", ranges)
plan.variants = {"high": {"*": {"activation": "bf16"}}}
pipe = Pipeline.from_pretrained("qc-ref")
pipe.plan = plan
held = [c.text() for c in sample_captions(4, seed=20261122)]
SM = dict(frames=4, height=16, width=16, steps=30)
out = {}
for name, sched in (("default every step", ["default"] * 30), ("first 6 steps fp (unquantized)", ["fp"] * 6 + ["default"] * 24),
                    ("first 6 steps high (bf16 activations)", ["high"] * 6 + ["default"] * 24)):
    t = time.time()
    r = pipe(held, policy="schedule", overrides={"schedule.steps": ",".join(sched)}, seed=0, reference=True, **SM)
    ps = [psnr(r.videos[i], r.fp_videos[i]) for i in range(len(held))]
    out[name] = ps
    print(name, [round(p, 2) for p in ps], round(sum(ps) / 4, 2), round(time.time() - t), flush=True)
json.dump({"prompts": held, "rows": out}, open("/tmp/h11/abl2.json", "w"), indent=1)
