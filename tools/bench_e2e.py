"""6c: end-to-end sampling at Open-Sora 1.2 scale (STDiT3-XL/2, random weights, 480p 9:16, 51 frames, CFG, RFLOW).

Two parts, because decisions and fidelity need a trained model and the timing needs the real scale:

``qcref``  (any device; run on the CPU here) — the shipped ``qc-ref`` model, 30 steps, CFG: the FP run, ``quantcache``
           on the FP model (its per-step per-unit decision grid is what the XL run replays), our FP8 fast path
           (dynamic per-token activation scales) alone and under ``quantcache``, and the plan's static per-tensor
           scales (``torch_package``, the Q/DQ graphs' numerics) for comparison. PSNR/SSIM against the FP videos.
``xl``     (GPU) — in one process: BF16 eager (TorchExecutor), BF16 + torch.compile (the same blocks compiled),
           ours quantized only (FastExecutor, FP8 plan, compiled), ours cached only (FastExecutor, dense bf16,
           compiled, replayed grid), both. Seconds for the whole 30-step sampling loop (CUDA-synchronised wall
           clock after a warm-up run of 2 steps per configuration), speedup vs BF16 eager, fraction of unit
           evaluations computed, and the qc-ref fidelity beside it, labelled as such.

The grid replay: qc-ref has 4 spatial + 4 temporal blocks, STDiT3-XL/2 28 + 28; XL block ``j`` takes the decision
of qc-ref block ``floor(j * 4 / 28)`` of the same kind (relative depth: XL blocks 0-6 <- qc-ref block 0, 7-13 <- 1,
...). Random weights make adaptive statistics meaningless, so the XL run replays rather than decides; the executor
still computes every statistic a policy would read (stats="full"), so the timing includes that cost.

    python tools/bench_e2e.py qcref --out bench/results/e2e_qcref.json
    python tools/bench_e2e.py xl --grid bench/results/e2e_qcref.json --out OUT --commit abc1234
    python tools/bench_e2e.py render bench/results/e2e_h100.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

XL_FRAMES, XL_HEIGHT, XL_WIDTH = 51, 480, 853  # 480p 9:16 -> latent 15 x 60 x 106 -> 15 x 30 x 53 tokens


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _env(commit: str | None) -> dict:
    import triton

    d = {"commit": _commit(commit), "torch": torch.__version__, "triton": triton.__version__,
         "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
         "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
    if torch.cuda.is_available():
        d["cuda"] = torch.version.cuda
    return d


# ------------------------------------------------------------------------------------------------ replay policy
def map_grid(grid: list[dict[str, dict]], src_depth: int, dst_depth: int) -> list[dict[str, dict]]:
    """Decisions of a ``src_depth``-block model mapped to ``dst_depth`` blocks by relative depth."""
    out = []
    for step in grid:
        row = {}
        for kind in ("spatial", "temporal"):
            for j in range(dst_depth):
                d = step.get(f"{kind}_{j * src_depth // dst_depth}")
                if d is not None:
                    row[f"{kind}_{j}"] = d
        out.append(row)
    return out


class ReplayPolicy:
    """Replays recorded decisions (action + variant per unit and step); observes nothing."""

    name = "replay"

    def __init__(self, grid: list[dict[str, dict]]) -> None:
        self.grid = grid

    def reset(self, unit_names, num_steps: int) -> None:
        if num_steps > len(self.grid):
            raise ValueError(f"grid has {len(self.grid)} steps, the run {num_steps}")

    def decide(self, step):
        from qc_compile.runtime.policy import Action, UnitDecision

        acts = {"compute": Action.COMPUTE, "reuse": Action.REUSE, "prune": Action.PRUNE}
        return {u: UnitDecision(acts[d["action"]], d.get("variant", "default"))
                for u, d in self.grid[step.index].items()}

    def observe(self, step, stats) -> None:
        pass


def compute_fraction(grid: list[dict[str, dict]], units: list[str]) -> float:
    total = len(grid) * len(units)
    done = sum(1 for s in grid for u in units if s.get(u, {}).get("action", "compute") == "compute")
    return done / total


# ------------------------------------------------------------------------------------------------ qc-ref part
def run_qcref(args) -> None:
    from qc_compile.calib.ranges import RangeCollector, default_prompts
    from qc_compile.metrics.fidelity import compare_videos
    from qc_compile.models import load_model
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.fast_blocks import fp8_block_plan
    from qc_compile.runtime.runners.fast import FastRunner
    from qc_compile.runtime.step_executor import StepExecutor
    from qc_compile.runtime.generation import GenerationSettings, generate
    from qc_compile.runtime.policies import get_policy
    from qc_compile.torch_package import apply_plan

    torch.set_grad_enabled(False)
    loaded = load_model("qc-ref", device=args.device)
    prompts = default_prompts("qc-ref", args.prompts, seed=args.prompt_seed)
    calib_prompts = default_prompts("qc-ref", args.calib_prompts, seed=1234)
    settings = GenerationSettings.defaults(loaded, seed=0)
    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    model = loaded.model
    results: dict[str, dict] = {}

    def run(name: str, executor, policy=None) -> tuple[torch.Tensor, list]:
        t0 = time.perf_counter()
        videos, sample = generate(loaded, prompts, settings, policy=policy, executor=executor, progress=False)
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        return videos, sample.steps

    fp_videos, _ = run("fp", torch_executor(model, g))

    def record(name: str, videos: torch.Tensor, steps: list, what: str) -> dict:
        per = [compare_videos(v, r) for v, r in zip(videos, fp_videos)]
        units = [u for u in model.unit_names() if u.startswith(("spatial_", "temporal_"))]
        grid = [{u: s.decisions.get(u, {"action": "compute", "variant": "default"}) for u in units} for s in steps]
        results[name] = {"what": what, "psnr_db": sum(p["psnr_db"] for p in per) / len(per),
                         "ssim": sum(p["ssim"] for p in per) / len(per),
                         "psnr_db_per_video": [p["psnr_db"] for p in per],
                         "compute_fraction": compute_fraction(grid, units)}
        print(name, {k: v for k, v in results[name].items() if k != "what"}, flush=True)
        return {"grid": grid}

    v, st = run("cached", torch_executor(model, g), get_policy("quantcache", None, None, seed=0))
    grid = record("cached_only", v, st, "quantcache on the FP model (torch executor); its decisions are replayed")
    plan = fp8_block_plan(model)
    v, st = run("quant", StepExecutor(FastRunner(model, g, plan), g))
    record("quantized_only", v, st, "our fast path: W8A8 FP8 on all block linears, dynamic per-token activation "
                                   "scales (qc:: ops, CPU reference kernels), fp32 model")
    v, st = run("both", StepExecutor(FastRunner(model, g, plan), g), get_policy("quantcache", None, None, seed=0))
    both = record("both", v, st, "our FP8 fast path under quantcache (decisions from the quantized model's "
                                 "statistics)")
    # the static per-tensor scales of the plan (what the Q/DQ graphs / torch_package compute), calibrated on
    # other prompts: the comparison the dynamic scales are measured against
    with RangeCollector(model) as rc:
        generate(loaded, calib_prompts, settings, executor=torch_executor(model, g), progress=False)
    static_plan = fp8_block_plan(model, rc.reduce())
    qmodel = apply_plan(copy.deepcopy(loaded), static_plan, device=args.device).model
    v, st = run("static", torch_executor(qmodel, g))
    record("quantized_static_scales", v, st, "the same W8A8 FP8 plan with static per-tensor activation scales "
                                            f"(max ranges over {len(calib_prompts)} other prompts x 30 steps; "
                                            "torch_package fake quantization = the Q/DQ graphs' numerics)")
    doc = {"model": "qc-ref", "prompts": prompts, "calibration_prompts": calib_prompts, "seed": 0,
           "steps": settings.steps, "cfg": settings.cfg, "size": [settings.frames, settings.height, settings.width],
           "policy": "quantcache (defaults at this commit)", "env": _env(args.commit), "results": results,
           "grid": grid["grid"], "grid_both": both["grid"], "depth": loaded.config.depth,
           "note": "fidelity = mean over prompts of PSNR/SSIM of the video against the FP (fp32, policy none) "
                   "video with the same seed; qc-ref in fp32 on this device"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")


# ------------------------------------------------------------------------------------------------ XL part
def xl_model(depth: int | None = None):
    """STDiT3-XL/2 with random weights, built on the GPU in bf16 (Open-Sora's init, so temporal blocks would start as
    the identity; their output projections are re-drawn so every block does real work)."""
    from qc_compile.models.config import OPENSORA_V12
    from qc_compile.models.stdit3 import STDiT3

    cfg = OPENSORA_V12 if depth is None else dataclasses.replace(OPENSORA_V12, depth=depth)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = STDiT3(cfg)
        m.initialize_weights()
        for b in m.temporal_blocks:
            for lin in (b.attn.proj, b.cross_attn.proj, b.mlp.fc2):
                torch.nn.init.xavier_uniform_(lin.weight)
    return m.to(torch.bfloat16).eval()


def xl_inputs(cfg, n: int = 1, valid: int = 120, seed: int = 0):
    """Noise (n, 4, 15, 60, 106), T5-sized caption features (n, 1, 300, 4096) with ``valid`` tokens, null caption."""
    from qc_compile.models.stdit3 import Geometry

    g = Geometry.for_model(cfg, XL_FRAMES, XL_HEIGHT, XL_WIDTH)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cfg.in_channels, g.frames, g.height, g.width, generator=gen)
    y = torch.randn(n, 1, cfg.model_max_length, cfg.caption_channels, generator=gen) * 0.2
    mask = torch.zeros(n, cfg.model_max_length, dtype=torch.bool)
    mask[:, :valid] = True
    return g, z.cuda(), y.cuda(), mask.cuda()


def compile_blocks(model) -> None:
    """BF16 + torch.compile: each block's forward through one compiled function (one graph per block kind)."""
    import types

    import torch._dynamo

    from qc_compile.models.stdit3 import STDiT3Block

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    fn = torch.compile(STDiT3Block.forward, dynamic=False)
    for b in list(model.spatial_blocks) + list(model.temporal_blocks):
        b.forward = types.MethodType(fn, b)


