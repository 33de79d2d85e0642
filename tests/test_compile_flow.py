"""The compile path end to end on qc-ref (CPU, CI): export -> calibrate -> build (TensorRT-RTX on the CPU) ->
compare, the torch package, and every bad input the issue lists (each a clear error, non-zero exit, consistent work
dir)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compile_helpers import GEOMETRY, built, calibrated, copy_of, exported, run_cli

from qc_compile.errors import ArtifactError, UserError
from qc_compile.workdir import WorkDir, read_model_info


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".") and p.is_file()
            and p.name != ".build-in-progress.json"]


# ------------------------------------------------------------------------------------------------ export
def test_export_writes_model_json_and_checked_graphs():
    work = WorkDir(exported())
    info = read_model_info(work)
    d = info.data
    assert d["schema_version"] == 1 and d["model"]["name"] == "qc-ref" and d["weights"]["source"] == "random"
    assert info.unit_names == ["embed"] + [f"{k}_{i}" for i in range(4) for k in ("spatial", "temporal")] + ["final"]
    assert d["geometry"]["video"] == {"frames": 4, "height": 16, "width": 16} and d["geometry"]["tokens"] == 256
    assert d["tool_versions"]["onnx"] and d["tool_versions"]["torch"]
    from qc_compile.artifacts import sha256_file

    for u in info.units:
        assert u["verify_rel_err"] < 1e-4
        rec = u["onnx"][0]
        assert sha256_file(work.root / rec["path"]) == rec["sha256"]
        proto = onnx.load(work.root / rec["path"])
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["qc.unit"] == u["name"] and meta["qc.stage"] == "fp" and meta["qc.model"] == "qc-ref"
        assert all(isinstance(io["shape"][0], str) for io in u["inputs"] + u["outputs"])  # dynamic batch
    embed = info.unit("embed")
    assert [i["name"] for i in embed["inputs"]] == ["x", "timestep", "y", "fps"]  # the unused mask is dropped
    assert [o["onnx_name"] for o in embed["outputs"]] == ["x_out", "t_out", "t_mlp_out", "y_out"]
    assert len(info.linears()) == 7 + 8 * 7 + 1


def test_export_refuses_a_work_dir_of_another_model(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"schema_version": 1, "model": {"name": "opensora-v1.2"}}))
    code, out = run_cli("export", "qc-ref", "-o", tmp_path, "--random-weights", *GEOMETRY)
    assert code == 2 and "already holds an export of 'opensora-v1.2'" in out
    code, out = run_cli("export", "qc-ref", "-o", tmp_path, "--opset", "12", "--random-weights", "--force",
                        *GEOMETRY)
    assert code == 2 and "--opset" in out
    code, out = run_cli("export", "no-such-model", "-o", tmp_path / "x")
    assert code == 2 and "unknown model" in out


def test_ort_executor_fp_matches_torch_executor():
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.protocols import Conditioning
    from qc_compile.runtime.runners.onnxruntime import OrtRunner
    from qc_compile.runtime.step_executor import StepExecutor
    from qc_compile.workdir import load_model_for

    work = WorkDir(exported())
    info = read_model_info(work)
    loaded = load_model_for(info)
    g = info.geometry()
    y, mask = loaded.encode_prompts(["a red circle moving up on a black background"] * 2)
    cond = Conditioning(y=y, mask=mask, fps=torch.full((2,), 8.0))
    z = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 700.0)
    v0, s0 = torch_executor(loaded.model, g).step(z, t, cond, {})
    ex = StepExecutor(OrtRunner.from_workdir(work, "fp"), g)
    v1, s1 = ex.step(z, t, cond, {})
    assert ex.unit_names == torch_executor(loaded.model, g).unit_names
    torch.testing.assert_close(v1, v0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1[:, :2], s0[:, :2], rtol=1e-4, atol=1e-3, equal_nan=True)


# ------------------------------------------------------------------------------------------------ calibrate
def test_calibrate_writes_a_valid_plan_and_ranges():
    from qc_compile.plan import load_plan

    work = WorkDir(calibrated("fp8_e4m3"))
    info = read_model_info(work)
    plan = load_plan(work.plan_json, model_info=info)
    from qc_compile.models.units import is_block

    blocks = {n: e for n, e in plan.linears.items() if is_block(e.unit)}
    others = {n: e for n, e in plan.linears.items() if not is_block(e.unit)}
    assert blocks and others  # default: the block linears quantized, embed and final kept bf16
    assert {(e.weight, e.activation) for e in blocks.values()} == {("fp8_e4m3", "fp8_e4m3")}
    assert {(e.weight, e.activation) for e in others.values()} == {("bf16", "bf16")}
    assert all(e.act_scale > 0 for e in blocks.values())
    assert plan.provenance["calibration"]["quantize_embed_final"] is False
    assert plan.provenance["calibration"]["steps"] == 3 and len(plan.provenance["calibration"]["prompts"]) == 4
    ranges = json.loads((work.calib_dir / "ranges.json").read_text())["ranges"]
    assert all(r["calls"] == 3 for r in ranges.values())  # one call per step (the CFG batch is one call)
    assert (work.report_dir / "calibration.md").is_file()
    assert (work.report_dir / "calibration_ranges.png").read_bytes()[:4] == b"\x89PNG"
    # percentile <= max, same prompts and seed
    w2 = copy_of(exported(), "pct")
    code, out = run_cli("calibrate", w2, "--uniform", "int8", "--steps", "3", "--percentile", "99", "--quiet",
                        "--quantize-embed-final")
    assert code == 0, out
    p2 = load_plan(WorkDir(w2).plan_json)
    assert {e.weight for e in p2.linears.values()} == {"int8"}  # --quantize-embed-final: every linear
    assert all(p2.linears[n].act_amax <= e.act_amax + 1e-6 for n, e in plan.linears.items())
    assert any(p2.linears[n].act_amax < e.act_amax for n, e in plan.linears.items())


def test_calibrate_bad_input(tmp_path):
    work = exported()
    for content, msg in (("", "no prompts"), ("a purple dragon flying\n", "purple")):
        f = tmp_path / "p.txt"
        f.write_text(content)
        code, out = run_cli("calibrate", work, "--uniform", "fp8", "--prompts", f)
        assert code == 2 and msg in out, out
    code, out = run_cli("calibrate", work, "--uniform", "fp8", "--prompts", tmp_path / "missing.txt")
    assert code == 2 and "not found" in out
    code, out = run_cli("calibrate", work, "--uniform", "fp7")
    assert code == 2 and "unknown format" in out
    code, out = run_cli("calibrate", tmp_path / "nowhere", "--uniform", "fp8")
    assert code == 2 and "qc-compile export" in out
    assert not (Path(work) / "plan.json").exists()


# ------------------------------------------------------------------------------------------------ build
def test_fp8_plan_builds_an_engine_per_unit_for_rtx_sm89():
    from qc_compile.manifest import Manifest

    work = WorkDir(built("fp8_e4m3", "rtx:sm89"))
    info = read_model_info(work)
    from qc_compile.plan import load_plan

    t = Manifest.load(work, "rtx:sm89").target("rtx:sm89").data
    plan = load_plan(work.plan_json, model_info=info)
    assert t["backend"] == "tensorrt_rtx" and t["tool"]["version"].startswith("1.7")
    assert set(t["units"]) == set(info.unit_names)
    n_dq = 0
    for unit in info.unit_names:
        v = t["units"][unit]["variants"]["default"]
        engine = work.root / v["engine"]["path"]
        assert engine.is_file() and engine.stat().st_size > 100_000
        assert engine == work.engine("rtx-sm89", unit)
        q = onnx.load(work.root / v["onnx"][0]["path"])
        ops = [n.op_type for n in q.graph.node]
        quantized = [li for li in info.unit(unit)["linears"] if plan.linears[li["name"]].weight != "bf16"]
        assert ops.count("DequantizeLinear") == 2 * len(quantized)  # embed / final linears stay bf16 by default
        assert {p.key: p.value for p in q.metadata_props}["qc.stage"] == "q"
        n_dq += len(quantized)
    assert n_dq > 0
    assert not work.build_marker.exists() and not _tmp_files(work.root)


def test_qdq_graphs_run_in_onnxruntime_end_to_end():
    """FP8 Q/DQ graphs in the sampler (onnxruntime runner) against the torch FP video, and the torch package."""
    from qc_compile.metrics.fidelity import compare_videos
    from qc_compile.runtime.runners.onnxruntime import OrtRunner
    from qc_compile.runtime.step_executor import StepExecutor
    from qc_compile.runtime.generation import GenerationSettings, generate
    from qc_compile.torch_package import load_package
    from qc_compile.workdir import load_model_for

    work = WorkDir(copy_of(built("fp8_e4m3", "rtx:sm89"), "torchpkg"))
    code, out = run_cli("build", work.root, "--target", "torch", "--quiet")
    assert code == 0, out
    info = read_model_info(work)
    fp = load_model_for(info)
    s = GenerationSettings.defaults(fp, steps=4, frames=4, height=16, width=16)
    prompts = ["a blue triangle moving left on a black background"]
    v_fp, _ = generate(fp, prompts, s, progress=False)
    v_q, _ = generate(fp, prompts, s, executor=StepExecutor(OrtRunner.from_workdir(work, "q", "rtx:sm89"), info.geometry()),
                      progress=False)
    v_t, _ = generate(load_package(work), prompts, s, progress=False)
    p_q, p_t = compare_videos(v_q, v_fp)["psnr_db"], compare_videos(v_t, v_fp)["psnr_db"]
    assert 20 < p_q < 100 and 20 < p_t < 100
    assert compare_videos(v_q, v_t)["psnr_db"] > 30  # the two implementations of the same plan agree


def test_nvfp4_plan_builds_for_sm120_and_is_refused_for_sm89():
    work = copy_of(calibrated("nvfp4", "--quantize-embed-final"), "nvfp4")  # the final unit's twin is checked
    code, out = run_cli("build", work, "--target", "rtx:sm89", "--quiet")
    assert code == 2
    assert "cannot be built for --target rtx:sm89" in out and "nvfp4" in out and "sm120" in out
    assert not (work / "manifest.json").exists() and not (work / ".build-in-progress.json").exists()
    assert not (work / "engines").exists() and not (work / "onnx" / "q").exists()
    code, out = run_cli("build", work, "--target", "rtx:sm120", "--quiet")
    assert code == 0, out
    from qc_compile.manifest import Manifest

    t = Manifest.load(WorkDir(work), "rtx:sm120").target("rtx:sm120").data
    q = onnx.load(work / t["units"]["spatial_0"]["variants"]["default"]["onnx"][0]["path"])
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("TRT_FP4DynamicQuantize") == 7 and {o.domain for o in q.opset_import} >= {"", "trt"}
    engines = [p.name for p in (work / "engines" / "rtx-sm120").glob("*.engine")]
    assert len([n for n in engines if n.count(".") == 1]) == 10  # one default engine per unit (+ its `high` variant)
    _check_ort_twins(WorkDir(work), "rtx:sm120")


def _check_ort_twins(work: WorkDir, target: str) -> None:
    """Every NVFP4 graph has a twin file that onnxruntime opens (no graph tooling at run time), standard ops only,
    computing what the twin pass computes on the graph itself, on fresh random inputs."""
    import onnx_graphsurgeon as gs

    from qc_compile.export import example_inputs
    from qc_compile.manifest import Manifest, ort_session_for
    from qc_compile.models.stdit3 import UNIT_INPUTS, unit_kind
    from qc_compile.onnx_utils import ort_session
    from qc_compile.build import unit_graph
    from qc_compile.passes.ort_twin import pass_ort_twin
    from qc_compile.plan import load_plan

    info = read_model_info(work)
    sources = Manifest.load(work, target).target(target, "graphs").sources()
    for unit in ("spatial_0", "final"):
        src = sources[unit]["default"]
        assert src.twin and src.ort_onnx.name == f"{unit}.ort.onnx" and src.ort_onnx.is_file()
        twin = onnx.load(src.ort_onnx)
        assert {n.domain for n in twin.graph.node} <= {"", "ai.onnx"}
        trt_graph = onnx.load(src.onnx)  # what TensorRT builds: bf16 around the NVFP4 Q/DQ, no onnxruntime form
        assert any(n.op_type == "TRT_FP4DynamicQuantize" for n in trt_graph.graph.node)
        assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in trt_graph.graph.initializer)
        # the twin is the float32 Q/DQ graph of the same plan after the twin pass
        fp32 = unit_graph(work, info, load_plan(work.plan_json, model_info=info), unit, "default")
        ref = ort_session(gs.export_onnx(pass_ort_twin(gs.import_onnx(fp32))))
        sess = ort_session_for(src)
        names = {i.name for i in sess.get_inputs()}
        ins = example_inputs(info.config(), info.geometry(), unit_kind(unit), seed=7)
        feed = {n: t.numpy() for n, t in zip(UNIT_INPUTS[unit_kind(unit)], ins) if n in names}
        got, want = sess.run(None, feed), ref.run(None, feed)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
        assert np.abs(got[0]).max() > 0


def test_build_refusals():
    work = calibrated("fp8_e4m3")
    code, out = run_cli("build", work, "--target", "rtx:sm86")
    assert code == 2 and "fp8_e4m3" in out and "sm_89" in out
    code, out = run_cli("build", work, "--target", "rtx:sm75")
    assert code == 2 and "rtx:sm86" in out
    code, out = run_cli("build", work, "--target", "gpu")
    assert code == 2 and "expected one of" in out
    code, out = run_cli("build", work, "--target", "rtx:sm89", "--plugins")
    assert code == 2 and "TensorRT-RTX" in out and "plugins" in out
    code, out = run_cli("build", work, "--target", "trt")
    assert code == 2 and "full TensorRT" in out and "--onnx-only" in out
    assert not (Path(work) / "manifest.json").exists()


def test_onnx_only_build_for_full_tensorrt_with_plugins():
    work = copy_of(calibrated("fp8_e4m3"), "trt-onnx")
    code, out = run_cli("build", work, "--target", "trt", "--onnx-only", "--plugins", "--quiet")
    assert code == 0, out
    m = json.loads((work / "manifest.json").read_text())["targets"]["trt"]
    assert m["engines"] is False and m["plugins"] is True
    q = onnx.load(work / m["units"]["spatial_0"]["variants"]["default"]["onnx"][0]["path"])
    ops = [n.op_type for n in q.graph.node if n.domain == "qc"]
    assert ops.count("FP8Linear") == 7 and ops.count("CacheStatsApply") == 1
    assert [i.name for i in q.graph.input][-1] == "cached_residual"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("damage,msg", [
    ("truncate", "cannot read"),
    ("foreign", "not written by qc-compile"),
    ("other_unit", "unit='spatial_0'"),
])
def test_bad_fp_graphs_are_refused_before_anything_is_written(damage, msg):
    work = copy_of(calibrated("fp8_e4m3"), f"bad-{damage}")
    target = work / "onnx" / "fp" / "temporal_0.onnx"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "foreign":
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        m = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                          [onnx.helper.make_tensor_value_info("y", 1, [1])]))
        onnx.save(m, target)
    else:
        shutil.copy(work / "onnx" / "fp" / "spatial_0.onnx", target)
    code, out = run_cli("build", work, "--target", "rtx:sm89", "--quiet")
    assert code == 2 and msg in out and "temporal_0" in out, out
    assert not (work / ".build-in-progress.json").exists() and not (work / "manifest.json").exists()


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["linears"]["spatial_blocks.1.mlp.fc1"].update(weight="fp6"),
     "linears/spatial_blocks.1.mlp.fc1/weight"),
    (lambda d: d["linears"].pop("temporal_blocks.3.attn.proj"), "missing 1 linear"),
    (lambda d: d["model"].update(name="opensora-v1.2"), "another work dir"),
])
def test_bad_plans_are_refused(edit, msg):
    work = copy_of(calibrated("fp8_e4m3"), "badplan")
    d = json.loads((work / "plan.json").read_text())
    edit(d)
    (work / "plan.json").write_text(json.dumps(d))
    code, out = run_cli("build", work, "--target", "rtx:sm89", "--quiet")
    assert code == 2 and msg in out, out


def test_manifest_sha_mismatch_and_other_model_are_refused():
    work = copy_of(built("fp8_e4m3", "rtx:sm89"), "badsha")
    engine = work / "engines" / "rtx-sm89" / "spatial_2.engine"
    engine.write_bytes(engine.read_bytes() + b"\0")
    code, out = run_cli("compare", work, "--steps", "1", "--no-e2e")
    assert code == 2 and "spatial_2.engine" in out and "sha256" in out
    work = copy_of(built("fp8_e4m3", "rtx:sm89"), "othermodel")
    m = json.loads((work / "manifest.json").read_text())
    m["model"]["name"] = "opensora-v1.2"
    (work / "manifest.json").write_text(json.dumps(m))
    code, out = run_cli("compare", work, "--steps", "1", "--no-e2e")
    assert code == 2 and "opensora-v1.2" in out


def test_interrupted_build_restores_the_previous_build_and_a_killed_one_is_refused(monkeypatch):
    from qc_compile.build import build_engine, build_workdir
    from qc_compile.manifest import Manifest

    work = WorkDir(copy_of(built("fp8_e4m3", "rtx:sm89"), "interrupt"))
    before = json.loads(work.manifest_json.read_text())
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated Ctrl-C in the middle of the build")
        return build_engine(*a, **k)

    with pytest.raises(KeyboardInterrupt):
        build_workdir(work, "rtx:sm89", progress=False, engine_builder=flaky)
    assert calls["n"] == 4
    assert not work.build_marker.exists() and not _tmp_files(work.root)
    assert not (work.root / ".build-backup").exists()
    assert json.loads(work.manifest_json.read_text()) == before  # the manifest is written last: untouched
    Manifest.load(work, "rtx:sm89")  # the previous build's engines and graphs were put back
    # a build killed outright (no chance to restore) leaves its marker: refused until the next build
    work.build_marker.write_text(json.dumps({"target": "rtx:sm89", "pid": 1, "started": "earlier"}))
    with pytest.raises(ArtifactError, match="did not finish"):
        Manifest.load(work)
    code, out = run_cli("compare", work.root, "--steps", "1", "--no-e2e")
    assert code == 2 and "did not finish" in out and "qc-compile build" in out
    build_workdir(work, "rtx:sm89", progress=False)  # re-running the build repairs it
    assert not work.build_marker.exists()
    Manifest.load(work, "rtx:sm89")


# ------------------------------------------------------------------------------------------------ compare
def test_compare_reports_and_fails_past_tolerance():
    work = built("fp8_e4m3", "rtx:sm89")
    out_json = Path(work).parent / "cmp.json"
    code, out = run_cli("compare", work, "--steps", "3", "--min-psnr", "200", "--json", out_json,
                        "-p", "a red square moving right on a black background")
    assert code == 1, out  # 200 dB is past any quantized video
    assert "end to end onnx_q" in out and "trt: not run: no CUDA GPU visible" in out
    r = json.loads(out_json.read_text())
    assert r["passed"] is False and r["e2e"]["onnx_q"]["passed"] is False
    assert r["e2e"]["onnx_fp"]["psnr_db"] > 60 and 15 < r["e2e"]["onnx_q"]["psnr_db"] < 100
    assert set(r["units"]) == set(read_model_info(WorkDir(work)).unit_names)
    for u in r["units"].values():
        assert u["fp_torch_vs_onnx"]["passed"] and u["fp_torch_vs_onnx"]["max_rel_err"] < 1e-4
        assert u["fp_vs_q"]["snr_db"] > 10 and u["trt"] == {"not_run": "no CUDA GPU visible"}
    code, out = run_cli("compare", work, "--steps", "2", "--no-e2e", "--unit", "final", "--min-unit-snr", "5")
    assert code == 0, out


def test_cli_lists_the_compile_commands():
    code, out = run_cli("--help")
    assert code == 0
    for c in ("export", "calibrate", "build", "compare"):
        assert c in out


def test_precision_variants_get_their_own_engines():
    """A schedule that uses a second variant builds one more engine per unit that the variant changes."""
    from qc_compile.manifest import Manifest
    from qc_compile.plan import load_plan, save_plan
    from qc_compile.runtime.policy import UnitDecision
    from qc_compile.runtime.protocols import Conditioning
    from qc_compile.runtime.runners.onnxruntime import OrtRunner
    from qc_compile.runtime.step_executor import StepExecutor

    work = WorkDir(copy_of(calibrated("fp8_e4m3"), "variants"))
    info = read_model_info(work)
    plan = load_plan(work.plan_json, model_info=info)
    plan.variants["w8a16"] = {"spatial_blocks.*": {"activation": "bf16"}}
    plan.schedule = ["w8a16"] + ["default"] * 2
    save_plan(plan, work.plan_json)
    code, out = run_cli("build", work.root, "--target", "rtx:sm89", "--quiet")
    assert code == 0, out
    t = Manifest.load(work, "rtx:sm89").target("rtx:sm89").data
    assert t["variants"] == ["default", "w8a16"] and t["schedule"] == plan.schedule
    for u in info.unit_names:
        v = t["units"][u]["variants"]["w8a16"]
        if u.startswith("spatial_"):
            assert v["engine"]["path"] == f"engines/rtx-sm89/{u}.w8a16.engine"
            assert (work.root / v["engine"]["path"]).is_file()
        else:
            assert v["same_as"] == "default"
    ex = StepExecutor(OrtRunner.from_workdir(work, "q", "rtx:sm89"), info.geometry())
    loaded_y = torch.randn(2, 1, 12, 64)
    cond = Conditioning(y=loaded_y, mask=torch.ones(2, 12, dtype=torch.bool), fps=torch.full((2,), 8.0))
    z, ts = torch.randn(2, 3, 4, 16, 16), torch.full((2,), 500.0)
    v_default, _ = ex.step(z, ts, cond, {})
    ex.reset()
    v_a16, _ = ex.step(z, ts, cond, {u: UnitDecision(variant="w8a16") for u in ex.block_units})
    assert not torch.equal(v_default, v_a16)


def test_opensora_sized_units_export_and_parse_under_tensorrt_rtx(tmp_path):
    """Open-Sora 1.2's block shapes (C=1152, 16 heads of 72, captions 4096-d), one block pair, small geometry: exported,
    checked against torch, and parsed + built by TensorRT-RTX. (The full 28-layer model at 240p/51 frames is
    tools/opensora_export_check.py, recorded in tools/results/.)"""
    import dataclasses

    trt = pytest.importorskip("tensorrt_rtx")
    from qc_compile.build import build_engine, parse_onnx, profile_shapes
    from qc_compile.export import export_model
    from qc_compile.models import LoadedModel, STDiT3, get_config
    from qc_compile.trt_compat import parse_target

    cfg = dataclasses.replace(get_config("opensora-v1.2"), depth=1, model_max_length=16)
    torch.manual_seed(0)
    loaded = LoadedModel(cfg, STDiT3(cfg).eval(), None, None)
    work = WorkDir(tmp_path / "os")
    res = export_model(loaded, work, frames=17, height=64, width=64, weights={"source": "random", "seed": 0,
                                                                             "state_sha256": "0" * 64},
                       progress=False)
    assert [u["name"] for u in res.units] == ["embed", "spatial_0", "temporal_0", "final"]
    assert max(u["verify_rel_err"] for u in res.units) < 1e-4
    info = read_model_info(work)
    assert info.data["geometry"]["model"]["frames"] == 5  # 17 frames -> 5 latent frames
    for u in info.unit_names:
        _, network, _, _ = parse_onnx(trt, work.fp_onnx(u))
        assert network.num_layers > 10
    blob = build_engine(trt, parse_target("rtx:sm89"), work.fp_onnx("temporal_0"),
                        profile_shapes(info.unit("temporal_0")["inputs"], 2))
    assert len(blob) > 1_000_000


def test_export_handles_deduplicated_initializers():
    """Equal tensors (e.g. two zero biases) are exported once and aliased through Identity; each linear still gets its
    own canonical weight and bias."""
    import warnings

    from qc_compile.export import canonicalize, example_inputs, export_patches, onnx_output_name
    from qc_compile.linears import model_linears
    from qc_compile.models import load_model
    from qc_compile.models.stdit3 import UNIT_INPUTS, UNIT_OUTPUTS, Geometry

    loaded = load_model("qc-ref", random_weights=True)
    m = loaded.model
    with torch.no_grad():
        m.t_embedder.mlp[2].bias.zero_()
        m.fps_embedder.mlp[2].bias.zero_()
    g = Geometry.for_model(loaded.config, 4, 16, 16)
    outs = [onnx_output_name(n) for n in UNIT_OUTPUTS["embed"]]
    path = Path(copy_of(exported(), "dedup")) / "embed_raw.onnx"
    with export_patches(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m.unit_module("embed", g), example_inputs(loaded.config, g, "embed"), str(path),
                          input_names=list(UNIT_INPUTS["embed"]), output_names=outs, opset_version=19, dynamo=False)
    raw = onnx.load(path)
    assert any(n.op_type == "Identity" for n in raw.graph.node)
    mods = dict(m.named_modules())
    lins = {li.name: mods[li.name] for li in model_linears(m) if li.unit == "embed"}
    out = canonicalize(raw, lins)
    names = {i.name for i in out.graph.initializer}
    assert {f"{n}.weight" for n in lins} | {f"{n}.bias" for n in lins} <= names


def test_two_targets_share_identical_qdq_graphs():
    """Graphs are a function of (model, plan): a second target's build rewrites them byte for byte, so the first
    target's manifest records stay valid."""
    from qc_compile.build import build_workdir
    from qc_compile.manifest import Manifest

    work = WorkDir(copy_of(calibrated("fp8_e4m3"), "twotargets"))
    build_workdir(work, "rtx:sm89", progress=False)
    build_workdir(work, "rtx:sm120", progress=False)
    m = Manifest.load(work)  # every target
    assert set(m.targets) == {"rtx:sm89", "rtx:sm120"}
    a, b = (m.target(t, "engines").sources()["final"]["default"] for t in ("rtx:sm89", "rtx:sm120"))
    assert a.onnx_files == b.onnx_files and a.engine != b.engine
