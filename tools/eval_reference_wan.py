"""Score a qc-ref-wan folder with the caption checker on the held-out captions (qc-ref's evaluation protocol).

Captions: ``sample_captions(n, seed=20261122)`` (the seed nothing is tuned on); caption k starts from noise seed
``seed + k``; WanPipeline-style sampling at the folder's defaults unless overridden.

    python tools/eval_reference_wan.py [--checkpoint FOLDER] [--n 32] [--seed 0] [--json OUT.json] [--grid OUT.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_reference import EVAL_SEED, write_grid  # noqa: E402

from qc_compile.data.shapes import sample_captions  # noqa: E402
from qc_compile.metrics.caption_checker import score_videos  # noqa: E402
from qc_compile.models import load_model  # noqa: E402


def evaluate(loaded, captions: list[str], *, seed: int, steps: int | None, cfg: float | None, shift: float | None,
             batch: int) -> tuple[torch.Tensor, dict, float]:
    """(videos, checker scores, seconds) for ``captions`` in batches of ``batch``."""
    videos = []
    start = time.perf_counter()
    for i in range(0, len(captions), batch):
        videos.append(loaded.sample(captions[i:i + batch], seed=seed + i, steps=steps, cfg=cfg, shift=shift))
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    videos = torch.cat(videos)
    return videos, score_videos(list(videos), captions), seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a qc-ref-wan folder (default: the shipped one)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0, help="noise seed of the first caption (caption k: seed + k)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--shift", type=float, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--caption-seed", type=int, default=EVAL_SEED, help="tuning runs must use another seed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--grid", default=None, help="PNG with the first 8 videos' frames")
    args = ap.parse_args(argv)
    loaded = load_model("qc-ref-wan", args.checkpoint, device=args.device)
    captions = [c.text() for c in sample_captions(args.n, seed=args.caption_seed)]
    videos, scores, seconds = evaluate(loaded, captions, seed=args.seed, steps=args.steps, cfg=args.cfg,
                                       shift=args.shift, batch=args.batch)
    d = loaded.defaults
    summary = {k: scores[k] for k in ("n", "color", "shape", "direction", "background", "all")}
    report = {"model": "qc-ref-wan", "checkpoint": loaded.checkpoint, "caption_seed": args.caption_seed,
              "noise_seed": args.seed, "steps": args.steps or d.steps, "cfg": d.cfg if args.cfg is None else args.cfg,
              "shift": d.shift if args.shift is None else args.shift, "device": str(loaded.device),
              "device_name": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
              "seconds": seconds, "summary": summary, "captions": captions,
              "results": [r.to_dict() if hasattr(r, "to_dict") else r for r in scores["results"]]}
    print(json.dumps(summary))
    if args.json:
        from qc_compile.artifacts import write_json_atomic

        write_json_atomic(args.json, json.loads(json.dumps(report, default=float)))
    if args.grid:
        write_grid(videos, captions, args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