def run_xl(args) -> None:
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.fast_blocks import fp8_block_plan
    from qc_compile.runtime.runners.fast import FastRunner
    from qc_compile.runtime.step_executor import StepExecutor
    from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig

    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = True
    src = json.loads(Path(args.grid).read_text())
    model = xl_model(args.depth)
    cfg = model.config
    g, z, y, mask = xl_inputs(cfg)
    y_null = model.y_embedder.y_embedding[None, None].float().repeat(1, 1, 1, 1)
    grid = map_grid(src["grid"], src["depth"], cfg.depth)[: args.steps]
    grid_both = map_grid(src.get("grid_both", src["grid"]), src["depth"], cfg.depth)[: args.steps]
    units = [u for u in model.unit_names() if u.startswith(("spatial_", "temporal_"))]
    sampler = RFlowSampler(SamplerConfig(num_steps=args.steps, cfg_scale=7.0))
    plan = fp8_block_plan(model)
    compiled_model = None

    def sample(executor, policy, steps_override=None):
        s = sampler if steps_override is None else RFlowSampler(SamplerConfig(num_steps=steps_override,
                                                                              cfg_scale=7.0))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = s.sample(executor, z, y, mask, y_null, cfg.default_fps, video_size=(XL_FRAMES, XL_HEIGHT, XL_WIDTH),
                       policy=policy, progress=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, res

    rows = []
    configs = [
        ("bf16_eager", "BF16 eager (TorchExecutor)", "plain", None, grid_none(len(grid), units)),
        ("bf16_compile", "BF16 + torch.compile (same blocks)", "compiled", None, grid_none(len(grid), units)),
        ("ours_quant", "ours, quantized only (FP8 W8A8, fast path, compiled)", "fast", plan,
         grid_none(len(grid), units)),
        ("ours_cached", "ours, cached only (quantcache grid, bf16 fast path, compiled)", "fast", None, grid),
        ("ours_both", "ours, quantized + cached (FP8 + quantcache grid)", "fast", plan, grid_both),
    ]
    for key, label, kind, p, gr in configs:
        if args.only and key not in args.only:
            continue
        t_build = time.perf_counter()
        if kind == "plain":
            ex = torch_executor(model, g)
        elif kind == "compiled":
            if compiled_model is None:
                compiled_model = model  # the blocks' forwards are swapped in place; restored below
                compile_blocks(model)
            ex = torch_executor(model, g)
        else:
            ex = StepExecutor(FastRunner(model, g, p, compile=not args.no_compile, cuda_graphs=args.cuda_graphs), g)
        build_s = time.perf_counter() - t_build
        try:
            warm_s, _ = sample(ex, ReplayPolicy(gr), steps_override=min(2, args.steps))  # compile, autotune, capture
            secs, res = sample(ex, ReplayPolicy(gr))
        except Exception as err:  # noqa: BLE001  (record and go on: one broken row must not lose the others)
            import traceback

            traceback.print_exc()
            rows.append({"key": key, "label": label, "error": f"{type(err).__name__}: {err}"[:2000]})
            del ex
            torch.cuda.empty_cache()
            continue
        step_s = [r.seconds for r in res.steps]
        cf = compute_fraction(gr, units)
        row = {"key": key, "label": label, "seconds": secs, "step_seconds_median": statistics.median(step_s),
               "steps": len(res.steps), "compute_fraction": cf, "warmup_seconds": warm_s, "build_seconds": build_s,
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
               "latent_finite": bool(torch.isfinite(res.z).all())}
        if hasattr(ex, "describe"):
            row["executor"] = ex.describe()
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "executor"}), flush=True)
        if kind == "compiled":
            for b in list(model.spatial_blocks) + list(model.temporal_blocks):
                del b.forward  # back to the class's eager forward
        del ex
        torch.cuda.empty_cache()
    base = next((r["seconds"] for r in rows if r["key"] == "bf16_eager" and "seconds" in r), None)
    for r in rows:
        if "seconds" in r:
            r["speedup_vs_bf16_eager"] = None if base is None else base / r["seconds"]
    fid = src["results"]
    fid_map = {"bf16_eager": None, "bf16_compile": None, "ours_quant": "quantized_only", "ours_cached": "cached_only",
               "ours_both": "both"}
    for r in rows:
        k = fid_map.get(r["key"])
        r["fidelity_qcref"] = None if k is None or k not in fid else {x: fid[k][x] for x in ("psnr_db", "ssim", "compute_fraction")}
    doc = {"what": "6c end to end, STDiT3-XL/2 random weights, 480p 9:16 (latent 15x60x106, 23,850 tokens), "
                   f"51 frames, CFG batch 2, {args.steps} RFLOW steps", "env": _env(args.commit),
           "geometry": {"T": g.T, "S": g.S, "N": g.N, "M_cfg": 2 * g.N}, "depth": cfg.depth,
           "grid_mapping": f"XL block j <- qc-ref block floor(j*{src['depth']}/{cfg.depth}) of the same kind",
           "grid_source": {"file": str(args.grid), "qcref_env": src.get("env"), "policy": src.get("policy")},
           "fidelity_source": "qc-ref runs of the same configuration (bench/results/e2e_qcref.json), PSNR/SSIM vs "
                              "its FP video; random XL weights have no meaningful fidelity",
           "qcref_static_vs_dynamic": {k: fid[k] for k in ("quantized_only", "quantized_static_scales") if k in fid},
           "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    if args.profile_steps:
        try:
            doc["profile"] = profile_step(model, g, z, y, mask, y_null, plan, grid_both, args)
        except Exception as err:  # noqa: BLE001
            doc["profile_error"] = f"{type(err).__name__}: {err}"[:2000]
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    render(out / f"{stem}.json")


def grid_none(steps: int, units: list[str]) -> list[dict[str, dict]]:
    return [{u: {"action": "compute", "variant": "default"} for u in units} for _ in range(steps)]


KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("gemm (bf16 and fp8)", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
    ("qc producers", ("_producer", "_quant", "rotate")),
    ("qc cache stats", ("_cache",)),
    ("inductor fused", ("triton_",)),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other elementwise/copy"


def profile_step(model, g, z, y, mask, y_null, plan, grid_both, args) -> dict:
    """GPU time by kernel class for one 2-step sampling of BF16 eager and of ours (both), after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.runners.fast import FastRunner
    from qc_compile.runtime.step_executor import StepExecutor
    from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig

    out = {}
    s = RFlowSampler(SamplerConfig(num_steps=args.profile_steps, cfg_scale=7.0))
    for key, ex, gr in (("bf16_eager", torch_executor(model, g), None),
                        ("ours_both", StepExecutor(FastRunner(model, g, plan, compile=not args.no_compile), g), grid_both)):
        pol = ReplayPolicy(gr[: args.profile_steps]) if gr else None
        kw = dict(video_size=(XL_FRAMES, XL_HEIGHT, XL_WIDTH), progress=False)
        s.sample(ex, z, y, mask, y_null, 24, policy=pol, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            s.sample(ex, z, y, mask, y_null, 24, policy=ReplayPolicy(gr[: args.profile_steps]) if gr else None, **kw)
            torch.cuda.synchronize()
        by: dict[str, float] = {}
        top: dict[str, float] = {}
        for evt in prof.key_averages():
            t = getattr(evt, "device_time_total", None)
            if t is None:
                t = getattr(evt, "cuda_time_total", 0.0)
            if not t or evt.device_type.name != "CUDA":
                continue
            by[kernel_class(evt.key)] = by.get(kernel_class(evt.key), 0.0) + t / 1e3
            top[evt.key[:90]] = top.get(evt.key[:90], 0.0) + t / 1e3
        out[key] = {"steps": args.profile_steps, "ms_by_class": dict(sorted(by.items(), key=lambda kv: -kv[1])),
                    "top_kernels_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])}
        del ex
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ render
def render(path: Path) -> None:
    doc = json.loads(Path(path).read_text())
    rows = doc["rows"]
    env = doc["env"]
    lines = [f"# {doc['what']}", "",
             f"Device {env['device']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date'][:19]}Z. All rows measured in one process; seconds = the whole sampling loop (CUDA-"
             "synchronised wall clock, after a 2-step warm-up run per row).", "",
             "| configuration | seconds | speedup vs BF16 eager | unit evaluations computed | fidelity (qc-ref, same "
             "configuration): PSNR / SSIM vs FP |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:200]} | | | |")
            continue
        f = r.get("fidelity_qcref")
        fid = "— (reference)" if r["key"] == "bf16_eager" else (
            "same math as BF16 eager" if f is None else f"{f['psnr_db']:.2f} dB / {f['ssim']:.4f}")
        sp = r.get("speedup_vs_bf16_eager")
        lines.append(f"| {r['label']} | {r['seconds']:.2f} | {'—' if sp is None else f'{sp:.2f}x'} | "
                     f"{100 * r['compute_fraction']:.1f}% | {fid} |")
    lines += ["", f"Decision grid: {doc['grid_mapping']} (replayed from the qc-ref `quantcache` run; the `both` row "
              "replays the grid of qc-ref's quantized+cached run). Precision variants in the grid are not applied: "
              "every computed unit runs the one FP8 plan (the plan has no variants).", ""]
    sv = doc.get("qcref_static_vs_dynamic", {})
    if sv:
        lines += ["qc-ref, activation scales (W8A8 FP8, all block linears, policy none):", ""]
        for k, v in sv.items():
            lines.append(f"- {k}: PSNR {v['psnr_db']:.2f} dB, SSIM {v['ssim']:.4f} — {v['what']}")
        lines.append("")
    prof = doc.get("profile")
    if prof:
        lines += ["GPU time by kernel class (profiler, one sampling run of "
                  f"{next(iter(prof.values()))['steps']} steps):", "", "| class | " +
                  " | ".join(prof) + " |", "|---|" + "---|" * len(prof)]
        classes = sorted({c for p in prof.values() for c in p["ms_by_class"]},
                         key=lambda c: -max(p["ms_by_class"].get(c, 0.0) for p in prof.values()))
        for c in classes:
            lines.append(f"| {c} | " + " | ".join(f"{p['ms_by_class'].get(c, 0.0):.0f} ms" for p in prof.values())
                         + " |")
        lines.append("")
    for r in (r for r in rows if "error" not in r):
        lines.append(f"- {r['key']}: median step {r['step_seconds_median'] * 1e3:.0f} ms, warm-up run "
                     f"{r['warmup_seconds']:.1f} s (compile/autotune), peak memory {r['peak_mem_gib']:.1f} GiB")
    path = Path(path)
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    labels = [r["key"] for r in rows]
    secs = [r["seconds"] for r in rows]
    bars = ax.barh(labels[::-1], secs[::-1], color=["#9ecae1" if "bf16" in k else "#2b6cb0" for k in labels[::-1]])
    for b, r in zip(bars, rows[::-1]):
        sp = r.get("speedup_vs_bf16_eager")
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                f" {b.get_width():.1f} s" + ("" if sp is None else f"  {sp:.2f}x") +
                f"  ({100 * r['compute_fraction']:.0f}% computed)", va="center", fontsize=8)
    ax.set_xlabel(f"seconds for {rows[0]['steps']} steps (CFG batch 2)")
    ax.set_xlim(0, max(secs) * 1.55)
    ax.set_title(f"STDiT3-XL/2 480p 51f, {env['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)
    print(f"wrote {path.with_suffix('.md')} and .png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("qcref")
    q.add_argument("--out", default="bench/results/e2e_qcref.json")
    q.add_argument("--device", default="cpu")
    q.add_argument("--prompts", type=int, default=2)
    q.add_argument("--prompt-seed", type=int, default=7)
    q.add_argument("--calib-prompts", type=int, default=2)
    q.add_argument("--commit", default=None)
    x = sub.add_parser("xl")
    x.add_argument("--grid", default="bench/results/e2e_qcref.json")
    x.add_argument("--out", required=True)
    x.add_argument("--stem", default="e2e_h100")
    x.add_argument("--steps", type=int, default=30)
    x.add_argument("--depth", type=int, default=None, help="blocks per kind (default 28; fewer for a smoke test)")
    x.add_argument("--only", nargs="*", default=None)
    x.add_argument("--no-compile", action="store_true")
    x.add_argument("--cuda-graphs", action="store_true")
    x.add_argument("--profile-steps", type=int, default=0)
    x.add_argument("--commit", default=None)
    r = sub.add_parser("render")
    r.add_argument("json")
    args = ap.parse_args(argv)
    if args.cmd == "qcref":
        run_qcref(args)
    elif args.cmd == "xl":
        run_xl(args)
    else:
        render(Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
