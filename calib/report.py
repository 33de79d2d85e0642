"""The adaptive calibration's report: ``WORK/report/`` PNGs (sensitivity, allocation, activation schedule, predictor
fit) and ``calibration.md``, the things people look at first."""

from __future__ import annotations

import io
from pathlib import Path

from qc_compile.artifacts import atomic_write, write_bytes_atomic
from qc_compile.plan import WEIGHT_FORMATS

FORMAT_COLORS = {"bf16": "#2c7bb6", "fp8_e4m3": "#abd9e9", "int8": "#ffffbf", "int6_sim": "#fdae61",
                 "int4_b128": "#d7191c", "int4_b64": "#d7191c", "nvfp4": "#7b3294"}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def write(report_dir: str | Path, res, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    plan = res.plan
    names = list(plan.linears)
    pngs = []
    if res.sens is not None:
        from qc_compile.calib.sensitivity import WEIGHTS

        fig, ax = plt.subplots(figsize=(12, 4))
        bottom = np.zeros(len(names))
        for term in ("numerical", "perceptual", "temporal"):
            vals = getattr(res.sens, term)
            m = max(vals.values()) or 1.0
            part = np.array([WEIGHTS[term] * vals[n] / m for n in names])
            ax.bar(range(len(names)), part, bottom=bottom, label=f"{term} (w={WEIGHTS[term]})")
            bottom += part
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
        ax.set_ylabel("sensitivity S (normalised terms)")
        ax.set_title(f"{title}: AIGQ sensitivity per linear")
        ax.legend(fontsize=7)
        pngs.append(_save(fig, d / "sensitivity.png"))
    if res.alloc is not None:
        fig, ax = plt.subplots(figsize=(12, 3.5))
        fm = [plan.linears[n].weight for n in names]
        ax.bar(range(len(names)), [WEIGHT_FORMATS[f].bits for f in fm], color=[FORMAT_COLORS.get(f, "k") for f in fm])
        for f in sorted(set(fm)):
            ax.bar([0], [0], color=FORMAT_COLORS.get(f, "k"), label=f)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
        ax.set_ylabel("weight bits")
        ax.set_title(f"allocation: {res.alloc.avg_bits:.2f} average bits (budget {res.alloc.budget_bits:.2f})")
        ax.legend(fontsize=7, ncol=4)
        pngs.append(_save(fig, d / "allocation.png"))
    if plan.schedule:
        fig, ax = plt.subplots(figsize=(8, 3))
        steps = range(len(plan.schedule))
        ax.plot(steps, res.redundancy, "o-", label="D_t (residual change)")
        hi = [i for i, v in enumerate(plan.schedule) if v == "high"]
        ax.scatter(hi, [0] * len(hi), marker="s", color="red", label="high (bf16 activations)")
        ax.set_xlabel("step")
        ax.set_title("activation schedule")
        ax.legend(fontsize=7)
        pngs.append(_save(fig, d / "act_schedule.png"))
    if res.pred is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for u, pr in res.pred.pairs.items():
            if pr:
                ax.scatter([p[0] for p in pr], [p[1] for p in pr], s=8, label=u)
        xs = np.array([p[0] for pr in res.pred.pairs.values() for p in pr] or [0.0, 1.0])
        xx = np.linspace(xs.min(), xs.max(), 20)
        ax.plot(xx, res.pred.a * xx + res.pred.b, "k-", label=f"E = {res.pred.a:.3g} G + {res.pred.b:.3g}")
        ax.axhline(res.pred.threshold, color="r", ls="--", label="threshold")
        ax.set_xlabel("Gamma (previous step)")
        ax.set_ylabel("E (block quantization error)")
        ax.set_title(f"DMPQ predictor fit, r = {res.pred.r:.2f}")
        ax.legend(fontsize=5, ncol=2)
        pngs.append(_save(fig, d / "predictor_fit.png"))
    lines = [f"# Calibration report: {title}", "", f"- samples: {res.selection}",
             f"- timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items())]
    if res.alloc is not None:
        counts = {f: sum(1 for e in plan.linears.values() if e.weight == f) for f in WEIGHT_FORMATS}
        lines.append(f"- weights: {res.alloc.avg_bits:.3f} average bits (budget {res.alloc.budget_bits:.3f}, menu "
                     f"minimum {res.alloc.min_bits:.3f}); " + ", ".join(f"{f} x{c}" for f, c in counts.items() if c))
    if plan.schedule:
        lines.append(f"- activation schedule: {' '.join('H' if v == 'high' else '.' for v in plan.schedule)} "
                     "(H = high = bf16 activations)")
    if res.balance is not None:
        sm = sum(1 for a in res.balance.alpha.values() if a is not None)
        lines.append(f"- smoothing on {sm} linear(s), rotation on {len(res.balance.rotation)}")
    if res.pred is not None:
        lines.append(f"- predictor: E = {res.pred.a:.4g} Gamma + {res.pred.b:.4g}, threshold {res.pred.threshold:.4g}, "
                     f"r = {res.pred.r:.3f}")
    if res.vc_info is not None:
        lines.append(f"- VC: {res.vc_info}")
    lines += ["", "| linear | W | A | S | alpha | rot |", "|---|---|---|---|---|---|"]
    for n, e in plan.linears.items():
        s = f"{res.sens.score[n]:.3f}" if res.sens else "-"
        a = res.balance.alpha.get(n) if res.balance else None
        lines.append(f"| `{n}` | {e.weight} | {e.activation} | {s} | {a if a is not None else '-'} | "
                     f"{e.rotation or '-'} |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    path = d / "calibration.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
