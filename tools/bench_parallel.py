"""Issues 18/19: one Open-Sora 1.2 video over 1, 2, 4 GPUs of one host (CFG x dynamic sequence parallel).

STDiT3-XL/2 with random weights at 720p 9:16 (latent 90 x 160, 45 x 80 = 3,600 tokens per frame), 51 and 102
frames (15 and 30 latent frames), CFG batch 2, 30 RFLOW steps, in two configurations:

``bf16``      BF16 eager, the torch runner, every unit computed;
``headline``  our headline: the torch-fast runner with the FP8 W8A8 block plan under the quantcache decision grid
              replayed from the qc-ref run (``bench/results/e2e_qcref.json``, mapped by relative depth, as
              ``tools/bench_e2e.py`` does: random weights make adaptive statistics meaningless; the executor still
              computes and all-gathers every statistic, so the timing includes that cost).

Per (configuration, frames, GPUs): seconds of the whole 30-step sampling loop (CUDA-synchronised, after a 2-step
warm-up, the slowest rank), speedup and efficiency against 1 GPU, the communication share of the loop (CUDA events
around every collective, mean and max over ranks; it includes waiting for a slower rank), peak memory per GPU,
whether every rank took the same decisions (a hash of all decisions compared over ranks) and held the same weights.

    python tools/bench_parallel.py run --gpus 1,2 --out bench/results/parallel_h100.json          # appends rows
    python tools/bench_parallel.py render bench/results/parallel_h100.json                       # .md + .png
    python tools/bench_parallel.py run --quick --device cpu --gpus 1,2 --out /tmp/p.json          # gloo smoke test

Each ``--gpus`` count is one launch (processes, model, warm-up); rows of an existing ``--out`` with the same
(configuration, frames, GPUs) are replaced, so counts can be measured in separate commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lib import ReplayPolicy, map_grid, xl_model  # noqa: E402
from bench_lib import commit as _commit  # noqa: E402


def compute_fraction(grid: list[dict[str, dict]], units: list[str]) -> float:
    """Share of (step, block unit) pairs the replayed grid computes."""
    done = sum(1 for s in grid for u in units if s.get(u, {}).get("action", "compute") == "compute")
    return done / (len(grid) * len(units))

HEIGHT, WIDTH = 720, 1280
GRID = Path(__file__).resolve().parent.parent / "bench" / "results" / "e2e_qcref.json"
LABELS = {"bf16": "BF16 eager (torch runner)", "headline": "FP8 + quantcache grid (torch-fast runner)"}


# ------------------------------------------------------------------------------------------------ one rank
def _model(quick: bool, device: str):
    if not quick:
        return xl_model()
    from qc_compile.models import load_model

    torch.manual_seed(0)
    return load_model("qc-ref", device=device, random_weights=True).model


def _executor(kind: str, model, g, plan, args):
    from qc_compile.runtime.parallel import shard_runner
    from qc_compile.runtime.runners.torch import TorchRunner
    from qc_compile.runtime.step_executor import StepExecutor

    if kind == "headline" and str(args.device).startswith("cuda"):
        from qc_compile.runtime.runners.fast import FastRunner

        runner = FastRunner(model, g, plan, compile=args.compile, cuda_graphs=args.cuda_graphs)
    else:  # bf16, or the CPU smoke test's stand-in for the headline (the fast kernels need CUDA)
        runner = TorchRunner(model, g)
    return StepExecutor(shard_runner(runner, g), g)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _barrier(mesh) -> None:
    if mesh is not None:
        import torch.distributed as dist

        dist.barrier()


def _gather_floats(mesh, values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (one all_gather); ``[values]`` in a single process."""
    if mesh is None:
        return [values]
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=mesh.device)
    out = [torch.empty_like(t) for _ in range(mesh.world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def bench_rank(args_d: dict, rows_path: str, gpus: int) -> None:
    """Every (configuration, frames) case on this rank; rank 0 appends the rows to ``rows_path`` (JSON lines)."""
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.fast_blocks import fp8_block_plan
    from qc_compile.runtime.parallel import current_mesh
    from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig

    args = argparse.Namespace(**args_d)
    mesh = current_mesh()
    rank0 = mesh is None or mesh.rank == 0
    torch.set_grad_enabled(False)
    device = str(mesh.device) if mesh is not None else args.device
    model = _model(args.quick, device)
    cfg = model.config
    wsum = sum(float(p.float().sum()) for p in model.parameters())
    same_weights = True if mesh is None else mesh.agree(hashlib.sha256(repr(wsum).encode()).digest())
    plan = fp8_block_plan(model) if str(args.device).startswith("cuda") else None
    src = json.loads(GRID.read_text())
    units = [u for u in model.unit_names() if u.startswith(("spatial_", "temporal_"))]
    for frames in args.frames:
        g = Geometry.for_model(cfg, frames, args.height, args.width)
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(1, cfg.in_channels, g.frames, g.height, g.width, generator=gen).to(device)
        y = (torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels, generator=gen) * 0.2).to(device)
        mask = torch.zeros(1, cfg.model_max_length, dtype=torch.bool)
        mask[:, : min(120, cfg.model_max_length)] = True
        mask = mask.to(device)
        y_null = model.y_embedder.y_embedding[None, None].float().to(device)
        for kind in args.configs:
            grid = (map_grid(src["grid_both"], src["depth"], cfg.depth)[: args.steps] if kind == "headline"
                    else [{} for _ in range(args.steps)])
            ex = _executor(kind, model, g, plan, args)

            def sample(steps: int):
                s = RFlowSampler(SamplerConfig(num_steps=steps, cfg_scale=7.0, shift=cfg.timestep_shift))
                return s.sample(ex, z, y, mask, y_null, cfg.default_fps, video_size=(frames, args.height, args.width),
                                policy=ReplayPolicy(grid), progress=False)

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            sample(min(2, args.steps))  # compile, autotune, graph capture, NCCL warm-up
            _sync()
            warm = time.perf_counter() - t0
            _barrier(mesh)
            if mesh is not None:
                mesh.timer.reset(True)
            t0 = time.perf_counter()
            res = sample(args.steps)
            _sync()
            secs = time.perf_counter() - t0
            comm = mesh.timer.seconds() if mesh is not None else 0.0
            if mesh is not None:
                mesh.timer.reset(False)
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
            digest = hashlib.sha256(json.dumps([s.decisions for s in res.steps], sort_keys=True).encode()).digest()
            agree = True if mesh is None else mesh.agree(digest)
            per_rank = _gather_floats(mesh, [secs, comm, peak, warm])
            label = LABELS[kind] if kind == "bf16" or plan is not None else "quantcache grid (torch runner, CPU stand-in)"
            row = {"config": kind, "label": label, "frames": frames, "latent_frames": g.frames,
                   "tokens": g.N, "gpus": gpus, "parallel": mesh.describe() if mesh else None,
                   "seconds": max(r[0] for r in per_rank), "seconds_per_rank": [r[0] for r in per_rank],
                   "comm_share_mean": statistics.mean(r[1] / r[0] for r in per_rank),
                   "comm_share_max": max(r[1] / r[0] for r in per_rank),
                   "peak_mem_gib_per_rank": [r[2] for r in per_rank], "warmup_seconds": max(r[3] for r in per_rank),
                   "step_seconds_median": statistics.median(s.seconds for s in res.steps), "steps": len(res.steps),
                   "compute_fraction": compute_fraction(grid, units),
                   "decisions_identical_across_ranks": agree, "weights_identical_across_ranks": same_weights,
                   "latent_finite": bool(torch.isfinite(res.z).all()), "executor": ex.describe()}
            if rank0:
                with open(rows_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: row[k] for k in ("config", "frames", "gpus", "seconds", "comm_share_max",
                                                     "decisions_identical_across_ranks")}), flush=True)
            del ex
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ driver
def _env(args) -> dict:
    d = {"commit": _commit(args.commit), "torch": torch.__version__, "python": platform.python_version(),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE", "0 (set by the launcher)")}
    if str(args.device).startswith("cuda") and torch.cuda.is_available():
        d["device"] = torch.cuda.get_device_name()
        d["gpus_visible"] = torch.cuda.device_count()
        d["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        d["device"] = f"cpu ({platform.processor() or platform.machine()}), gloo"
    return d


def _derive(rows: list[dict]) -> None:
    base = {(r["config"], r["frames"]): r["seconds"] for r in rows if r["gpus"] == 1}
    for r in rows:
        b = base.get((r["config"], r["frames"]))
        r["speedup"] = None if b is None else b / r["seconds"]
        r["efficiency"] = None if b is None else b / r["seconds"] / r["gpus"]


def run(args) -> None:
    from qc_compile.artifacts import write_json_atomic
    from qc_compile.runtime.parallel import ParallelConfig, launch

    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    args_d = {k: v for k, v in vars(args).items() if k != "fn"}
    out.parent.mkdir(parents=True, exist_ok=True)

    def fold(path: Path) -> None:
        """Rows rank 0 appended to ``path`` replace the same (configuration, frames, GPUs) rows of ``doc``."""
        new = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        keys = {(r["config"], r["frames"], r["gpus"]) for r in new}
        doc["rows"] = [r for r in doc["rows"] if (r["config"], r["frames"], r["gpus"]) not in keys] + new

    def save() -> None:
        doc["rows"].sort(key=lambda r: (r["config"], r["frames"], r["gpus"]))
        _derive(doc["rows"])
        write_json_atomic(out, doc)

    # Rank 0 appends each row beside --out as soon as it is measured, so a launch killed by a time limit keeps the
    # rows it finished; the next run folds such leftovers in before it starts.
    for path in sorted(out.parent.glob(f"{out.stem}.partial-gpus*.jsonl")):
        fold(path)
        save()
        path.unlink()
    doc.update(what=("one video over several GPUs: STDiT3-XL/2 random weights" if not args.quick else
                     "smoke test: qc-ref random weights on gloo processes"),
               size={"height": args.height, "width": args.width}, steps=args.steps, parallel_mode=args.parallel,
               compile=args.compile, cuda_graphs=args.cuda_graphs,
               env=dict(doc.get("env", {}), **{f"run_gpus_{','.join(map(str, args.gpus))}": _env(args)}))
    for gpus in args.gpus:
        rows_path = out.parent / f"{out.stem}.partial-gpus{gpus}.jsonl"
        launch(bench_rank, (args_d, str(rows_path), gpus), config=ParallelConfig.for_gpus(gpus, args.parallel),
               device=args.device)
        fold(rows_path)
        save()
        rows_path.unlink(missing_ok=True)
    render(out)


def render(path: Path) -> None:
    doc = json.loads(Path(path).read_text())
    rows = doc["rows"]
    envs = doc.get("env", {})
    what = str(doc.get("what", ""))
    lines = [f"# {what[:1].upper() + what[1:]}, {doc['size']['height']}x{doc['size']['width']}, {doc['steps']} steps, "
             f"CFG batch 2", "", f"Headline rows: torch.compile {'on' if doc.get('compile') else 'off'}, CUDA graphs "
             f"{'on' if doc.get('cuda_graphs') else 'off'}.", ""]
    for k, e in envs.items():
        lines.append(f"- {k.replace('run_gpus_', 'GPUs ')}: {e.get('device')}, commit {e.get('commit')}, torch "
                     f"{e.get('torch')}, NCCL {e.get('nccl', '-')}, NVLS {e.get('nccl_nvls_enable')}, {e.get('date')}")
    lines += ["", f"Parallel mode `{doc.get('parallel_mode')}` (2 GPUs = CFG parallel, 4 = CFG x sequence 2). "
              "Seconds: the whole sampling loop, slowest rank, after a 2-step warm-up. Communication share: time "
              "inside collectives (CUDA events) / loop time, mean (max) over ranks, waiting for a slower rank "
              "included.", "",
              "| configuration | frames (latent) | GPUs | seconds | speedup | efficiency | comm share | peak GiB/GPU "
              "| decisions identical | units computed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        ef = "-" if r.get("efficiency") is None else f"{100 * r['efficiency']:.0f}%"
        mem = max(r["peak_mem_gib_per_rank"])
        lines.append(f"| {r['label']} | {r['frames']} ({r['latent_frames']}) | {r['gpus']} | {r['seconds']:.2f} | {sp} "
                     f"| {ef} | {100 * r['comm_share_mean']:.1f}% ({100 * r['comm_share_max']:.1f}%) | "
                     f"{'-' if mem != mem else f'{mem:.1f}'} | {r['decisions_identical_across_ranks']} | "
                     f"{100 * r['compute_fraction']:.1f}% |")
    if doc.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]]
    md = Path(path).with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {md} (no matplotlib here: run `render` where it is installed for the plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (c, f) in sorted({(r["config"], r["frames"]) for r in rows}):
        pts = sorted((r["gpus"], r["speedup"]) for r in rows if r["config"] == c and r["frames"] == f
                     and r.get("speedup") is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{c}, {f} frames")
    top = max([r["gpus"] for r in rows] + [2])
    ax.plot([1, top], [1, top], "k:", lw=1, label="linear")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("speedup vs 1 GPU")
    dev = next(iter(envs.values()), {}).get("device", "")
    ax.set_title(f"{dev}: one video, {doc['size']['height']}x{doc['size']['width']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=120)
    print(f"wrote {md} and {Path(path).with_suffix('.png')}")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--gpus", type=_ints, default=[1, 2])
    r.add_argument("--frames", type=_ints, default=[51, 102])
    r.add_argument("--configs", type=lambda s: s.split(","), default=["bf16", "headline"])
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--height", type=int, default=HEIGHT)
    r.add_argument("--width", type=int, default=WIDTH)
    r.add_argument("--parallel", default="auto", choices=("auto", "cfg", "sequence"))
    r.add_argument("--device", default="cuda")
    r.add_argument("--compile", action="store_true", help="torch.compile the fast blocks (headline)")
    r.add_argument("--cuda-graphs", action="store_true", help="per-unit CUDA graphs on the fast path (headline)")
    r.add_argument("--quick", action="store_true", help="qc-ref random weights, 2 steps, 16 frames 32x32 (smoke)")
    r.add_argument("--commit", default=None)
    r.add_argument("--out", required=True)
    d = sub.add_parser("render")
    d.add_argument("path", type=Path)
    a = ap.parse_args(argv)
    if a.cmd == "render":
        render(a.path)
        return 0
    if a.quick:
        a.steps, a.height, a.width = min(a.steps, 2), 32, 32
        a.frames = [f for f in a.frames if f <= 16] or [8, 16]
    run(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
