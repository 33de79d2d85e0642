"""Before/after of the precision-true graphs (issue 13): the dtype audit and the rtx:sm89 engine size of units built
from the float32 Q/DQ graph (what ``build`` sent to TensorRT before cast_precision; it is now the onnxruntime twin
``<unit>.ort.onnx``) and from the bf16 graph ``build`` writes now. CPU only (TensorRT-RTX builds ahead of time).

    python tools/dtype_audit_report.py WORK --target rtx:sm89 --units spatial_0 temporal_0 \
        -o bench/results/dtype_audit_qc_ref.json

WORK must have been built for the target (``qc-compile build WORK --target rtx:sm89``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import onnx


def main(argv: list[str] | None = None) -> dict:
    from qc_compile.artifacts import write_json_atomic
    from qc_compile.build import build_engine, profile_shapes
    from qc_compile.manifest import Manifest
    from qc_compile.passes.dtype_audit import audit
    from qc_compile.plan import load_plan
    from qc_compile.trt_compat import load_trt, parse_target, version
    from qc_compile.workdir import WorkDir, read_model_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--target", default="rtx:sm89")
    ap.add_argument("--units", nargs="+", default=["spatial_0", "temporal_0"])
    ap.add_argument("--max-batch", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, required=True)
    a = ap.parse_args(argv)
    work = WorkDir(a.work)
    info = read_model_info(work)
    plan = load_plan(work.plan_json, model_info=info)
    target = parse_target(a.target)
    trt = load_trt(target)
    sources = Manifest.load(work, target.name).target(target.name, "engines").sources()
    result = {"model": info.name, "geometry": info.data["geometry"]["video"], "target": target.name,
              "tool": {"name": target.backend, "version": version(trt)},
              "plan": sorted({f"W:{e.weight} A:{e.activation}" for e in plan.resolve("default").values()}),
              "how": "before = the float32 Q/DQ graph (the onnxruntime twin, what build gave TensorRT before "
                     "cast_precision); after = the bf16 graph build writes now. Engines built here on the CPU.",
              "units": {}}
    for unit in a.units:
        src = sources[unit]["default"]
        names = {li["name"] for li in info.unit(unit)["linears"]}
        entries = {n: e for n, e in plan.resolve("default").items() if n in names}
        rec = {}
        for label, path in (("before", src.ort_onnx), ("after", src.onnx)):
            res = audit(onnx.load(str(path)), half="bfloat16", linears=entries, unit=unit)
            layers: dict = {}
            blob = build_engine(trt, target, path, profile_shapes(info.unit(unit)["inputs"], a.max_batch),
                                layers=layers)
            lays = layers.get("layers", [])
            mha = [la["name"] for la in lays if "mha" in la.get("name", "").lower()]
            rec[label] = {"graph": work.rel(path), "float32_ops": res["float32_ops"],
                          "float32_outside_exceptions": res["float32_unexcepted"],
                          "float32_by_category": res["float32_by_category"], "op_counts": res["counts"],
                          "violations": len(res["violations"]), "engine_bytes": len(blob),
                          "engine_layers": len(lays),
                          "engine_layer_types": dict(Counter(la.get("type") for la in lays)),
                          "engine_output_dtypes": layers.get("output_dtypes", {}),
                          "fused_attention_layers": mha}
        rec["engine_bytes_ratio"] = round(rec["after"]["engine_bytes"] / rec["before"]["engine_bytes"], 3)
        result["units"][unit] = rec
    write_json_atomic(a.out, result)
    print(json.dumps({u: {k: (v["float32_outside_exceptions"], v["engine_bytes"]) if isinstance(v, dict) else v
                          for k, v in r.items()} for u, r in result["units"].items()}))
    return result


if __name__ == "__main__":
    main()
