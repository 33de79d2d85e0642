"""6b: one STDiT3-XL/2 spatial and one temporal block unit at Open-Sora 1.2 480p 9:16, 51 frames, CFG batch 2.

Latent 15 x 60 x 106 -> patch 1x2x2 -> 15 x 30 x 53 = 1,590 tokens per frame; M = 2 x 15 x 1,590 = 47,700 tokens.
Random weights (Open-Sora's init, temporal output projections re-drawn), bf16; the unit inputs come from the
model's own ``embed`` unit on random latents and caption features (120 valid caption tokens of 300), so the
hidden state, t_mlp and caption have the model's scales.

Configurations: BF16 eager (``STDiT3Block``), BF16 + torch.compile (the same forward compiled), ours dense bf16
(the fast block without quantization, compiled: fusion alone), ours FP8 eager / compiled / compiled + CUDA graph
(W8A8 FP8 on all seven linears: fused modulate/GELU producers + ``fp8_linear``). Times: CUDA events per call,
warm-up, configurations interleaved round-robin, medians. Fidelity beside each time: relative L2 error of the
unit's residual (output - input) and of its output against the same block in fp32.

    python tools/bench_units.py --out OUT --commit abc1234
    python tools/bench_units.py --render bench/results/units_h100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lib import _env, kernel_class, xl_inputs, xl_model  # noqa: E402

ROLES = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1",
         "mlp.fc2")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def unit_inputs(model, g, z, y, mask):
    ts = torch.full((2,), 500.0, device="cuda")
    fps = torch.full((2,), 24.0, device="cuda")
    y2 = torch.cat([y, model.y_embedder.y_embedding[None, None].float().expand_as(y)])
    emb = model.run_unit("embed", {"x": torch.cat([z, z]), "timestep": ts, "y": y2, "mask": torch.cat([mask, mask]),
                                   "fps": fps}, g)
    return emb["x"], emb["t_mlp"], emb["y"], torch.cat([mask, mask])


def build_configs(model, unit: str, g, x, t_mlp, y, mask, rotation: int | None) -> dict:
    from qc_compile.models.stdit3 import STDiT3Block
    from qc_compile.plan import LinearPlan
    from qc_compile.runtime.fast_blocks import FastBlock, block_forward, compiled_block_forward

    blk = model.block(unit)
    e = LinearPlan(unit=unit, weight="fp8_e4m3", activation="fp8_e4m3", rotation=rotation)
    entries = {r: (e, e, None) for r in ROLES}
    cfn = compiled_block_forward()
    comp = torch.compile(STDiT3Block.forward, dynamic=False)
    cblk = types.MethodType(comp, blk)
    fast_q = FastBlock(blk, model.rope.freqs, entries, fn=block_forward)
    fast_qc = FastBlock(blk, model.rope.freqs, entries, fn=cfn)
    fast_dc = FastBlock(blk, model.rope.freqs, None, fn=cfn)
    T, S = g.T, g.S
    cfgs = {
        "bf16_eager": lambda: blk(x, y, t_mlp, T, S, mask=mask),
        "bf16_compile": lambda: cblk(x, y, t_mlp, T, S, mask=mask),
        "ours_bf16_compile": lambda: fast_dc(x, t_mlp, y, mask, T, S),
        "ours_fp8_eager": lambda: fast_q(x, t_mlp, y, mask, T, S),
        "ours_fp8_compile": lambda: fast_qc(x, t_mlp, y, mask, T, S),
    }
    # CUDA graph of the compiled FP8 unit (static inputs are the tensors above)
    try:
        for _ in range(3):
            cfgs["ours_fp8_compile"]()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            cfgs["ours_fp8_compile"]()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gout = cfgs["ours_fp8_compile"]()
    except Exception:  # noqa: BLE001  (reported by the caller when the compiled config itself fails)
        import traceback

        traceback.print_exc()
        return cfgs

    def replay():
        graph.replay()
        return gout

    cfgs["ours_fp8_compile_graph"] = replay
    return cfgs


def time_round_robin(cfgs: dict, warmup: int, reps: int) -> dict[str, list[float]]:
    for fn in cfgs.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in cfgs}
    for _ in range(reps):
        for k, fn in cfgs.items():
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times[k].append(e0.elapsed_time(e1))
    return times


def profile_one(fn) -> tuple[dict[str, float], dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by: dict[str, float] = {}
    top: dict[str, float] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if t and evt.device_type.name == "CUDA":
            by[kernel_class(evt.key)] = by.get(kernel_class(evt.key), 0.0) + t / 1e3
            top[evt.key[:120]] = top.get(evt.key[:120], 0.0) + t / 1e3
    return (dict(sorted(by.items(), key=lambda kv: -kv[1])),
            dict(sorted(top.items(), key=lambda kv: -kv[1])[:15]))


def run(args) -> None:
    from qc_compile.runtime.trace import unit_flops

    torch.set_grad_enabled(False)
    model = xl_model(depth=1)
    g, z, y, mask = xl_inputs(model.config)
    x, t_mlp, yy, mm = unit_inputs(model, g, z, y, mask)
    flops = unit_flops(model.config, g)
    out = {"what": "6b one STDiT3-XL/2 block unit, 480p 9:16 51 frames, CFG batch 2 (M = 47,700 tokens), bf16",
           "env": _env(args.commit), "geometry": {"T": g.T, "S": g.S, "N": g.N, "M": 2 * g.N},
           "rotation": args.rotation, "units": {}}
    for unit in ("spatial_0", "temporal_0"):
        blk = model.block(unit)
        ref_blk = copy.deepcopy(blk).float()
        ref = ref_blk(x.float(), yy.float(), t_mlp.float(), g.T, g.S, mask=mm)
        res_ref = ref - x.float()
        del ref_blk
        cfgs = build_configs(model, unit, g, x, t_mlp, yy, mm, args.rotation)
        for k in list(cfgs):  # a configuration that fails (e.g. a compile error) is recorded, not fatal
            try:
                cfgs[k]()
            except Exception as err:  # noqa: BLE001
                import traceback

                traceback.print_exc()
                out.setdefault("errors", {})[f"{unit}/{k}"] = f"{type(err).__name__}: {err}"[:2000]
                del cfgs[k]
        times = time_round_robin(cfgs, args.warmup, args.reps)
        rows = {}
        base = statistics.median(times["bf16_eager"])
        gflop = 2 * sum(flops[unit].values()) / 1e9  # CFG batch of 2
        for k, fn in cfgs.items():
            o = fn().float()
            med = statistics.median(times[k])
            rows[k] = {"ms_median": med, "ms_min": min(times[k]), "ms_max": max(times[k]),
                       "speedup_vs_bf16_eager": base / med, "tflops": gflop / med,
                       "rel_err_residual": _rel(o - x.float(), res_ref), "rel_err_output": _rel(o, ref)}
            print(unit, k, json.dumps(rows[k]), flush=True)
        prof, tops = {}, {}
        for k in ("bf16_eager", "bf16_compile", "ours_bf16_compile", "ours_fp8_compile"):
            try:
                prof[k], tops[k] = profile_one(cfgs[k])
            except Exception as err:  # noqa: BLE001
                out.setdefault("errors", {})[f"{unit}/profile/{k}"] = f"{type(err).__name__}: {err}"[:500]
        out["units"][unit] = {"gflop": gflop, "configs": rows, "ms_by_kernel_class": prof, "top_kernels_ms": tops}
        del cfgs
        torch.cuda.empty_cache()
    path = Path(args.out) / f"{args.stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    render(path)


LABELS = {
    "bf16_eager": "BF16 eager (STDiT3Block)",
    "bf16_compile": "BF16 + torch.compile",
    "ours_bf16_compile": "ours, bf16 (fast block, compiled; no quantization)",
    "ours_fp8_eager": "ours, FP8 W8A8 (eager glue)",
    "ours_fp8_compile": "ours, FP8 W8A8 (compiled glue)",
    "ours_fp8_compile_graph": "ours, FP8 W8A8 (compiled + CUDA graph)",
}


def render(path: Path) -> None:
    doc = json.loads(Path(path).read_text())
    env = doc["env"]
    lines = [f"# {doc['what']}", "",
             f"Device {env['device']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date'][:19]}Z. CUDA events per call, configurations interleaved round-robin, medians. "
             f"Rotation block: {doc['rotation'] or 'none'}. Fidelity: relative L2 error against the same block in "
             "fp32 (residual = output - input; output includes the skip connection).", ""]
    for unit, u in doc["units"].items():
        lines += [f"## {unit} ({u['gflop']:.0f} GFLOP per call)", "",
                  "| configuration | ms (median) | speedup vs BF16 eager | TFLOP/s | rel. error residual | "
                  "rel. error output |", "|---|---|---|---|---|---|"]
        for k, r in u["configs"].items():
            lines.append(f"| {LABELS.get(k, k)} | {r['ms_median']:.2f} | {r['speedup_vs_bf16_eager']:.2f}x | "
                         f"{r['tflops']:.0f} | {100 * r['rel_err_residual']:.2f}% | {100 * r['rel_err_output']:.3f}% |")
        prof = u["ms_by_kernel_class"]
        lines += ["", "GPU time by kernel class (one call, profiler):", "",
                  "| class | " + " | ".join(prof) + " |", "|---|" + "---|" * len(prof)]
        classes = sorted({c for p in prof.values() for c in p}, key=lambda c: -max(p.get(c, 0) for p in prof.values()))
        for c in classes:
            lines.append(f"| {c} | " + " | ".join(f"{p.get(c, 0.0):.2f} ms" for p in prof.values()) + " |")
        lines.append("")
    path = Path(path)
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = list(doc["units"])
    fig, axes = plt.subplots(1, len(units), figsize=(11, 3.2), sharey=True)
    for ax, unit in zip(axes, units):
        rows = doc["units"][unit]["configs"]
        keys = list(rows)[::-1]
        ms = [rows[k]["ms_median"] for k in keys]
        bars = ax.barh([LABELS.get(k, k) for k in keys], ms,
                       color=["#9ecae1" if k.startswith("bf16") else "#2b6cb0" for k in keys])
        for b, k in zip(bars, keys):
            r = rows[k]
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                    f" {r['ms_median']:.2f} ms {r['speedup_vs_bf16_eager']:.2f}x, err {100 * r['rel_err_residual']:.1f}%",
                    va="center", fontsize=7)
        ax.set_xlim(0, max(ms) * 1.7)
        ax.set_title(unit, fontsize=9)
        ax.set_xlabel("ms per call (M = 47,700)")
        ax.tick_params(labelsize=7)
    fig.suptitle(f"STDiT3-XL/2 block units, {env['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)
    print(f"wrote {path.with_suffix('.md')} and .png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--stem", default="units_h100")
    ap.add_argument("--rotation", type=int, default=None, help="Hadamard block of every linear (default none)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--render", default=None, help="re-render a results JSON")
    args = ap.parse_args(argv)
    if args.render:
        render(Path(args.render))
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
