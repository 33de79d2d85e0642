"""Issue 12's must-show sweep: every row on the same held-out captions and noise seeds, one table and one Pareto plot.

Rows come from several work dirs (a plan is per work dir), so this runs :func:`qc_compile.runtime.sweep.run_sweep` once
per (work dir, policies) group and merges the rows:

    python tools/must_show_sweep.py --bf16 W_BF16 --fp8 W_FP8 --aigq W_AIGQ --device cuda --jobs 8 \
        -o bench/results/methods_qc_ref_h100

``W_BF16`` is a work dir calibrated with ``--uniform bf16`` (no quantization; its plan carries the calibrated SRAP
thresholds), ``W_FP8`` one with ``--uniform fp8``, ``W_AIGQ`` one with ``--method aigq``. Peers run on the FP model
at their published defaults. Writes sweep.json / sweep.md / pareto.png and runs/<row>/ (trace, metrics, decision map
of the first video), worst/<row>/ (trace and decision map of the row's lowest-PSNR video), and the three
lowest-PSNR videos of every row in the table's notes.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

PEERS = ("fora", "teacache", "fbcache", "dbcache", "pab", "tdc", "interval")


def groups(args) -> list[tuple[str, str | None, list[str]]]:
    """(label prefix, work dir, policies)."""
    return [
        ("", args.bf16, ["none", "hlc", "hlc+guard", "srap", "quantcache", "hlc+aigq"]),
        ("FP8 plan: ", args.fp8, ["none", "quantcache", "hlc+aigq"]),
        ("AIGQ plan: ", args.aigq, ["none", "quantcache", "hlc+aigq"]),
        ("", None, list(PEERS)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bf16", required=True)
    ap.add_argument("--fp8", required=True)
    ap.add_argument("--aigq", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--caption-seed", type=int, default=20261122)
    ap.add_argument("--seeds", default="0,1000")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--commit", default=None)
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args()

    from qc_compile.artifacts import atomic_write, write_json_atomic
    from qc_compile.data.shapes import sample_captions
    from qc_compile.runtime.pipeline import Pipeline
    from qc_compile.runtime.sweep import SweepConfig, plot_pareto, run_sweep, to_markdown
    from qc_compile.runtime.trace import plot_decisions

    prompts = [c.text() for c in sample_captions(args.prompts, seed=args.caption_seed)]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, videos, start = [], [], time.perf_counter()
    for prefix, work, policies in groups(args):
        kw = dict(work_dir=work, device=args.device) if work else dict(model="qc-ref", device=args.device)
        pipe = Pipeline(**kw)
        configs = [SweepConfig(p, p) for p in policies]
        res = run_sweep(pipe, configs, prompts, seeds, out_dir=args.output / (prefix.strip(": ").replace(" ", "_")
                                                                             or "fp"),
                        jobs=args.jobs, pipe_kwargs=kw)
        for r in res["rows"]:
            r["config"] = prefix + r["config"]
            if prefix and r["policy"] == "none":
                r["config"] = prefix + "only (no caching)"
            rows.append(r)
        for v in res["videos"]:
            v["config"] = prefix + v["config"]
            videos.append(v)
        for cfg in configs:  # the worst video of each row again, for its decision map
            if cfg.policy == "none":
                continue
            vs = [v for v in res["videos"] if v["config"] == prefix + cfg.label]
            w = min(vs, key=lambda v: v["psnr_db"])
            one = pipe([w["prompt"]], policy=cfg.policy, seeds=[w["seed"]], seed=w["seed"], reference=False)
            d = args.output / "worst" / "".join(ch if ch.isalnum() else "_" for ch in prefix + cfg.label)
            write_json_atomic(d / "trace.json", one.trace())
            plot_decisions(one.trace(), d / "decisions.png")
    worst = {}
    for r in rows:
        vs = sorted((v for v in videos if v["config"] == r["config"]), key=lambda v: v["psnr_db"])
        worst[r["config"]] = [{k: v[k] for k in ("prompt", "seed", "psnr_db")} for v in vs[:3]]
    import torch

    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    result = {"schema_version": 1, "prompts": prompts, "seeds": seeds, "batch": False, "rows": rows,
              "videos": videos, "worst": worst, "model": "qc-ref", "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU",
              "steps": 30, "caption_seed": args.caption_seed, "commit": commit, "date": time.strftime("%Y-%m-%d"),
              "seconds": round(time.perf_counter() - start, 1)}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output / "sweep.json", result)
    notes = ["Worst cases (lowest PSNR per row; decision maps of the first video under runs/):", ""]
    notes += [f"- {k}: " + "; ".join(f"{w['psnr_db']:.1f} dB seed {w['seed']} '{w['prompt']}'" for w in ws)
              for k, ws in worst.items() if ws and ws[0]["psnr_db"] < 99]
    md = to_markdown(result, title="Issue 12 must-show sweep on qc-ref", notes=notes)
    with atomic_write(args.output / "sweep.md", "w") as f:
        f.write(md)
    plot_pareto(result, args.output / "pareto.png", title="qc-ref: quality vs compute (issue 12)")
    print(md)


if __name__ == "__main__":
    main()
