"""Self-attention microbenchmark at Open-Sora 1.2 STDiT3-XL shapes: bf16 SDPA against SageAttention's 8-bit kernel.

Why: attention was 42% of a computed XL block of the FP8 fast path on an H200 (plugins/README.md 6c);
``FastRunner(attention="sage")`` (:mod:`qc_compile.runtime.attention`) is the option this measures. Shapes come from
the geometry (480p 9:16, 51 frames, CFG pair: T=15 latent frames x S=1590 tokens, 16 heads of 72):

* ``spatial``: (2*T, 16, S, 72) — one sequence per frame;
* ``temporal``: (2*S, 16, T, 72) — one sequence per spatial position (below ``SAGE_MIN_TOKENS``: the fast path keeps
  SDPA there; timed anyway to check that choice).

q, k, v are permuted views of one (B', n, 3, 16, 72) qkv tensor, as the fast blocks hand them over. Rows per shape:

* ``sdpa_bf16``: ``F.scaled_dot_product_attention`` (cuDNN / flash, the default backend);
* ``sage``: :func:`~qc_compile.runtime.attention.sage_attention` eager (key smoothing, zero-padding 72 -> 96, the
  kernels): what ``FastRunner(attention="sage")`` runs without compile;
* ``sage_compiled``: the same under ``torch.compile`` (inductor fuses smoothing and padding; ``compile=True``);
* ``sage_library_uncorrected``: ``torch.ops.qc.sage_attention`` alone on keys already smoothed and q, k, v
  zero-padded to the kernel head dim: the kernel time floor, and the error of sageattention 1.0.6 as shipped (its
  partial last key block enters the softmax; :mod:`qc_compile.runtime.attention` corrects it).

``--blocks`` adds whole computed blocks: one spatial and one temporal XL block (random weights, FP8 W8A8 plan,
compiled, in a CUDA graph, as the fast runner replays them) with ``attention="sdpa"`` and ``"sage"``: ms per block
and the relative error of the sage block's residual (output - input) against the sdpa block's.

Each row is captured in a CUDA graph (as the fast runner replays units) after warm-up and timed with CUDA events per
replay; medians (and p10/p90) in ms. Relative L2 error of each against fp32 SDPA on the same (bf16-valued) inputs
sits beside it. Inputs are fresh random with a per-channel key bias (the pattern key smoothing is for).

Usage (GPU; needs the ``sage`` extra): ``python tools/bench_attention.py [--out bench/results] [--commit SHA]
[--quick] [--blocks]``; writes ``attention_<gpu>.json`` and prints a table. ``--quick``: 3 frames, for a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lib as B  # noqa: E402

from qc_compile.artifacts import write_json_atomic  # noqa: E402
from qc_compile.errors import UserError  # noqa: E402
from qc_compile.models.config import OPENSORA_V12  # noqa: E402
from qc_compile.models.stdit3 import Geometry  # noqa: E402
from qc_compile.runtime import attention as A  # noqa: E402


def make_qkv(batch: int, n: int, heads: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (batch, heads, n, d) bf16 as permuted views of one qkv tensor (the fast blocks' layout)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(batch, n, 3, heads, d, device="cuda", generator=g)
    qkv[:, :, 1] += torch.randn(1, 1, heads, d, device="cuda", generator=g) * 3  # shared key bias
    q, k, v = qkv.bfloat16().permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def time_graph(fn: Callable[[], torch.Tensor], warmup: int = 3, replays: int = 30) -> list[float]:
    """Per-replay ms of ``fn`` captured in a CUDA graph (after ``warmup`` eager calls on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    del graph
    return times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_shape(name: str, batch: int, n: int, heads: int, d: int, replays: int) -> list[dict]:
    q, k, v = make_qkv(batch, n, heads, d, seed=n)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    p = A.padded_head_dim(d if n % A.SAGE_KV_BLOCK == 0 else d + 1)
    qp, kp, vp = (F.pad(t, (0, p - d)).contiguous() for t in (q, A.smooth_keys(k), v))
    scale = d ** -0.5
    compiled = torch.compile(A.sage_attention, fullgraph=True, dynamic=False)
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa_bf16": lambda: F.scaled_dot_product_attention(q, k, v),
        "sage": lambda: A.sage_attention(q, k, v),
        "sage_compiled": lambda: compiled(q, k, v),
        "sage_library_uncorrected": lambda: torch.ops.qc.sage_attention(qp, kp, vp, scale)[..., :d],
    }
    rows = []
    for backend, fn in fns.items():
        out = fn()
        err = rel(out, ref)
        ms = time_graph(fn, replays=replays)
        deciles = statistics.quantiles(ms, n=10)
        q10, q90 = deciles[0], deciles[-1]
        rows.append({"shape": name, "batch": batch, "tokens": n, "heads": heads, "head_dim": d,
                     "kernel_head_dim": d if backend == "sdpa_bf16" else p, "backend": backend,
                     "ms_median": statistics.median(ms), "ms_p10": q10, "ms_p90": q90, "replays": len(ms),
                     "rel_err_vs_fp32": err, "sage_in_fast_path": n >= A.SAGE_MIN_TOKENS})
        print(f"{name:9s} {backend:17s} {rows[-1]['ms_median']:8.3f} ms  rel err {err:.2e}", flush=True)
        del out
        torch.cuda.empty_cache()
    base = rows[0]["ms_median"]
    for r in rows:
        r["speedup_vs_sdpa"] = base / r["ms_median"]
    return rows


