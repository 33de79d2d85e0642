"""Policy sweeps: policies (at their defaults, plus threshold grids) × prompts × seeds against the FP run; one table
(markdown + JSON) and one quality-vs-compute picture with the Pareto front. ``qc-compile sweep`` drives this."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from qc_compile.errors import UserError

SWEEP_SCHEMA_VERSION = 1


@dataclass
class SweepConfig:
    label: str
    policy: str
    overrides: dict = field(default_factory=dict)


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["teacache.rel_l1_thresh=0.1,0.2"]`` -> ``{"teacache.rel_l1_thresh": ["0.1", "0.2"]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--grid {item!r}: expected policy.param=v1,v2,..., e.g. teacache.rel_l1_thresh=0.1,0.2.")
        k, v = item.split("=", 1)
        vals = [x.strip() for x in v.split(",") if x.strip()]
        if not vals:
            raise UserError(f"--grid {item!r}: no values.")
        out[k.strip()] = vals
    return out


def expand_configs(policies: Sequence[str], grid: Mapping[str, list[str]] | None = None,
                   overrides: Mapping[str, Any] | None = None) -> list[SweepConfig]:
    """Each policy at its defaults (with ``overrides`` that apply to it), then the grid points of the policies whose
    components the grid keys name (cartesian product per policy)."""
    from qc_compile.runtime.policies import expand

    configs: list[SweepConfig] = []
    grid = dict(grid or {})
    used = set()
    for spec in policies:
        spec, names = expand(spec)
        base = {k: v for k, v in (overrides or {}).items() if k.split(".", 1)[0] in names}
        configs.append(SweepConfig(spec, spec, dict(base)))
        keys = [k for k in grid if k.split(".", 1)[0] in names or k.split(".", 1)[0] == spec]
        used.update(keys)
        for combo in itertools.product(*(grid[k] for k in keys)) if keys else ():
            ov = dict(base)
            for k, v in zip(keys, combo):
                pol, param = k.split(".", 1)
                ov[(k if pol in names else (names[0] + "." + param))] = v
            label = spec + " " + " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in zip(keys, combo))
            configs.append(SweepConfig(label, spec, ov))
    unused = set(grid) - used
    if unused:
        raise UserError(f"--grid {', '.join(sorted(unused))}: no policy in --policies has that component.")
    return configs


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _task(pipe, configs: Sequence[SweepConfig], prompts: list[str], seed: int, steps, size, want_trace: bool) -> list:
    """Every config on one call (one prompt, or the batch): per config, its per-video records (and the first call's
    trace and metrics)."""
    out = []
    for cfg in configs:
        res = pipe(prompts, policy=cfg.policy, overrides=cfg.overrides, seed=seed, steps=steps, reference=True,
                   **dict(size or {}))
        m = res.metrics()
        ref = m["reference"]
        recs = []
        for k, pv in enumerate(ref["per_video"]):
            recs.append({"config": cfg.label, "seed": seed + (k if len(prompts) > 1 else 0), "prompt": pv["prompt"],
                         "psnr_db": pv["psnr_db"], "ssim": pv["ssim"],
                         "checker_ok": m["checker"]["per_video"][k] if m["checker"] else None,
                         "fp_checker_ok": ref["checker_fp"]["per_video"][k] if ref.get("checker_fp") else None,
                         "compute_fraction": m["compute_fraction"], "flop_fraction": m["flop_fraction"],
                         "seconds": res.seconds / len(prompts)})
        out.append({"records": recs, "trace": res.trace() if want_trace else None,
                    "metrics": m if want_trace else None})
    return out


_WORKER_PIPES: dict = {}
_WORKER_FP: dict = {}


def worker_pipeline(pipe_kwargs: Mapping):
    """This worker's pipeline for ``pipe_kwargs`` (built once). Pipelines of the same model and checkpoint share one FP
    reference cache: a sweep over several work dirs of one model computes each FP video once per worker."""
    key = tuple(sorted((k, str(v)) for k, v in pipe_kwargs.items()))
    if key not in _WORKER_PIPES:
        import torch

        from qc_compile.runtime.pipeline import Pipeline

        torch.set_num_threads(1)
        pipe = Pipeline(**pipe_kwargs)
        pipe._fp_cache = _WORKER_FP.setdefault((pipe.loaded.config.name, str(pipe.loaded.checkpoint)), {})
        pipe.fp_cache_size = 1024  # a worker's share of prompts x seeds; qc-ref videos are small
        _WORKER_PIPES[key] = pipe
    return _WORKER_PIPES[key]


def _worker(args):
    pipe_kwargs, configs, prompts, seed, steps, size, want_trace = args
    return _task(worker_pipeline(pipe_kwargs), configs, prompts, seed, steps, size, want_trace)


def process_pool(jobs: int):
    """A pool of ``jobs`` worker processes. Forked workers cannot use CUDA once this process has initialized it
    ("Cannot re-initialize CUDA in forked subprocess"), so they are spawned then."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    ctx = multiprocessing.get_context("spawn") if torch.cuda.is_initialized() else None
    return ProcessPoolExecutor(jobs, mp_context=ctx)


