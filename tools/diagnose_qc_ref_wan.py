"""Why does a qc-ref-wan folder miss an attribute? Cheap probes of a checkpoint (one transformer call each), for use
between training stages and before the full held-out eval (tools/eval_reference_wan.py).

* ``caption_sensitivity``: relative change of the model output at σ = 0.98 (where motion direction is decided)
  when one caption attribute is swapped, per attribute. An attribute the model ignores stays near 0.
* ``direction_from_noise``: for each caption and each of the 4 directions, the checker's direction of the one-step
  x0 prediction from pure noise (σ = 1, CFG at the folder's default). A model that follows the direction word
  scores well above 25% (chance).
* ``time_flip``: ‖v(flip_t x) − flip_t v(x)‖ / ‖v(x)‖ at σ = 0.98; near 0 means the network is time-reversal
  equivariant, so it cannot tell "left" from "right" (qc-ref's failure before its frame table, docs/MODEL_CARD.md).
* ``checker_ground_truth``: the checker on rendered shapes videos of the same captions through the eval's
  ``score_videos`` path; must be 1.0, else the eval, not the model, is wrong.

    python tools/diagnose_qc_ref_wan.py [--checkpoint FOLDER] [--n 8] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from qc_compile.data.shapes import DIRECTIONS, SHAPES, render, sample_captions
from qc_compile.metrics.caption_checker import check_video, score_videos
from qc_compile.models import load_model
from qc_compile.models import qc_ref_wan as qrw

PROBE_CAPTION_SEED = 7  # tuning captions, never the held-out ones


@torch.no_grad()
def _v(loaded, x: torch.Tensor, sigma: float, captions: list[str], cfg: float = 1.0) -> torch.Tensor:
    tr, dtype = loaded.transformer, loaded.transformer.patch_embedding.weight.dtype
    t = torch.full((x.shape[0],), sigma * 1000.0, device=loaded.device)
    inp = qrw.with_frame_channel(x.to(loaded.device)).to(dtype)
    v = tr(hidden_states=inp, timestep=t, encoder_hidden_states=loaded.encode_prompts(captions).to(dtype),
           return_dict=False)[0].float()
    if cfg != 1.0:
        v_u = tr(hidden_states=inp, timestep=t, encoder_hidden_states=loaded.null_captions(len(captions)).to(dtype),
                 return_dict=False)[0].float()
        v = v_u + cfg * (v - v_u)
    return v.cpu()


def _noise(loaded, n: int, seed: int) -> torch.Tensor:
    d = loaded.defaults
    return torch.randn((n, 3, d.frames, d.height, d.width), generator=torch.Generator().manual_seed(seed))


def caption_sensitivity(loaded, caps, sigma: float = 0.98) -> dict:
    x = _noise(loaded, len(caps), 1)
    base = _v(loaded, x, sigma, [c.text() for c in caps])
    swaps = {"color": lambda c: "green" if c.color == "red" else "red",  # neither is excluded on any background
             "shape": lambda c: SHAPES[(SHAPES.index(c.shape) + 1) % len(SHAPES)],
             "direction": lambda c: {"left": "right", "right": "left", "up": "down", "down": "up"}[c.direction]}
    out = {}
    for attr, swap in swaps.items():
        other = [dataclasses.replace(c, **{attr: swap(c)}) for c in caps]
        v = _v(loaded, x, sigma, [c.text() for c in other])
        out[attr] = float((v - base).flatten(1).norm(dim=1).div(base.flatten(1).norm(dim=1)).mean())
    return out


def direction_from_noise(loaded, caps) -> dict:
    hits, seen = 0, {d: 0 for d in DIRECTIONS + ("none",)}
    for k, c in enumerate(caps):
        asked = [dataclasses.replace(c, direction=d) for d in DIRECTIONS]
        x = _noise(loaded, 1, 100 + k).expand(len(asked), -1, -1, -1, -1)
        x0 = (x - _v(loaded, x, 1.0, [a.text() for a in asked], loaded.defaults.cfg)).clamp(-1, 1)
        for a, video in zip(asked, x0):
            r = check_video(video, a.text())
            hits += r.direction == a.direction
            seen[r.direction if r.direction in seen else "none"] += 1
    return {"accuracy": hits / (4 * len(caps)), "read_directions": seen}


def time_flip(loaded, caps, sigma: float = 0.98) -> float:
    x = _noise(loaded, len(caps), 2)
    texts = [c.text() for c in caps]
    v = _v(loaded, x, sigma, texts)
    return float((_v(loaded, x.flip(2), sigma, texts).flip(2) - v).norm() / v.norm())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a qc-ref-wan folder (default: the shipped one)")
    ap.add_argument("--n", type=int, default=8, help="captions (tuning set, seed 7)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    loaded = load_model("qc-ref-wan", args.checkpoint, device=args.device)
    caps = sample_captions(args.n, seed=PROBE_CAPTION_SEED)
    d = loaded.defaults
    gt = render(caps, frames=d.frames, height=d.height, width=d.width, seed=torch.Generator().manual_seed(0))
    s = score_videos(list(gt), [c.text() for c in caps])
    report = {"checkpoint": loaded.checkpoint, "n": args.n, "device": str(loaded.device),
              "checker_ground_truth": {k: s[k] for k in ("color", "shape", "direction", "background")},
              "caption_sensitivity": caption_sensitivity(loaded, caps),
              "time_flip": time_flip(loaded, caps),
              "direction_from_noise": direction_from_noise(loaded, caps)}
    print(json.dumps(report, indent=1))
    if args.json:
        from qc_compile.artifacts import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
