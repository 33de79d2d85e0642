"""Tune step-policy thresholds on qc-ref against the FP run, on *tuning* captions (not the held-out eval set).

    python tools/tune_policies.py --n 8 --caption-seed 7 --jobs 2 --cache /tmp/fpcache \
        --config 'quantcache' --config 'quantcache hlc.delta1=0.03 hlc.tau_max=4' --json OUT.json

Each ``--config`` is a policy spec followed by ``key=value`` overrides (``--config-file``: one per line). Every
prompt k runs alone (batch 1, noise seed ``seed + k``), as a deployment would; on the CPU the FP videos are cached on
disk so several invocations share them, and the calls spread over ``--jobs`` single-threaded workers; with
``--device cuda`` everything runs in this process. Prints compute fraction, PSNR (mean/min), SSIM and checker accuracy
(with the FP accuracy) per config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # several single-threaded workers beat one two-thread process on this box


_PIPE = None


def _pipe(device: str = "cpu"):
    global _PIPE
    if _PIPE is None:
        from qc_compile.runtime import Pipeline

        _PIPE = Pipeline.from_pretrained("qc-ref", device=device)
    return _PIPE


def _fp(args) -> str:
    prompt, seed, steps, path = args
    if not Path(path).is_file():
        res = _pipe()(prompt, policy="none", seed=seed, steps=steps)
        from safetensors.torch import save_file

        tmp = path + ".tmp"
        save_file({"video": res.videos[0].contiguous()}, tmp)
        os.replace(tmp, path)
    return path


def _one(args) -> dict:
    spec, overrides, prompt, seed, steps, fp_path = args
    from safetensors.torch import load_file

    return _evaluate(_pipe(), spec, overrides, prompt, seed, steps, load_file(fp_path)["video"])


def _evaluate(pipe, spec, overrides, prompt, seed, steps, fp) -> dict:
    from qc_compile.metrics.caption_checker import check_video
    from qc_compile.metrics.fidelity import compare_videos

    start = time.perf_counter()
    res = pipe(prompt, policy=spec, overrides=overrides, seed=seed, steps=steps)
    c = compare_videos(res.videos[0], fp)
    return {"prompt": prompt, "seed": seed, "compute_fraction": res.compute_fraction,
            "flop_fraction": res.flop_fraction, "psnr_db": c["psnr_db"], "ssim": c["ssim"],
            "ok": check_video(res.videos[0], prompt).all_ok, "fp_ok": check_video(fp, prompt).all_ok,
            "seconds": time.perf_counter() - start}


def parse_config(text: str) -> tuple[str, dict]:
    parts = text.split()
    return parts[0], dict(p.split("=", 1) for p in parts[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--caption-seed", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/qc_fp_cache")
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--config-file", default=None, help="one config per line (# comments)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.caption_seed == 20261122:
        print("refusing to tune on the held-out evaluation captions (seed 20261122)", file=sys.stderr)
        return 2
    from qc_compile.data.shapes import sample_captions

    prompts = [c.text() for c in sample_captions(args.n, seed=args.caption_seed)]
    if args.config_file:
        args.config += [ln.strip() for ln in Path(args.config_file).read_text().splitlines()
                        if ln.strip() and not ln.lstrip().startswith("#")]
    if args.device != "cpu":
        pipe = _pipe(args.device)
        fps = [pipe(p, policy="none", seed=args.seed + k, steps=args.steps).videos[0] for k, p in enumerate(prompts)]

        def run_config(spec, ov):
            return [_evaluate(pipe, spec, ov, p, args.seed + k, args.steps, fps[k]) for k, p in enumerate(prompts)]

        out = []
        for text in args.config:  # written after every config: a run cut by a time limit keeps what it finished
            out.append(_summarize(text, run_config(*parse_config(text))))
            _write(args, prompts, out)
        return 0
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    fp_paths = [str(cache / f"fp_c{args.caption_seed}_k{k}_s{args.seed + k}_n{args.steps}.safetensors") for k in range(args.n)]
    out = []
    with ProcessPoolExecutor(args.jobs, initializer=_worker_init) as pool:
        list(pool.map(_fp, [(p, args.seed + k, args.steps, fp_paths[k]) for k, p in enumerate(prompts)]))
        for text in args.config:
            spec, ov = parse_config(text)
            rows = list(pool.map(_one, [(spec, ov, p, args.seed + k, args.steps, fp_paths[k])
                                        for k, p in enumerate(prompts)]))
            out.append(_summarize(text, rows))
    _write(args, prompts, out)
    return 0


def _summarize(text: str, rows: list[dict]) -> dict:
    n = len(rows)
    fp_ok = sum(r["fp_ok"] for r in rows) / n
    summ = {"config": text, "compute_fraction": sum(r["compute_fraction"] for r in rows) / n,
            "flop_fraction": sum(r["flop_fraction"] for r in rows) / n,
            "psnr_db": sum(r["psnr_db"] for r in rows) / n, "psnr_db_min": min(r["psnr_db"] for r in rows),
            "ssim": sum(r["ssim"] for r in rows) / n, "checker": sum(r["ok"] for r in rows) / n,
            "checker_fp": fp_ok, "rows": rows}
    print(f"{text:70s} compute {100 * summ['compute_fraction']:5.1f}%  PSNR {summ['psnr_db']:6.2f} "
          f"(min {summ['psnr_db_min']:5.2f})  SSIM {summ['ssim']:.4f}  checker {100 * summ['checker']:5.1f}% "
          f"(FP {100 * fp_ok:5.1f}%)", flush=True)
    return summ


def _write(args, prompts: list[str], out: list[dict]) -> None:
    if args.json:
        import torch

        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        from qc_compile.artifacts import write_json_atomic  # rewritten after every config: never half a file

        write_json_atomic(args.json, {"prompts": prompts, "caption_seed": args.caption_seed, "steps": args.steps,
                                      "device": dev, "commit": os.environ.get("QC_COMMIT"), "results": out})


if __name__ == "__main__":
    sys.exit(main())
