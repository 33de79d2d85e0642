"""Executors agree: one plan, one policy, one seed through ``Pipeline(WORK)`` on the torch executor (the plan applied
as fake quantization) and on onnxruntime (the build's Q/DQ graphs) gives the same decisions and the same video."""

from __future__ import annotations

import torch

from compile_helpers import built, copy_of
from qc_compile.metrics.fidelity import compare_videos
from qc_compile.runtime import Pipeline

PROMPT = "a blue triangle moving left on a black background"


def test_torch_and_onnxruntime_run_the_same_plan_and_decisions() -> None:
    work = copy_of(built("fp8_e4m3", "rtx:sm89"), "agree")
    torch_pipe = Pipeline(work, executor="torch")
    ort_pipe = Pipeline(work, executor="onnxruntime")
    assert torch_pipe.quantized and ort_pipe.quantized
    runs = {}
    for name, pipe in (("torch", torch_pipe), ("ort", ort_pipe)):
        runs[name] = pipe(PROMPT, policy="interval", overrides={"interval.interval": 2}, seed=3, steps=6,
                          reference=True)
    t, o = runs["torch"], runs["ort"]
    dec = [{u: d["action"] for u, d in s["decisions"].items()} for s in t.trace()["steps"]]
    assert dec == [{u: d["action"] for u, d in s["decisions"].items()} for s in o.trace()["steps"]]
    assert 0 < t.compute_fraction < 1 and t.compute_fraction == o.compute_fraction
    # both run the plan: not the FP video, and the same video as each other
    agree = compare_videos(t.videos, o.videos)["psnr_db"]
    q_vs_fp = compare_videos(t.videos, t.fp_videos)["psnr_db"]
    assert agree > 30, agree
    assert q_vs_fp < agree  # quantization moved the video; the two implementations of it barely differ
    assert compare_videos(t.fp_videos, o.fp_videos)["psnr_db"] > 60  # the FP references agree too


def test_plan_variants_are_distinct_models_and_fp_is_the_unquantized_model() -> None:
    work = built("fp8_e4m3", "rtx:sm89")
    pipe = Pipeline(work)
    models = pipe.plan_models()
    assert set(models) >= {"default", "fp"} and models["fp"] is pipe.loaded.model
    assert models["default"] is not pipe.loaded.model
    x = torch.randn(1, 5, pipe.loaded.config.hidden_size)
    name = "spatial_blocks.0.attn.qkv"
    fp_lin = dict(models["fp"].named_modules())[name]
    q_lin = dict(models["default"].named_modules())[name]
    y_fp, y_q = fp_lin(x), q_lin(x)
    rel = ((y_q - y_fp).norm() / y_fp.norm()).item()
    assert 1e-3 < rel < 0.1, rel  # FP8 weight + activation quantization: percent-level, not zero, not broken


def test_run_refuses_a_plan_from_another_model_and_a_changed_graph(capsys) -> None:
    import json

    from qc_compile.cli import main

    def run(*args) -> int:
        try:
            main(["run", *map(str, args), "--prompt", PROMPT, "--steps", "2"])
        except SystemExit as e:
            return int(e.code)
        return 0

    work = copy_of(built("fp8_e4m3", "rtx:sm89"), "foreign-plan")
    plan = json.loads((work / "plan.json").read_text())
    plan["model"]["config_sha256"] = "0" * 64  # calibrated for another model (or another config of this one)
    (work / "plan.json").write_text(json.dumps(plan))
    assert run(work, "-o", work / "r1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "config_sha256" in err and "Traceback" not in err
    work = copy_of(built("fp8_e4m3", "rtx:sm89"), "changed-graph")
    q = work / "onnx" / "q" / "temporal_1.onnx"
    q.write_bytes(q.read_bytes()[:-10])
    assert run(work, "--executor", "onnxruntime", "-o", work / "r2") == 2
    err = capsys.readouterr().err
    assert "temporal_1.onnx" in err and "Traceback" not in err
    assert not (work / "r2").exists()  # nothing written for a refused run
