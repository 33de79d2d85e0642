"""Score a qc-ref checkpoint with the caption checker on held-out captions (default sampling settings).

The evaluation captions come from ``sample_captions(n, seed=EVAL_SEED)``; that seed is used for nothing else
(no tuning), so the numbers are a fair read of the shipped model.

    python tools/eval_reference.py [--checkpoint F] [--n 32] [--device cuda] [--json OUT.json] [--grid OUT.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from qc_compile.data.shapes import sample_captions
from qc_compile.metrics.caption_checker import score_videos
from qc_compile.models import load_model
from qc_compile.runtime.generation import GenerationSettings, generate

EVAL_SEED = 20261122


def write_grid(videos, captions: list[str], path: str, k: int = 8) -> None:
    """PNG with the frames of the first ``k`` videos, one row each, captions as titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from qc_compile.video_io import to_uint8_frames

    k = min(k, len(videos))
    fig, axes = plt.subplots(k, 1, figsize=(12, 1.1 * k), squeeze=False)
    for i in range(k):
        frames = to_uint8_frames(videos[i])  # (T, H, W, 3)
        ax = axes[i][0]
        ax.imshow(frames.transpose(1, 0, 2, 3).reshape(frames.shape[1], -1, 3), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(captions[i], fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0, help="noise seed of the first caption (caption k: seed + k)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--shift", type=float, default=None)
    ap.add_argument("--caption-seed", type=int, default=EVAL_SEED, help="tuning runs must use another seed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--grid", default=None, help="PNG with the first 8 videos' frames")
    args = ap.parse_args()
    loaded = load_model("qc-ref", args.checkpoint, device=args.device)
    captions = [c.text() for c in sample_captions(args.n, seed=args.caption_seed)]
    settings = GenerationSettings.defaults(loaded, seed=args.seed, steps=args.steps, cfg=args.cfg, shift=args.shift)
    start = time.perf_counter()
    videos, _ = generate(loaded, captions, settings, progress=False)
    seconds = time.perf_counter() - start
    scores = score_videos(list(videos), captions)
    summary = {k: scores[k] for k in ("n", "color", "shape", "direction", "background", "all")}
    report = {"checkpoint": loaded.checkpoint, "caption_seed": args.caption_seed, "shift": settings.shift, "noise_seed": args.seed,
              "steps": settings.steps, "cfg": settings.cfg, "device": args.device, "seconds": seconds,
              "summary": summary, "captions": captions,
              "results": [r.to_dict() if hasattr(r, "to_dict") else r for r in scores["results"]]}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    if args.grid:
        write_grid(videos, captions, args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
