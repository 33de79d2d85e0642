"""Draw docs/architecture.png: the artifacts and stages (top) and the runtime's layers (bottom)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402


def box(ax, x, y, w, h, text, color="#dce9f7", size=8.5, bold=False):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#333",
                                lw=0.9))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            fontweight="bold" if bold else "normal", wrap=True)


def arrow(ax, a, b, text="", color="#333"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=11, lw=1.1, color=color))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.12, text, ha="center", fontsize=7, color="#555")


def main(out: str = "docs/architecture.png") -> None:
    fig, ax = plt.subplots(figsize=(13, 7.2))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 7.4)
    ax.axis("off")
    # --- compile side: stages and the artifacts of the work dir
    ax.text(0.1, 7.15, "compile (qc_compile/, calib/, plugins/)  —  each stage reads and verifies the previous "
            "stage's files, writes its own atomically", fontsize=9.5, fontweight="bold")
    stages = [("export", "model.json\nonnx/fp/<unit>.onnx"), ("calibrate", "calib/, plan.json\n(+ sidecar)"),
              ("build", "onnx/q/, engines/<T>/\nmanifest.json (sha256)")]
    x = 0.3
    for i, (verb, art) in enumerate(stages):
        box(ax, x, 5.9, 1.5, 0.7, f"qc-compile\n{verb}", "#fde2c8", bold=True)
        box(ax, x + 1.75, 5.9, 2.1, 0.7, art, "#f4f4f4")
        arrow(ax, (x + 1.5, 6.25), (x + 1.75, 6.25))
        if i < 2:
            arrow(ax, (x + 3.85, 6.25), (x + 4.25, 6.25))
        x += 4.25
    box(ax, 0.3, 5.0, 3.6, 0.55, "model: STDiT3 / diffusers adapters — units embed | blocks | final,\n"
        "block sub-steps (models/units.py, models/stdit3.py)", "#e7f5e1", 6.8)
    box(ax, 4.55, 5.0, 3.6, 0.55, "plan.json — the one data model: formats per linear,\nvariants, schedule, "
        "cache thresholds (qc_compile/plan.py)", "#e7f5e1", 7.5)
    box(ax, 8.8, 5.0, 3.9, 0.55, "manifest: what was built, verified before use\n(schema version, sha256 of every file)",
        "#e7f5e1", 7.5)
    # --- runtime side
    ax.text(0.1, 4.45, "run (runtime/)  —  the sampler drives one StepExecutor over one UnitRunner per backend",
            fontsize=9.5, fontweight="bold")
    box(ax, 0.3, 3.3, 2.3, 0.8, "Pipeline\n(runtime/pipeline.py)\nrun | sweep | serve", "#fde2c8", bold=True)
    box(ax, 3.0, 3.3, 2.4, 0.8, "RFlowSampler\nCFG, Euler; one D2H\ncopy of stats per step", "#dce9f7")
    box(ax, 5.8, 3.3, 2.6, 0.8, "StepPolicy\ndecide(step) -> UnitDecision\nobserve(step, stats)", "#dce9f7")
    box(ax, 3.0, 1.9, 5.4, 0.95, "StepExecutor (runtime/step_executor.py)\ncompute | reuse | prune per block, "
        "residual + sub-block caches,\nin-step gates, statistics on the device (step_stats.py)", "#cfe3f7", bold=False)
    runners = ["torch", "torch-fast\n(qc:: kernels)", "onnxruntime\n(Q/DQ graphs)", "tensorrt\n(engines)", "+ yours"]
    for i, r in enumerate(runners):
        box(ax, 0.3 + i * 2.05, 0.35, 1.85, 0.75, r, "#eef3fb" if i < 4 else "#ffffff", 8)
        arrow(ax, (5.7, 1.9), (0.3 + i * 2.05 + 0.92, 1.1), color="#777")
    ax.text(0.3, 0.08, "UnitRunner protocol (runtime/protocols.py): run_unit(unit, variant, inputs), block_steps, "
            "begin_step, supports, stats.  Registry: runtime/runners/__init__.py (register_backend).",
            fontsize=7.5, color="#333")
    arrow(ax, (2.6, 3.7), (3.0, 3.7))
    arrow(ax, (5.4, 3.85), (5.8, 3.85), "decide")
    arrow(ax, (5.8, 3.5), (5.4, 3.5), "observe")
    arrow(ax, (4.2, 3.3), (4.2, 2.85), "step(z, t, cond, decisions)")
    box(ax, 9.0, 1.9, 3.7, 2.2, "reads, never imports the compiler:\n\nmodel.json + weights digest\nplan.json "
        "(schema-checked)\nmanifest.json -> files per\nunit / variant (sha256)\n\ntests/test_import_graph.py",
        "#f4f4f4", 7.8)
    arrow(ax, (10.7, 5.0), (10.7, 4.1))
    arrow(ax, (9.0, 3.0), (8.4, 2.4))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
