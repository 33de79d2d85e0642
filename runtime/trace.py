"""Decision traces: the JSON record of a run, the compute accounting, and the units × steps picture.

``trace.json`` holds every decision per unit and step (the action the executor took, the precision variant, the
sub-blocks taken from the cache), the statistics the executor reported, and the step timings. Two compute measures:

* ``compute_fraction`` — block-unit evaluations computed / all block-unit evaluations (a unit computed with some
  sub-blocks from the cache counts as computed);
* ``flop_fraction`` — analytic FLOPs of what was computed / FLOPs of computing everything (block units only; a
  sub-block taken from the cache costs nothing). This is the fair measure for sub-block caches (PAB, FORA).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from qc_compile.models.units import block_units, is_block

TRACE_SCHEMA_VERSION = 1


def unit_flops(config: Any, geometry: Any) -> dict[str, dict[str, float]]:
    """Multiply-add FLOPs (×2) per sub-block of each block unit, for one batch element."""
    C = config.hidden_size
    H = int(C * config.mlp_ratio)
    L = config.model_max_length
    T, S = geometry.T, geometry.S
    N = T * S
    out = {}
    for i in range(config.depth):
        for kind, seq in (("spatial", S), ("temporal", T)):
            out[f"{kind}_{i}"] = {
                "attn": 2 * N * C * 3 * C + 2 * N * C * C + 4 * N * seq * C,
                "cross": 2 * N * C * C + 4 * L * C * C + 2 * N * C * C + 4 * N * L * C,
                "mlp": 4 * N * C * H,
            }
    return out


def compute_fractions(steps: Iterable[Any], unit_names: Iterable[str],
                      costs: Mapping[str, Mapping[str, float]] | None = None) -> tuple[float, float]:
    """(compute_fraction, flop_fraction) of a run's step records (``StepRecord`` or trace dicts)."""
    blocks = block_units(unit_names)
    done = total = flops = flops_total = 0.0
    for s in steps:
        dec = s.decisions if hasattr(s, "decisions") else s["decisions"]
        for u in blocks:
            d = dec.get(u, {})
            action = d.get("action", "compute")
            total += 1
            c = costs.get(u) if costs else None
            full = sum(c.values()) if c else 1.0
            flops_total += full
            if action == "compute":
                done += 1
                flops += full - (sum(c.get(p, 0.0) for p in d.get("parts", ())) if c else 0.0)
    if not total:
        return 1.0, 1.0
    return done / total, flops / flops_total


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))) else round(float(v), 7)


def build_trace(*, policy: dict, unit_names: Iterable[str], steps: Iterable[Any], settings: dict,
                prompts: list[str], costs: Mapping[str, Mapping[str, float]] | None, seconds: float,
                extra: dict | None = None) -> dict:
    """The ``trace.json`` document of one run (JSON-ready)."""
    units = list(unit_names)
    steps = list(steps)
    cf, ff = compute_fractions(steps, units, costs)
    rows = []
    for s in steps:
        rows.append({
            "index": s.index, "t": round(float(s.t), 4), "seconds": round(float(s.seconds), 5),
            "decisions": {u: dict(s.decisions.get(u, {"action": "compute", "variant": "default"}))
                          for u in units if is_block(u)},
            "stats": {u: {k: _clean(v) for k, v in s.stats.get(u, {}).items()} for u in units if s.stats.get(u)},
        })
    step_secs = [r["seconds"] for r in rows]
    doc = {
        "schema_version": TRACE_SCHEMA_VERSION,
        "policy": policy,
        "prompts": prompts,
        "settings": settings,
        "units": units,
        "sub_block_flops": {u: dict(c) for u, c in (costs or {}).items()},
        "compute_fraction": cf,
        "flop_fraction": ff,
        "timings": {"total_seconds": round(seconds, 4), "step_seconds": step_secs,
                    "step_seconds_median": sorted(step_secs)[len(step_secs) // 2] if step_secs else None},
        "steps": rows,
    }
    if extra:
        doc.update(extra)
    return doc


# ---------------------------------------------------------------------------------------------------- picture
CATEGORIES: list[tuple[str, str]] = [
    ("computed (default)", "#2b6cb0"),
    ("computed (high)", "#08306b"),
    ("computed (fp)", "#6a3d9a"),
    ("computed (low)", "#9ecae1"),
    ("computed, some sub-blocks cached", "#41ab5d"),
    ("cached (reused)", "#fd8d3c"),
    ("pruned", "#e0e0e0"),
]
_VARIANT_CAT = {"default": 0, "mid": 0, "high": 1, "fp": 2, "low": 3}


def _category(d: Mapping[str, Any]) -> int:
    action = d.get("action", "compute")
    if action == "reuse":
        return 5
    if action == "prune":
        return 6
    if d.get("parts"):
        return 4
    return _VARIANT_CAT.get(d.get("variant", "default"), 0)


def plot_decisions(trace: Mapping[str, Any], path, title: str | None = None) -> None:
    """units × steps grid of a trace: computed (colour = precision variant) / sub-blocks cached / reused / pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from qc_compile.artifacts import atomic_write

    units = [u for u in trace["units"] if is_block(u)]
    steps = trace["steps"]
    grid = [[_category(s["decisions"].get(u, {})) for s in steps] for u in units]
    gated = [(j, i) for i, u in enumerate(units) for j, s in enumerate(steps) if s["decisions"].get(u, {}).get("gated")]
    used = sorted({c for row in grid for c in row})
    fig_w = max(6.0, 0.28 * len(steps) + 2.5)
    fig_h = max(2.6, 0.32 * len(units) + 1.9)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    cmap = ListedColormap([c for _, c in CATEGORIES])
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(CATEGORIES) - 0.5, aspect="auto", interpolation="nearest")
    if gated:
        ax.scatter([g[0] for g in gated], [g[1] for g in gated], s=4, c="white", marker="o", linewidths=0)
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ticks = list(range(0, len(steps), max(1, len(steps) // 15)))
    ax.set_xticks(ticks, [str(k) for k in ticks], fontsize=7)
    ax.set_xlabel("step (t from 1000 down to 0)", fontsize=8)
    ax.set_xticks([x - 0.5 for x in range(len(steps) + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(len(units) + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    pol = trace.get("policy", {})
    name = pol.get("name", "?") if isinstance(pol, Mapping) else str(pol)
    ax.set_title(title or f"{name}: {100 * trace['compute_fraction']:.1f}% of unit evaluations computed "
                          f"({100 * trace['flop_fraction']:.1f}% of block FLOPs)", fontsize=9)
    handles = [Patch(color=CATEGORIES[c][1], label=CATEGORIES[c][0]) for c in used]
    if gated:
        handles.append(Patch(color="white", label="• decided in-step by a gate"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16 - 1.2 / fig_h / 4),
              ncol=min(4, len(handles)), fontsize=7, frameon=False)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
