"""Pick qc-ref's default sampling settings (CFG scale, timestep shift) on *tuning* captions, then score the pick
once on the held-out evaluation captions (which never drive a choice).

    python tools/tune_reference_sampling.py --checkpoint F --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch

from qc_compile.data.shapes import sample_captions
from qc_compile.metrics.caption_checker import score_videos
from qc_compile.models import load_model
from qc_compile.runtime.generation import GenerationSettings, generate

TUNE_SEED = 7
EVAL_SEED = 20261122


def score(loaded, captions, **kw) -> dict:
    videos, _ = generate(loaded, captions, GenerationSettings.defaults(loaded, **kw), progress=False)
    s = score_videos(list(videos), captions)
    return {k: s[k] for k in ("color", "shape", "direction", "background", "all")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--cfgs", default="2,4,7")
    ap.add_argument("--shifts", default="none,2,3")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model("qc-ref", args.checkpoint, device=device)
    tune = [c.text() for c in sample_captions(args.n, seed=TUNE_SEED)]
    rows = []
    for cfg, shift in itertools.product([float(c) for c in args.cfgs.split(",")],
                                         [None if x == "none" else float(x) for x in args.shifts.split(",")]):
        t = time.perf_counter()
        r = score(loaded, tune, cfg=cfg, shift=shift, seed=100)
        rows.append({"cfg": cfg, "shift": shift, **r, "seconds": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: (r["direction"] + r["color"] + 0.5 * r["shape"], -r["cfg"]))
    held = [c.text() for c in sample_captions(32, seed=EVAL_SEED)]
    final = {s: score(loaded, held, cfg=best["cfg"], shift=best["shift"], seed=s) for s in (0, 1000)}
    report = {"tuning": rows, "best": best, "held_out_32": final, "device": device}
    print("BEST", json.dumps(best), "HELD-OUT", json.dumps(final), flush=True)
    with open(f"{args.out}/tune.json", "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
