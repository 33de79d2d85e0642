"""Linear microbenchmarks at Open-Sora 1.2 shapes (issue 6a): BF16 ``F.linear`` against our FP8 path.

Shapes: M = 2*15*1590 = 47700 tokens (480p, 51 frames, CFG pair) and M = 16384; (K, N) in (1152, 3456) qkv,
(1152, 1152) proj / cross-attn q, (1152, 4608) fc1, (4608, 1152) fc2. Per shape, all in one process:

* ``bf16_linear``: ``F.linear`` (bf16 in/out, bias); timed twice (first and last) to show the noise.
* ``fp8_gemm[...]``: the FP8 GEMM alone with each backend (``torch._scaled_mm`` row-wise, with and without fast
  accumulation; Triton TMA; Triton pointer) - the ceiling of the quantized path.
* ``quant_b{0,B}``: the stand-alone rotate+quantize pass, i.e. the overhead of an unfused FP8 linear.
* ``ours_unfused_b{0,B}``: ``rotate_quant_fp8`` + FP8 GEMM (the input arrives in bf16 from an op we do not own).
* producer fusion, where STDiT3 has a producer in front of the linear: LayerNorm + t2i-modulate before qkv/fc1,
  GELU(tanh) before fc2. BF16 baseline = the producer writing bf16 (our own fused kernel, as good as
  torch.compile's, and eager torch for reference) + ``F.linear``; ours = ``modulate_quant_fp8`` /
  ``gelu_rotate_quant_fp8`` + FP8 GEMM.
* ``w4a8_fp8``: the W4A8 Triton GEMM (INT4 weights, group 128), for study: no INT4 tensor cores on Hopper.

Timing: each variant is captured in a CUDA graph of several calls over 3 rotating input sets (larger than L2 at
M=47700), the graph is replayed and timed with CUDA events; numbers are medians per call in milliseconds. The
fidelity of every path (relative L2 error against fp32 math with the unrotated, unquantized weights, on the
first 4096 tokens) sits beside the speed. GPU speed is measured with the torch executor and our kernels.

Usage: ``python tools/bench_linear.py [--out bench/results] [--commit SHA] [--quick]``;
``--render FILE.json`` re-renders the markdown and the plot from saved results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as TF

SHAPES_KN = [(1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152)]
PRODUCER = {(1152, 3456): "ln_modulate", (1152, 4608): "ln_modulate", (4608, 1152): "gelu", (1152, 1152): None}
LAYER = {(1152, 3456): "attn.qkv", (1152, 1152): "attn.proj / cross_attn.q", (1152, 4608): "mlp.fc1",
         (4608, 1152): "mlp.fc2"}
TARGET = 1.45


def time_graph(fn: Callable[[int], object], n_sets: int = 3, calls: int = 6, replays: int = 15) -> list[float]:
    """Per-call times (ms) of ``fn(i)`` replayed from a CUDA graph of ``calls`` calls cycling over input sets."""
    for i in range(n_sets):
        fn(i)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n_sets):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % n_sets)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / calls)
    del graph
    torch.cuda.empty_cache()
    return times


def ceilings() -> dict:
    """Memory and matmul ceilings measured here (METHOD.md's two numbers): the best of a device-to-device copy and
    an elementwise op over 1 GiB buffers (bytes read + written), and an 8192^3 bf16 matmul."""
    a = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    b = torch.empty_like(a)
    t_copy = statistics.median(time_graph(lambda i: b.copy_(a), n_sets=1, calls=4, replays=10))
    t_mul = statistics.median(time_graph(lambda i: torch.mul(a, 2.0, out=b), n_sets=1, calls=4, replays=10))
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = statistics.median(time_graph(lambda i: x @ x, n_sets=1, calls=4, replays=10))
    del a, b, x
    torch.cuda.empty_cache()
    nbytes = 2 * 2**29 * 2
    return {"copy_TBps": nbytes / t_copy / 1e9, "elementwise_TBps": nbytes / t_mul / 1e9,
            "bf16_matmul_8192_TFLOPs": 2 * 8192**3 / t_mm / 1e9}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_shape(m: int, k: int, n: int, block: int, sets: int, backends: list[str]) -> dict:
    """Time every variant for one (M, K, N) and measure its fidelity."""
    from qc_compile.plugins import formats as F
    from qc_compile.plugins import reference as R
    from qc_compile.plugins.kernels import dispatch, gemm

    qc = torch.ops.qc
    dev = "cuda"
    bsz = 2
    t_tok = m // bsz
    producer = PRODUCER[(k, n)]
    w = torch.randn(n, k, device=dev) / k**0.5
    bias = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
    w16 = w.to(torch.bfloat16)
    wq = {b: F.quantize_fp8_per_channel(F.blocked_hadamard(w, b)) for b in (0, block)}
    xs = [(torch.randn(bsz, t_tok, k, device=dev) * 1.5).to(torch.bfloat16) for _ in range(sets)]
    for x in xs:
        x[..., 3] += 12.0  # one outlier channel, as in real DiT activations
    shift = [(torch.randn(bsz, 1, k, device=dev) * 0.3).to(torch.bfloat16) for _ in range(sets)]
    scale = [(torch.randn(bsz, 1, k, device=dev) * 0.3).to(torch.bfloat16) for _ in range(sets)]
    q0 = [qc.rotate_quant_fp8(x, 0) for x in xs]
    res: dict = {"M": m, "K": k, "N": n, "layer": LAYER[(k, n)], "producer": producer, "block": block,
                 "times_ms": {}, "spread_ms": {}}

    def run(name: str, fn: Callable[[int], object]) -> None:
        t = time_graph(fn, n_sets=sets)
        res["times_ms"][name] = statistics.median(t)
        res["spread_ms"][name] = [min(t), max(t)]
        print(f"  {name:34s} {res['times_ms'][name]:8.4f} ms", flush=True)

    def gemm_call(backend: str, xq, xsc, b: int):
        wqb, wsb = wq[b]
        x2, s2 = xq.view(-1, k), xsc.view(-1, 1)
        if backend == "scaled_mm_fast":
            return dispatch._scaled_mm(x2, s2, wqb, wsb, bias, torch.bfloat16, True)
        if backend == "scaled_mm":
            return dispatch._scaled_mm(x2, s2, wqb, wsb, bias, torch.bfloat16, False)
        return gemm.fp8_gemm(x2, s2.view(-1), wqb, wsb, bias, torch.bfloat16, tma=backend == "triton")

    run("bf16_linear", lambda i: TF.linear(xs[i], w16, bias))
    for be in backends:
        run(f"fp8_gemm[{be}]", lambda i, be=be: gemm_call(be, *q0[i], 0))
    best = min(backends, key=lambda be: res["times_ms"][f"fp8_gemm[{be}]"])
    res["best_backend"] = best
    for b in sorted({0, block}):
        run(f"quant_b{b}", lambda i, b=b: qc.rotate_quant_fp8(xs[i], b))
        run(f"ours_unfused_b{b}", lambda i, b=b: gemm_call(best, *qc.rotate_quant_fp8(xs[i], b), b))

    hs = None
    if producer == "ln_modulate":
        from qc_compile.plugins.kernels import producers as P

        run("bf16_producer", lambda i: P.launch(xs[i], 0, P.PROLOGUE_LN_MODULATE, P.OUT_PASSTHROUGH,
                                                shift[i], scale[i])[0])
        run("bf16_producer_eager", lambda i: TF.layer_norm(xs[i], (k,), eps=1e-6) * (1 + scale[i]) + shift[i])
        run("bf16_fused_linear", lambda i: TF.linear(P.launch(xs[i], 0, P.PROLOGUE_LN_MODULATE, P.OUT_PASSTHROUGH,
                                                              shift[i], scale[i])[0], w16, bias))
        for b in sorted({0, block}):
            run(f"producer_fp8_b{b}", lambda i, b=b: qc.modulate_quant_fp8(xs[i], shift[i], scale[i], b))
            run(f"ours_fused_b{b}", lambda i, b=b: gemm_call(best, *qc.modulate_quant_fp8(xs[i], shift[i],
                                                                                          scale[i], b), b))
    elif producer == "gelu":
        hs = xs  # fc2's input is fc1's pre-activation
        run("bf16_producer", lambda i: TF.gelu(hs[i], approximate="tanh"))
        run("bf16_fused_linear", lambda i: TF.linear(TF.gelu(hs[i], approximate="tanh"), w16, bias))
        for b in sorted({0, block}):
            run(f"producer_fp8_b{b}", lambda i, b=b: qc.gelu_rotate_quant_fp8(hs[i], b))
            run(f"ours_fused_b{b}", lambda i, b=b: gemm_call(best, *qc.gelu_rotate_quant_fp8(hs[i], b), b))
    if k % 128 == 0:
        wp, gsc = F.quantize_int4_blockwise(w, 128)
        run("w4a8_fp8", lambda i: gemm.w4a8_gemm(q0[i][0].view(-1, k), q0[i][1].view(-1), wp, gsc, bias,
                                                 torch.bfloat16))
    run("bf16_linear_again", lambda i: TF.linear(xs[i], w16, bias))

    # fidelity on the first 4096 tokens of set 0, against fp32 math with the original weights
    x0 = xs[0][:1, :4096]
    sh0, sc0 = shift[0][:1], scale[0][:1]
    if producer == "ln_modulate":
        inp32 = R.ln_modulate(x0.float(), sh0.float(), sc0.float())
        inp16 = R.ln_modulate(x0, sh0, sc0)
        fused = {b: qc.modulate_quant_fp8(x0, sh0, sc0, b) for b in sorted({0, block})}
    elif producer == "gelu":
        inp32 = TF.gelu(x0.float(), approximate="tanh")
        inp16 = TF.gelu(x0, approximate="tanh")
        fused = {b: qc.gelu_rotate_quant_fp8(x0, b) for b in sorted({0, block})}
    else:
        inp32, inp16 = x0.float(), x0
        fused = {b: qc.rotate_quant_fp8(x0, b) for b in sorted({0, block})}
    ref = TF.linear(inp32, w, bias.float())
    fid = {"bf16": _rel(TF.linear(inp16, w16, bias), ref)}
    for b, (xq, xsc) in fused.items():
        for be in backends:
            fid[f"fp8_b{b}[{be}]"] = _rel(gemm_call(be, xq, xsc, b).view_as(ref), ref)
    wp, gsc = F.quantize_int4_blockwise(w, 128)
    xq, xsc = fused[0]
    fid["w4a8_fp8_b0"] = _rel(gemm.w4a8_gemm(xq.view(-1, k), xsc.view(-1), wp, gsc, bias, torch.bfloat16).view_as(ref),
                              ref)
    res["fidelity_rel_l2"] = fid

    t = res["times_ms"]
    flop = 2.0 * m * k * n
    res["gemm_tflops"] = {name[9:-1]: flop / t[name] / 1e9 for name in t if name.startswith("fp8_gemm[")}
    res["gemm_tflops"]["bf16"] = flop / t["bf16_linear"] / 1e9
    base = statistics.median([t["bf16_linear"], t["bf16_linear_again"]])
    r = {"gemm_only": base / t[f"fp8_gemm[{best}]"]}
    for b in sorted({0, block}):
        r[f"unfused_b{b}"] = base / t[f"ours_unfused_b{b}"]
    if producer:
        for b in sorted({0, block}):
            r[f"fused_b{b}"] = t["bf16_fused_linear"] / t[f"ours_fused_b{b}"]
    res["speedup_vs_bf16"] = r
    bytes_in = m * k * 2
    for b in sorted({0, block}):
        res[f"quant_TBps_b{b}"] = (bytes_in + m * k + m * 4) / t[f"quant_b{b}"] / 1e9
    return res


def rotation_forms(block: int) -> list[dict]:
    """Time each lowering of the producer's Hadamard at M=47700 and keep the fastest for the rest of the run."""
    from qc_compile.plugins import formats as F
    from qc_compile.plugins.kernels import producers as P

    forms = [("batched+split", 1, True), ("batched", 1, False), ("transposed+split", 2, True),
             ("transposed", 2, False), ("dense", 3, True)]
    out = []
    for name, sb, split in forms:
        P.ROTATION_FORM.update(stage_b=sb, split_b=split)
        n_fb = len(P.FALLBACKS)
        rec: dict = {"name": name, "stage_b": sb, "split_b": split, "ms": {}}
        try:
            for k in (1152, 4608):
                xs = [(torch.randn(47700, k, device="cuda") * 1.5).to(torch.bfloat16) for _ in range(3)]
                rec["ms"][str(k)] = statistics.median(time_graph(lambda i: torch.ops.qc.rotate_quant_fp8(xs[i], block)))
                if k == 1152:
                    x0 = xs[0][:4096]
                    q, s = torch.ops.qc.rotate_quant_fp8(x0, block)
                    rec["err"] = _rel(q.float() * s, F.blocked_hadamard(x0.double(), block).float())
            rec["ok"] = len(P.FALLBACKS) == n_fb
        except Exception as e:  # noqa: BLE001 - a form that does not build is reported, not fatal
            rec["ok"], rec["error"] = False, str(e).splitlines()[0][:200]
        print(f"  form {name:18s} {rec}", flush=True)
        out.append(rec)
    ok = [r for r in out if r.get("ok") and len(r["ms"]) == 2]
    best = min(ok, key=lambda r: r["ms"]["1152"] + r["ms"]["4608"]) if ok else {"stage_b": 2, "split_b": True}
    P.ROTATION_FORM.update(stage_b=best["stage_b"], split_b=best["split_b"])
    P.FALLBACKS.clear()
    return out


def _slug(name: str) -> str:
    for key in ("H200", "H100", "A100", "L40", "B200"):
        if key in name:
            return key.lower()
    return "".join(ch for ch in name.lower() if ch.isalnum())[:16] or "cuda"


def render(data: dict, out_dir: Path, stem: str) -> None:
    """Write ``<stem>.md`` (tables) and ``<stem>.png`` (speedups and time breakdown) from results."""
    lines = [
        f"# Linear microbenchmarks (issue 6a) - {data['device_name']}",
        "",
        f"torch {data['torch']}, triton {data['triton']}, commit `{data['git_commit']}`, {data['date']}. "
        "Measured with the torch executor and our kernels (CUDA graphs of 6 calls over 3 rotating input sets, "
        f"CUDA events, median of 15 replays). Ceilings measured here: copy {data['ceilings']['copy_TBps']:.2f} TB/s, "
        f"elementwise {data['ceilings'].get('elementwise_TBps', 0):.2f} TB/s, "
        f"bf16 8192^3 matmul {data['ceilings']['bf16_matmul_8192_TFLOPs']:.0f} TFLOP/s. Rotation block "
        f"B={data['block']}. Target: fused FP8 linear >= {TARGET}x BF16 on the large shapes.",
        "",
        "## Speedup over BF16 (same process)",
        "",
        "| M | K | N | layer | GEMM only | quant+GEMM b0 | quant+GEMM bB | fused producer b0 | fused producer bB | "
        "best backend |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in data["shapes"]:
        r = s["speedup_vs_bf16"]
        b = s["block"]
        fused0 = f"{r['fused_b0']:.2f}x" if "fused_b0" in r else "-"
        fusedb = f"{r[f'fused_b{b}']:.2f}x" if f"fused_b{b}" in r else "-"
        lines.append(f"| {s['M']} | {s['K']} | {s['N']} | {s['layer']} | {r['gemm_only']:.2f}x | "
                     f"{r['unfused_b0']:.2f}x | {r[f'unfused_b{b}']:.2f}x | {fused0} | {fusedb} | "
                     f"{s['best_backend']} |")
    lines += ["", "## Times (ms, median) and GEMM rates", ""]
    names = sorted({n for s in data["shapes"] for n in s["times_ms"]})
    lines.append("| variant | " + " | ".join(f"{s['M']}x{s['K']}x{s['N']}" for s in data["shapes"]) + " |")
    lines.append("|---|" + "---|" * len(data["shapes"]))
    for name in names:
        cells = [f"{s['times_ms'][name]:.3f}" if name in s["times_ms"] else "" for s in data["shapes"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for be in sorted({be for s in data["shapes"] for be in s["gemm_tflops"]}):
        cells = [f"{s['gemm_tflops'][be]:.0f}" if be in s["gemm_tflops"] else "" for s in data["shapes"]]
        lines.append(f"| TFLOP/s {be} | " + " | ".join(cells) + " |")
    for b in sorted({0, data["block"]}):
        cells = [f"{s[f'quant_TBps_b{b}']:.2f}" if f"quant_TBps_b{b}" in s else "" for s in data["shapes"]]
        lines.append(f"| TB/s quant_b{b} | " + " | ".join(cells) + " |")
    lines += ["", "## Fidelity (relative L2 error vs fp32 math with the original weights, 4096 tokens)", ""]
    fnames = sorted({n for s in data["shapes"] for n in s["fidelity_rel_l2"]})
    lines.append("| path | " + " | ".join(f"{s['M']}x{s['K']}x{s['N']}" for s in data["shapes"]) + " |")
    lines.append("|---|" + "---|" * len(data["shapes"]))
    for name in fnames:
        cells = [f"{s['fidelity_rel_l2'][name]:.4f}" if name in s["fidelity_rel_l2"] else "" for s in data["shapes"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if data.get("rotation_forms"):
        lines += ["", "## Hadamard forms in the producer (rotate_quant_fp8, B=128, M=47700; fastest used above)", "",
                  "| form | K=1152 ms | K=4608 ms | rel. err. vs fp64 math (K=1152) |", "|---|---|---|---|"]
        for f in data["rotation_forms"]:
            lines.append(f"| {f['name']} | {f['ms'].get('1152', float('nan')):.4f} | "
                         f"{f['ms'].get('4608', float('nan')):.4f} | {f.get('err', float('nan')):.4f} |")
    if "producer_rotation_form" in data:
        data.setdefault("notes", []).append(
            f"producer rotation form used: {data['producer_rotation_form']} (stage_b 1 batched, 2 transposed, "
            f"3 dense); compile fallbacks: {data.get('producer_form_fallbacks')}; autotuned tiles "
            f"{sorted(set(data.get('producer_autotune', {}).values()))}")
    if data.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = data["shapes"]
    labels = [f"M={s['M']}\n{s['K']}->{s['N']}" for s in shapes]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5))
    keys = ["gemm_only", "unfused_b0", f"unfused_b{data['block']}", "fused_b0", f"fused_b{data['block']}"]
    width = 0.16
    for j, key in enumerate(keys):
        vals = [s["speedup_vs_bf16"].get(key, 0.0) for s in shapes]
        ax1.bar([i + (j - 2) * width for i in range(len(shapes))], vals, width, label=key)
    ax1.axhline(TARGET, color="k", ls="--", lw=1, label=f"target {TARGET}x")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xticks(range(len(shapes)), labels, fontsize=7)
    ax1.set_ylabel("speedup over BF16")
    ax1.set_title("FP8 linear vs BF16 F.linear")
    ax1.legend(fontsize=7)
    bf_prod, bf_gemm, our_prod, our_gemm = [], [], [], []
    for s in shapes:
        t = s["times_ms"]
        b = s["block"]
        if s["producer"]:
            bf_prod.append(t["bf16_producer"])
            our_prod.append(t[f"producer_fp8_b{b}"])
        else:
            bf_prod.append(0.0)
            our_prod.append(t[f"quant_b{b}"])
        bf_gemm.append(t["bf16_linear"])
        our_gemm.append(t[f"fp8_gemm[{s['best_backend']}]"])
    xs = range(len(shapes))
    ax2.bar([i - 0.2 for i in xs], bf_gemm, 0.38, label="bf16 GEMM", color="tab:blue")
    ax2.bar([i - 0.2 for i in xs], bf_prod, 0.38, bottom=bf_gemm, label="bf16 producer", color="lightsteelblue")
    ax2.bar([i + 0.2 for i in xs], our_gemm, 0.38, label="fp8 GEMM", color="tab:orange")
    ax2.bar([i + 0.2 for i in xs], our_prod, 0.38, bottom=our_gemm, label=f"fp8 producer/quant (B={data['block']})",
            color="navajowhite")
    ax2.set_xticks(list(xs), labels, fontsize=7)
    ax2.set_ylabel("ms (median)")
    ax2.set_title("where the time goes")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{data['device_name']} - torch {data['torch']} - commit {data['git_commit'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=110)


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--commit", default=None, help="git commit of the code (the GPU machine's copy has no .git)")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--ms", default="47700,16384")
    ap.add_argument("--quick", action="store_true", help="first (K, N) only")
    ap.add_argument("--render", default=None, help="re-render md/png from this JSON and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        render(data, Path(args.render).parent, Path(args.render).stem)
        return 0
    if not torch.cuda.is_available():
        print("bench_linear needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from qc_compile.plugins import ops  # noqa: F401
    from qc_compile.plugins.kernels import dispatch

    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    backends = ["triton", "triton_ptr"]
    notes = []
    try:  # row-wise _scaled_mm with bf16 out and bias: available on this torch/GPU?
        a = torch.randn(64, 64, device="cuda").to(torch.float8_e4m3fn)
        s = torch.ones(64, 1, device="cuda")
        dispatch._scaled_mm(a, s, a, s.view(-1), torch.zeros(64, device="cuda", dtype=torch.bfloat16),
                            torch.bfloat16, False)
        backends = ["scaled_mm", "scaled_mm_fast"] + backends
    except RuntimeError as e:
        notes.append(f"torch._scaled_mm row-wise with bf16 bias unavailable: {str(e).splitlines()[0]}")
    data = {
        "device_name": name, "capability": list(torch.cuda.get_device_capability()),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "git_commit": args.commit or _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "block": args.block, "executor": "torch + qc Triton kernels (not TensorRT)", "notes": notes,
        "ceilings": ceilings(), "shapes": [],
    }
    print(json.dumps(data["ceilings"]), flush=True)
    data["rotation_forms"] = rotation_forms(args.block)
    kns = SHAPES_KN[:1] if args.quick else SHAPES_KN
    for m in [int(v) for v in args.ms.split(",")]:
        for k, n in kns:
            print(f"M={m} K={k} N={n}", flush=True)
            data["shapes"].append(bench_shape(m, k, n, args.block, 3, backends))
            torch.cuda.empty_cache()
    from qc_compile.plugins.kernels import producers as P

    data["producer_rotation_form"] = dict(P.ROTATION_FORM)
    data["producer_form_fallbacks"] = list(P.FALLBACKS)
    data["producer_autotune"] = {str(key): str(cfg) for key, cfg in P._producer_kernel.cache.items()}
    data["fp8_fast_accum_default"] = os.environ.get("QC_FP8_FAST_ACCUM", "1") == "1"
    stem = f"linear_{_slug(name)}"
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    render(data, out, stem)
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
