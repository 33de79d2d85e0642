"""qc-compile FP8 (enable(..., quantize="fp8") scope: every block linear W8A8 on the qc:: kernels) on qc-ref-wan, CPU:
8 held-out captions (noise seed 0), PSNR/SSIM/checker against the fp32 model. Session 10, commit fc983f1."""
import json, time, torch
from qc_compile.data.shapes import sample_captions
from qc_compile.metrics.caption_checker import score_videos
from qc_compile.metrics.fidelity import compare_videos
from qc_compile.models import load_model
from qc_compile.diffusers_quant import quantize_blocks, restore
torch.set_grad_enabled(False)
lm = load_model("qc-ref-wan")
caps = [c.text() for c in sample_captions(8, seed=20261122)]
t0 = time.time(); ref = lm.sample(caps, seed=0); t1 = time.time()
sw = quantize_blocks(lm.transformer.blocks, "fp8")
q = lm.sample(caps, seed=0); t2 = time.time()
restore(sw)
per = [compare_videos(a, b) for a, b in zip(q, ref)]
out = {"captions": 8, "caption_seed": 20261122, "noise_seed": 0, "device": "cpu", "dtype": "fp32 model, FP8 W8A8 block linears (qc:: CPU reference)",
       "psnr_db": sum(p["psnr_db"] for p in per) / len(per), "psnr_db_min": min(p["psnr_db"] for p in per),
       "ssim": sum(p["ssim"] for p in per) / len(per), "checker_fp32": score_videos(list(ref), caps)["all"],
       "checker_fp8": score_videos(list(q), caps)["all"], "seconds_fp32": t1 - t0, "seconds_fp8": t2 - t1}
print(json.dumps(out))
json.dump(out, open("wanfp8.json", "w"), indent=1)  # where this ran: /tmp
