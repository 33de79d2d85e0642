"""The work-dir chain on a diffusers model: `export qc-ref-wan --checkpoint FOLDER -o WORK` -> `calibrate WORK
--uniform FORMAT` (ranges from the model's own sampler, keyed by diffusers module paths) -> `run WORK` / `sweep WORK`
(the plan's formats on FastLinear under qc_compile.enable). Tiny random qc-ref-wan folders, 3 steps, CPU."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from cli_helpers import run_cli  # noqa: E402
from diffusers_helpers import tiny_qc_ref_wan_folder, tiny_wan_folder  # noqa: E402
from qc_compile.models import qc_ref_wan as qrw  # noqa: E402

SMALL = qrw.SamplingDefaults(frames=4, height=16, width=16, steps=3, cfg=3.0, shift=4.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_qc_ref_wan_folder(tmp_path_factory.mktemp("qrw"), SMALL)


@pytest.fixture(scope="module")
def exported(folder: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("work") / "w"
    assert run_cli(["export", "qc-ref-wan", "--checkpoint", str(folder), "-o", str(work), "--quiet"]) == 0
    return work


def _copy(work: Path, dst: Path) -> Path:
    shutil.copytree(work, dst)
    return dst


@pytest.fixture(scope="module")
def fp8_work(exported: Path, tmp_path_factory) -> Path:
    work = _copy(exported, tmp_path_factory.mktemp("fp8") / "w")
    assert run_cli(["calibrate", str(work), "--uniform", "fp8", "--quiet"]) == 0
    return work


def test_calibrate_uniform_fp8_plans_exactly_the_block_linears(fp8_work: Path, capsys) -> None:
    model = json.loads((fp8_work / "model.json").read_text())
    units = {li["name"]: u["name"] for u in model["units"] for li in u["linears"]}
    plan = json.loads((fp8_work / "plan.json").read_text())
    assert set(plan["linears"]) == set(units)
    quantized = {n for n, e in plan["linears"].items() if e["weight"] == "fp8_e4m3"}
    assert quantized == {n for n, u in units.items() if u.startswith("block_")} and len(quantized) == 2 * 10
    for n, e in plan["linears"].items():
        assert e["unit"] == units[n]
        if n in quantized:
            assert e["activation"] == "fp8_e4m3" and e["act_scale"] > 0
        else:
            assert (e["weight"], e["activation"]) == ("bf16", "bf16")
    ranges = json.loads((fp8_work / "calib" / "ranges.json").read_text())["ranges"]
    assert set(ranges) == set(units)
    assert all(math.isfinite(r["amax"]) and r["amax"] > 0 and r["calls"] == SMALL.steps for r in ranges.values())
    assert (fp8_work / "report" / "calibration.md").is_file() and (fp8_work / "report" / "calibration_ranges.png").is_file()
    rt = plan["provenance"]["calibration"]["runtime"]
    assert rt["schedule"]["written"] and len(plan["schedule"]) == SMALL.steps and plan["schedule"][0] == "high"
    assert plan["variants"]["high"] == {"*": {"weight": "bf16", "activation": "bf16"}}
    assert rt["srap"]["written"] is False and "not ported" in rt["srap"]["reason"]
    assert rt["hlc"]["written"] is False and "not ported" in rt["hlc"]["reason"]


def test_calibrate_quantize_embed_final_and_cli_output(exported: Path, tmp_path: Path, capsys) -> None:
    work = _copy(exported, tmp_path / "w")
    capsys.readouterr()
    assert run_cli(["calibrate", str(work), "--uniform", "fp8", "--quantize-embed-final", "--num-prompts", "2",
                    "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "26 linear(s) in fp8_e4m3, 0 kept at bf16" in out
    assert "SRAP thresholds not written" in out and "HLC thresholds not written" in out
    plan = json.loads((work / "plan.json").read_text())
    assert all(e["weight"] == "fp8_e4m3" for e in plan["linears"].values())
    assert len(plan["provenance"]["calibration"]["prompts"]) == 2


def test_calibrate_refusals(exported: Path, tmp_path: Path, capsys) -> None:
    work = _copy(exported, tmp_path / "w")
    capsys.readouterr()
    assert run_cli(["calibrate", str(work), "--method", "aigq"]) == 2
    err = capsys.readouterr().err
    assert "--method aigq: not available for qc-ref-wan" in err and "--uniform FORMAT" in err
    assert "Traceback" not in err
    bad = tmp_path / "prompts.txt"
    bad.write_text("a purple dragon flying over a castle\n")
    assert run_cli(["calibrate", str(work), "--uniform", "fp8", "--prompts", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (work / "plan.json").exists()


def test_calibrate_wan_transformer_folder_is_refused(tmp_path: Path, capsys) -> None:
    src = tiny_wan_folder(tmp_path / "Wan-tiny")
    work = tmp_path / "w"
    assert run_cli(["export", f"wan2.1:{src}", "-o", str(work), "--frames", "5", "--height", "16", "--width", "32",
                    "--text-length", "7", "--quiet"]) == 0
    capsys.readouterr()
    assert run_cli(["calibrate", str(work), "--uniform", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "a diffusers transformer folder exported on its own" in err and "Traceback" not in err
    assert not (work / "plan.json").exists()
    assert run_cli(["run", str(work), "-p", "a red circle", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "a diffusers transformer folder exported on its own" in err and "Traceback" not in err


PROMPTS = ["a red circle moving right on a black background", "a blue square moving up on a gray background"]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from qc_compile.metrics.fidelity import psnr

    return min(float(psnr(x, y, data_range=2.0)) for x, y in zip(a, b))


def _loaded(work: Path):
    from qc_compile.workdir import WorkDir, load_model_for, read_model_info

    return load_model_for(read_model_info(WorkDir(work)))


def test_run_without_plan_or_with_bf16_plan_is_the_plain_sampler(exported: Path, tmp_path: Path, capsys) -> None:
    from qc_compile.diffusers_run import sample_under_policy

    work = _copy(exported, tmp_path / "w")
    loaded = _loaded(work)
    plain = loaded.sample(PROMPTS, seed=3)
    assert torch.equal(sample_under_policy(loaded, PROMPTS, policy="none", seed=3, work=work).videos, plain)
    assert run_cli(["calibrate", str(work), "--uniform", "bf16", "--num-prompts", "2", "--quiet"]) == 0
    res = sample_under_policy(loaded, PROMPTS, policy="none", seed=3, work=work)
    assert torch.equal(res.videos, plain)
    assert res.settings["plan"] and not res.settings["quantized"] and res.extra["plan"]["variants"] == ["default"]


def test_run_fp8_plan_runs_fastlinear_within_fp8_error(fp8_work: Path, tmp_path: Path, capsys) -> None:
    """The fp8 plan quantizes exactly the block linears W8A8 with per-token activation scales, so under policy none
    it is enable(quantize='fp8') bit for bit (the same FastLinear modules on the same linears), differs from the
    plain sampler, and stays within FP8 error of it: 50.3 and 52.2 dB measured for the two prompts on this tiny
    model (3 steps; the schedule policy, step 0 unquantized: 51.3 / 52.9 dB). The 35 dB bound leaves ~15 dB for
    other CPUs' GEMM rounding; the bit-identity with enable(quantize='fp8') is what pins the formats down."""
    import qc_compile
    from qc_compile.diffusers_run import sample_under_policy

    loaded = _loaded(fp8_work)
    plain = loaded.sample(PROMPTS, seed=3)
    res = sample_under_policy(loaded, PROMPTS, policy="none", seed=3, work=fp8_work)
    assert all(type(m) is torch.nn.Linear for m in loaded.transformer.modules() if "Linear" in type(m).__name__)
    assert torch.equal(loaded.sample(PROMPTS, seed=3), plain)  # restored after the run
    assert not torch.equal(res.videos, plain)
    assert _psnr(res.videos, plain) > 35.0
    qc_compile.enable(loaded.transformer, policy="none", quantize="fp8")
    try:
        ref = loaded.sample(PROMPTS, seed=3)
    finally:
        qc_compile.disable(loaded.transformer)
    assert torch.equal(res.videos, ref)
    assert res.settings["quantized"] and res.extra["plan"]["formats"] == {"bf16/bf16": 6, "fp8_e4m3/fp8_e4m3": 20}
    # the schedule's high step (step 0) runs the unquantized linears under a policy that routes the plan's variants
    sched = sample_under_policy(loaded, PROMPTS, policy="schedule", seed=3, work=fp8_work)
    assert [sorted({d["variant"] for d in s.decisions.values()} - {"default"}) for s in sched.steps] == \
        [["high"], [], []]
    assert not torch.equal(sched.videos, res.videos) and _psnr(sched.videos, plain) > 35.0


