"""Plot qc-ref's loss curve over its training stages (docs/model_card/train_log_*.json -> loss_curve.png)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = [("train_log_stage1-2.json", "stages 1-2: from scratch, τ logit-normal"),
          ("train_log_stage3.json", "stage 3: + frame embedding"),
          ("train_log_stage4.json", "stage 4: τ shifted (s=4)"),
          ("train_log_stage5_h100.json", "stage 5: τ shifted (s=4), longer")]


def main(folder: str = "docs/model_card") -> int:
    d = Path(folder)
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for name, label in STAGES:
        losses = json.loads((d / name).read_text())["losses"]
        xs = [offset + s for s, _ in losses]
        ax.plot(xs, [v for _, v in losses], lw=0.8, label=label)
        offset = xs[-1] + 25
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (cumulative, batch 64)")
    ax.set_ylabel("rectified-flow MSE (one batch)")
    ax.set_title("qc-ref training (stages 1-4 H200, stage 5 H100)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "loss_curve.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