def bench_blocks(size: tuple[int, int, int], replays: int) -> list[dict]:
    """ms per computed XL block (FP8 plan, compiled, CUDA graph) with each attention backend, and the sage block's
    residual error against the sdpa block's."""
    from qc_compile.runtime.fast_blocks import build_fast_model, compiled_block_forward, fp8_block_plan

    model = B.xl_model(depth=1)
    g, z, y, mask = B.xl_inputs(model.config, size=size)
    ts, fps = torch.full((2,), 500.0, device="cuda"), torch.full((2,), 24.0, device="cuda")
    y2 = torch.cat([y, model.y_embedder.y_embedding[None, None].float().expand_as(y)])  # as tools/bench_units.py
    emb = model.run_unit("embed", {"x": torch.cat([z, z]), "timestep": ts, "y": y2, "mask": torch.cat([mask, mask]),
                                   "fps": fps}, g)
    x, t_mlp, yy, m2 = emb["x"].contiguous(), emb["t_mlp"], emb["y"], torch.cat([mask, mask])
    plan = fp8_block_plan(model)
    fms = {a: build_fast_model(model, plan, fn=compiled_block_forward(), attention=a) for a in A.BACKENDS}
    rows = []
    for unit in ("spatial_0", "temporal_0"):
        outs, ms = {}, {}
        for a, fm in fms.items():
            blk = fm.block(unit)
            fn = (lambda blk=blk: blk(x, t_mlp, yy, m2, g.T, g.S))
            outs[a] = fn().float() - x.float()
            ms[a] = time_graph(fn, replays=replays)
        for a in A.BACKENDS:
            rows.append({"unit": unit, "attention": a, "ms_median": statistics.median(ms[a]),
                         "residual_rel_err_vs_sdpa": rel(outs[a], outs["sdpa"]),
                         "speedup_vs_sdpa": statistics.median(ms["sdpa"]) / statistics.median(ms[a])})
            print(f"block {unit:10s} {a:5s} {rows[-1]['ms_median']:8.3f} ms  "
                  f"residual rel err vs sdpa {rows[-1]['residual_rel_err_vs_sdpa']:.2e}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | (B, H, N, d) | backend | median ms (p10-p90) | vs SDPA | rel err vs fp32 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | ({r['batch']}, {r['heads']}, {r['tokens']}, {r['head_dim']}) | {r['backend']} "
                     f"| {r['ms_median']:.3f} ({r['ms_p10']:.3f}-{r['ms_p90']:.3f}) | {r['speedup_vs_sdpa']:.2f}x "
                     f"| {r['rel_err_vs_fp32']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--quick", action="store_true", help="3 latent frames (smoke run)")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--blocks", action="store_true", help="also whole computed XL blocks (FP8, compiled, CUDA graph)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        A.check_attention_backend("sage", "cuda")
    except UserError as e:
        print(e, file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    cfg = OPENSORA_V12
    g = Geometry.for_model(cfg, 9 if args.quick else B.XL_FRAMES, B.XL_HEIGHT, B.XL_WIDTH)
    heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    cfg_batch = 2  # CFG pair
    rows = bench_shape("spatial", cfg_batch * g.T, g.S, heads, d, args.replays)
    rows += bench_shape("temporal", cfg_batch * g.S, g.T, heads, d, args.replays)
    size = (9 if args.quick else B.XL_FRAMES, B.XL_HEIGHT, B.XL_WIDTH)
    blocks = bench_blocks(size, args.replays) if args.blocks else []
    import importlib.metadata as md

    doc = {"what": "self-attention at STDiT3-XL shapes, bf16 SDPA vs SageAttention (INT8 QK, FP16 PV), CUDA graphs",
           "geometry": {"T": g.T, "S": g.S, "frames": g.frames, "cfg_batch": cfg_batch},
           "sage_min_tokens": A.SAGE_MIN_TOKENS, "rows": rows, "blocks": blocks,
           "env": {**B.env(args.commit), "sageattention": md.version("sageattention")}}
    name = torch.cuda.get_device_name().lower()
    gpu = next((k for k in ("h200", "h100", "a100", "l40s", "b200") if k in name),
               "".join(c if c.isalnum() else "_" for c in name)[:24])
    out = Path(args.out) / f"attention_{gpu}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, doc)
    print(table(rows))
    for b in blocks:
        print(f"| block {b['unit']} | attention={b['attention']} | {b['ms_median']:.3f} ms | {b['speedup_vs_sdpa']:.2f}x "
              f"| residual rel err vs sdpa {b['residual_rel_err_vs_sdpa']:.2e} |")
    print(f"device {doc['env']['device']}, commit {doc['env']['commit']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
