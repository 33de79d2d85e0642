"""Export Open-Sora 1.2 (STDiT3-XL/2, random weights) at 240p / 51 frames on the CPU and parse every unit with
TensorRT-RTX; record time and peak memory.

    python tools/opensora_export_check.py --work /tmp/os12 [--out tools/results/opensora_export_check.json]
        [--frames 51 --height 240 --width 426] [--build-unit spatial_0]

Peak memory is the process's maximum resident set size (``getrusage``), i.e. model + one unit's export at a time.
Each unit's ONNX is verified against torch with onnxruntime by the export itself (batch 2). Parsing uses the real
TensorRT-RTX ONNX parser into a strongly typed network; ``--build-unit`` additionally builds that one unit's engine
for sm89 (FP32 graph), to show the builder accepts a full-size block.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("tools/results/opensora_export_check.json"))
    ap.add_argument("--frames", type=int, default=51)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=426)
    ap.add_argument("--build-unit", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (it holds ~4.6 GB of ONNX)")
    args = ap.parse_args()

    import torch

    from qc_compile.artifacts import write_json_atomic
    from qc_compile.export import export_model, weights_record
    from qc_compile.manifest import tool_versions
    from qc_compile.models import load_model
    from qc_compile.trt_compat import parse_target
    from qc_compile.workdir import WorkDir, read_model_info

    torch.set_num_threads(max(1, torch.get_num_threads()))
    result: dict = {"model": "opensora-v1.2", "weights": "random (seed 0)",
                    "video": [args.frames, args.height, args.width], "machine": "CPU dev machine",
                    "tool_versions": tool_versions()}
    t0 = time.perf_counter()
    loaded = load_model("opensora-v1.2", random_weights=True, dtype=torch.float32)
    result["load_seconds"] = round(time.perf_counter() - t0, 1)
    result["rss_after_load_gib"] = round(rss_gib(), 2)
    result["params"] = sum(p.numel() for p in loaded.model.parameters())
    work = WorkDir(args.work)
    if work.root.exists():
        shutil.rmtree(work.root)
    work.root.mkdir(parents=True)
    weights = weights_record(loaded, None, True, 0)
    t0 = time.perf_counter()
    res = export_model(loaded, work, frames=args.frames, height=args.height, width=args.width, weights=weights,
                       progress=True)
    result["export_seconds"] = round(time.perf_counter() - t0, 1)
    result["rss_after_export_gib"] = round(rss_gib(), 2)
    info = read_model_info(work)
    result["geometry"] = info.data["geometry"]
    result["units"] = len(res.units)
    result["onnx_bytes_total"] = sum(f["bytes"] for u in res.units for f in u["onnx"])
    result["onnx_bytes_max_unit"] = max(sum(f["bytes"] for f in u["onnx"]) for u in res.units)
    result["external_data_units"] = [u["name"] for u in res.units if len(u["onnx"]) > 1]
    result["verify_max_rel_err"] = max(u["verify_rel_err"] for u in res.units)
    result["export_seconds_per_unit"] = {u["name"]: u["seconds"] for u in res.units}
    del loaded

    import tensorrt_rtx as trt

    from qc_compile.build import build_engine, parse_onnx, profile_shapes

    parsed, t0 = {}, time.perf_counter()
    for u in info.unit_names:
        t1 = time.perf_counter()
        try:
            _, network, _, _ = parse_onnx(trt, work.fp_onnx(u))
            parsed[u] = {"ok": True, "layers": network.num_layers, "seconds": round(time.perf_counter() - t1, 2)}
        except Exception as e:  # record, keep going
            parsed[u] = {"ok": False, "error": str(e)[:500]}
        print(f"parse {u}: {parsed[u]}", flush=True)
    result["rtx_parse"] = {"tensorrt_rtx": trt.__version__, "all_ok": all(p["ok"] for p in parsed.values()),
                           "seconds": round(time.perf_counter() - t0, 1), "units": parsed}
    if args.build_unit:
        t1 = time.perf_counter()
        try:
            blob = build_engine(trt, parse_target("rtx:sm89"), work.fp_onnx(args.build_unit),
                                profile_shapes(info.unit(args.build_unit)["inputs"], 2))
            result["rtx_build"] = {"unit": args.build_unit, "target": "rtx:sm89", "ok": True, "bytes": len(blob),
                                   "seconds": round(time.perf_counter() - t1, 1)}
        except Exception as e:
            result["rtx_build"] = {"unit": args.build_unit, "ok": False, "error": str(e)[:500]}
    result["peak_rss_gib"] = round(rss_gib(), 2)
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("export_seconds_per_unit", "rtx_parse")},
                     indent=1))
    print("rtx parse all ok:", result["rtx_parse"]["all_ok"])
    if not args.keep:
        shutil.rmtree(work.root)


if __name__ == "__main__":
    sys.exit(main())