def run_sweep(pipe, configs: Sequence[SweepConfig], prompts: Sequence[str], seeds: Sequence[int], *,
              steps: int | None = None, batch: bool = False, out_dir: Path | None = None,
              size: Mapping[str, int | None] | None = None, jobs: int = 1, pipe_kwargs: Mapping | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run every config over prompts × seeds (per prompt with noise seed ``seed + k``, or the whole prompt list in one
    batch with ``batch=True``: then the policies see batch-aggregated statistics and decide once for the batch).

    ``jobs > 1`` spreads the calls over that many single-threaded worker processes, each building its own pipeline
    from ``pipe_kwargs`` (the ``Pipeline`` constructor's arguments); every worker computes the FP reference of its
    prompts once and runs all configs on them.
    """
    prompts = list(prompts)
    calls = []
    for seed in seeds:
        calls += [(prompts, seed)] if batch else [([p], seed + k) for k, p in enumerate(prompts)]
    start = time.perf_counter()
    if jobs > 1:
        with process_pool(jobs) as pool:
            results = list(pool.map(_worker, [(dict(pipe_kwargs or {}), list(configs), cp, cs, steps, size, i == 0)
                                              for i, (cp, cs) in enumerate(calls)]))
    else:
        results = []
        for i, (cp, cs) in enumerate(calls):
            results.append(_task(pipe, configs, cp, cs, steps, size, i == 0))
            log(f"  call {i + 1}/{len(calls)} done ({time.perf_counter() - start:.0f} s)")
    rows, records = aggregate(configs, results, out_dir, log)
    return {"schema_version": SWEEP_SCHEMA_VERSION, "prompts": prompts, "seeds": list(seeds), "batch": batch,
            "steps": steps, "jobs": jobs, "seconds": round(time.perf_counter() - start, 1), "rows": rows,
            "videos": records}


def aggregate(configs: Sequence[SweepConfig], results: Sequence[list], out_dir: Path | None,
              log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    """Rows (one per config, means over the calls' videos) and per-video records from ``_task`` results (one per
    call, the first with traces); writes out_dir/runs/<config>/ from the first call."""
    from qc_compile.artifacts import write_json_atomic
    from qc_compile.runtime.trace import plot_decisions

    rows, records = [], []
    for j, cfg in enumerate(configs):
        per_video = [r for res in results for r in res[j]["records"]]
        first = results[0][j]
        if out_dir is not None:
            d = Path(out_dir) / "runs" / "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in cfg.label)
            write_json_atomic(d / "trace.json", first["trace"])
            write_json_atomic(d / "metrics.json", first["metrics"])
            plot_decisions(first["trace"], d / "decisions.png")
        fracs = [res[j]["records"][0]["compute_fraction"] for res in results]
        flops = [res[j]["records"][0]["flop_fraction"] for res in results]
        psnrs = [r["psnr_db"] for r in per_video]
        checks = [r["checker_ok"] for r in per_video if r["checker_ok"] is not None]
        fp_checks = [r["fp_checker_ok"] for r in per_video if r["fp_checker_ok"] is not None]
        row = {
            "config": cfg.label, "policy": cfg.policy, "overrides": cfg.overrides,
            "compute_fraction": _mean(fracs), "flop_fraction": _mean(flops),
            "psnr_db": _mean(psnrs), "psnr_db_min": min(psnrs) if psnrs else None,
            "ssim": _mean([r["ssim"] for r in per_video]),
            "checker": _mean([float(c) for c in checks]), "checker_fp": _mean([float(c) for c in fp_checks]),
            "videos": len(per_video), "seconds_per_video": _mean([r["seconds"] for r in per_video]),
        }
        if row["checker"] is not None and row["checker_fp"] is not None:
            row["checker_drop_points"] = 100 * (row["checker_fp"] - row["checker"])
        rows.append(row)
        records += per_video
        chk = "-" if row["checker"] is None else f"{100 * row['checker']:.1f}%"
        log(f"{cfg.label:40s} compute {100 * row['compute_fraction']:5.1f}%  flops {100 * row['flop_fraction']:5.1f}%  "
            f"PSNR {row['psnr_db']:6.2f} dB  SSIM {row['ssim']:.4f}  checker {chk}  "
            f"({row['seconds_per_video']:.1f} s/video)")
    return rows, records


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v))):
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return format(v * scale, spec)


def to_markdown(result: Mapping[str, Any], title: str = "Policy sweep", notes: Sequence[str] = (),
                columns: Sequence[tuple[str, Callable[[Mapping[str, Any]], str]]] = ()) -> str:
    """The sweep's table (plus ``columns``: extra (header, row -> cell) pairs appended to each row)."""
    lines = [f"# {title}", ""]
    ctx = [f"{k}: {result[k]}" for k in ("model", "checkpoint", "device", "device_name", "steps", "caption_seed",
                                         "commit", "date")
           if result.get(k) is not None]
    if ctx:
        lines += ["- " + "; ".join(ctx), ""]
    lines += list(notes) + ([""] if notes else [])
    lines += ["| policy | compute % (unit evals) | block FLOPs % | PSNR dB (mean / min) | SSIM | checker % (FP) | "
              "checker drop (points) |" + "".join(f" {h} |" for h, _ in columns),
              "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(columns)]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {_fmt(r['compute_fraction'], '.1f', 100)} | "
                     f"{_fmt(r['flop_fraction'], '.1f', 100)} | {_fmt(r['psnr_db'], '.2f')} / "
                     f"{_fmt(r['psnr_db_min'], '.2f')} | {_fmt(r['ssim'], '.4f')} | {_fmt(r['checker'], '.1f', 100)} "
                     f"({_fmt(r['checker_fp'], '.1f', 100)}) | {_fmt(r.get('checker_drop_points'), '+.1f')} |"
                     + "".join(f" {cell(r)} |" for _, cell in columns))
    lines += ["", f"{len(result['prompts'])} prompts × seeds {result['seeds']}"
              f"{' (one batch per seed)' if result.get('batch') else ' (one run per prompt, noise seed + k)'}; "
              "PSNR/SSIM against the FP run of the same prompt and seed (the FP row is the reference itself).", ""]
    return "\n".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated (lower x = less compute, higher y = better), sorted by x."""
    idx = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(result: Mapping[str, Any], path, title: str = "quality vs compute") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qc_compile.artifacts import atomic_write

    # configs that skipped nothing sit at (100%, identical) and would squash the axis: listed in the table only
    rows = [r for r in result["rows"] if r["policy"] != "none" and r["psnr_db"] is not None
            and r["flop_fraction"] < 0.999]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "psnr_db", "PSNR vs FP (dB)"), (axes[1], "checker", "caption checker (%)")):
        pts = [(100 * r["flop_fraction"], (r[key] * (100 if key == "checker" else 1)) if r[key] is not None else None)
               for r in rows]
        ok = [i for i, p in enumerate(pts) if p[1] is not None]
        if not ok:
            ax.set_visible(False)
            continue
        for i in ok:
            ax.scatter(*pts[i], s=28, label=None)
            ax.annotate(rows[i]["config"], pts[i], fontsize=6.5, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([pts[i] for i in ok])
        fx = [pts[ok[i]][0] for i in front]
        fy = [pts[ok[i]][1] for i in front]
        ax.step(fx, fy, where="post", color="k", linewidth=0.8, alpha=0.6, label="Pareto front")
        if key == "checker" and result["rows"] and result["rows"][0].get("checker_fp") is not None:
            fp = _mean([r["checker_fp"] for r in result["rows"] if r.get("checker_fp") is not None])
            ax.axhline(100 * fp, color="gray", linestyle="--", linewidth=0.8, label="FP")
        ax.set_xlabel("block FLOPs computed (% of FP)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    skipped = [r["config"] for r in result["rows"] if r["policy"] != "none" and r["flop_fraction"] >= 0.999]
    fig.suptitle(title + (f"  (not drawn, computed everything: {', '.join(skipped)})" if skipped else ""),
                 fontsize=10)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