def test_run_cli_records_the_plan(fp8_work: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run_cli(["run", str(fp8_work), "-p", PROMPTS[0], "--policy", "none", "--reference", "--quiet", "-o",
                    str(out)]) == 0
    line = capsys.readouterr().out
    assert "vs FP: PSNR" in line
    trace = json.loads((out / "trace.json").read_text())
    assert trace["settings"]["work_dir"] == str(fp8_work) and trace["settings"]["quantized"] is True
    from qc_compile.artifacts import sha256_file

    assert trace["plan"]["sha256"] == sha256_file(fp8_work / "plan.json")
    assert trace["plan"]["formats"]["fp8_e4m3/fp8_e4m3"] == 20 and trace["plan"]["schedule"][0] == "high"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 35.0 < metrics["reference"]["psnr_db"] < 100.0
    assert (out / "video.mp4").is_file()
    # a policy that reads the plan's schedule is checked with the plan (not refused for lacking one)
    assert run_cli(["run", str(fp8_work), "-p", PROMPTS[0], "--policy", "schedule", "--quiet", "-o",
                    str(tmp_path / "sched")]) == 0
    steps = json.loads((tmp_path / "sched" / "trace.json").read_text())["steps"]
    assert {d["variant"] for d in steps[0]["decisions"].values()} == {"high"}


def test_sweep_work_writes_rows(fp8_work: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    assert run_cli(["sweep", str(fp8_work), "--policies", "none,hlc", "--prompts", "1", "--seeds", "0", "-o",
                    str(out)]) == 0
    d = json.loads((out / "sweep.json").read_text())
    assert len(d["rows"]) == 2 and d["work_dir"] == str(fp8_work) and d["plan"]["quantized"]
    none = next(r for r in d["rows"] if r["policy"] == "none")
    assert 35.0 < none["psnr_db"] < 100.0
    # a policy that reads the plan (its per-step schedule) is checked with the work dir's plan, not refused
    out2 = tmp_path / "sweep_schedule"
    assert run_cli(["sweep", str(fp8_work), "--policies", "schedule", "--prompts", "1", "--seeds", "0", "-o",
                    str(out2)]) == 0, capsys.readouterr().err
    assert json.loads((out2 / "sweep.json").read_text())["rows"][0]["policy"] == "schedule"


def test_tampered_weights_plan_and_flags_are_refused(fp8_work: Path, tmp_path: Path, capsys) -> None:
    def refused(work: Path, *extra: str) -> str:
        capsys.readouterr()
        assert run_cli(["run", str(work), "-p", PROMPTS[0], "--quiet", "-o", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1
        assert not (tmp_path / "r").exists()
        return err

    assert "not applicable to work dir" in refused(fp8_work, "--frames", "8")
    assert "not applicable to work dir" in refused(fp8_work, "--fast")
    assert "drop --model" in refused(fp8_work, "--model", "qc-ref")
    work = _copy(fp8_work, tmp_path / "plan")
    plan = json.loads((work / "plan.json").read_text())
    plan["model"]["weights_sha256"] = "0" * 64
    (work / "plan.json").write_text(json.dumps(plan))
    assert "calibrated on other weights" in refused(work)
    model = json.loads((fp8_work / "model.json").read_text())
    folder = Path(model["weights"]["path"])
    shadow = tmp_path / "folder"
    shutil.copytree(folder, shadow)
    model["weights"]["path"] = str(shadow)
    work = _copy(fp8_work, tmp_path / "weights")
    (work / "model.json").write_text(json.dumps(model))
    st = shadow / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 1
    st.write_bytes(bytes(data))
    assert "changed since export" in refused(work)


def test_wan_pipeline_work_dir_calibrates_and_runs(tmp_path: Path, capsys) -> None:
    """A work dir exported from a whole WanPipeline folder (tiny random one: UMT5 + word-level tokenizer + Wan VAE):
    calibrate runs the pipeline's own sampler; run WORK with no plan is the plain pipeline bit for bit, with the fp8
    plan it is enable(quantize='fp8') on the same pipeline bit for bit."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import qc_compile
    from test_run_diffusers_pipeline import tiny_pipeline

    from qc_compile.diffusers_run import load_work, sample_under_policy
    from qc_compile.workdir import WorkDir, read_model_info

    src = tmp_path / "Wan-tiny-Diffusers"
    tiny_pipeline().save_pretrained(str(src), safe_serialization=True)
    work = tmp_path / "w"
    assert run_cli(["export", f"wan2.1:{src}", "-o", str(work), "--frames", "5", "--height", "32", "--width", "32",
                    "--text-length", "16", "--quiet"]) == 0
    info = read_model_info(WorkDir(work))
    loaded, plan = load_work(work, info, "cpu")
    assert plan is None and loaded.max_sequence_length == 16
    prompts = PROMPTS[:1]
    plain = loaded.sample(prompts, seed=1, steps=3)
    assert torch.equal(sample_under_policy(loaded, prompts, policy="none", seed=1, steps=3, work=work).videos, plain)
    assert run_cli(["calibrate", str(work), "--uniform", "fp8", "--steps", "3", "--num-prompts", "2", "--quiet"]) == 0
    data = json.loads((work / "plan.json").read_text())
    units = {li["name"]: u["name"] for u in json.loads((work / "model.json").read_text())["units"]
             for li in u["linears"]}
    assert {n for n, e in data["linears"].items() if e["weight"] == "fp8_e4m3"} == \
        {n for n, u in units.items() if u.startswith("block_")}
    assert len(data["schedule"]) == 3
    ranges = json.loads((work / "calib" / "ranges.json").read_text())["ranges"]
    assert all(math.isfinite(r["amax"]) and r["amax"] > 0 and r["calls"] == 3 for r in ranges.values())
    res = sample_under_policy(loaded, prompts, policy="none", seed=1, steps=3, work=work)
    assert not torch.equal(res.videos, plain) and res.settings["quantized"]
    qc_compile.enable(loaded.transformer, policy="none", quantize="fp8")
    try:
        assert torch.equal(res.videos, loaded.sample(prompts, seed=1, steps=3))
    finally:
        qc_compile.disable(loaded.transformer)
    assert torch.equal(loaded.sample(prompts, seed=1, steps=3), plain)
