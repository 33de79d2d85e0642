"""`qc-compile run` / `generate` / `sweep --model qc-ref-wan`: the diffusers-layout model through qc_compile.enable and its own
sampler (tiny folders via --checkpoint, 2-4 steps): policy none is the plain sampler bit for bit, a caching policy
reuses and is measured against the plain run, artifacts are written, inapplicable flags are refused before any load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from cli_helpers import run_cli  # noqa: E402
from diffusers_helpers import tiny_qc_ref_wan_folder  # noqa: E402
from qc_compile.models import load_model  # noqa: E402
from qc_compile.models import qc_ref_wan as qrw  # noqa: E402

PROMPT = "a red circle moving right on a black background"
SMALL = qrw.SamplingDefaults(frames=4, height=16, width=16, steps=3, cfg=3.0, shift=4.0)  # SSIM: >= 11 px
HLC = ["--set", "hlc.delta1=0.5", "--set", "hlc.delta2=1", "--set", "hlc.tail=0", "--set", "hlc.warmup=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A qc-ref-wan folder with a tiny random transformer (weights moved off the init, so outputs depend on them)."""
    return tiny_qc_ref_wan_folder(tmp_path_factory.mktemp("wan"), SMALL, num_layers=3,
                                  provenance={"train_steps": 7, "test": True})


def test_policy_none_is_the_plain_sampler_bit_for_bit(folder: Path, tmp_path: Path, capsys) -> None:
    from qc_compile.diffusers_run import sample_under_policy

    loaded = load_model("qc-ref-wan", checkpoint=folder)
    prompts = [PROMPT, "a blue square moving up on a gray background"]
    res = sample_under_policy(loaded, prompts, policy="none", seed=5)
    assert torch.equal(res.videos, loaded.sample(prompts, seed=5))  # prompt k: seed 5 + k, as the sampler does
    assert not torch.equal(res.videos[0], res.videos[1])
    assert res.compute_fraction == 1.0 and len(res.steps) == SMALL.steps and res.settings["seeds"] == [5, 6]
    assert getattr(loaded.transformer, "_qc_session", None) is None  # disabled again
    out = tmp_path / "none"
    assert run_cli(["run", "--model", "qc-ref-wan", "--checkpoint", str(folder), "--prompt", PROMPT, "--policy", "none",
                    "--reference", "--quiet", "-o", str(out)]) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["compute_fraction"] == 1.0 and m["reference"]["psnr_db"] == 100.0 and m["reference"]["ssim"] == 1.0


def test_run_quantcache_with_reference_writes_the_run(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    rc = run_cli(["run", "--model", "qc-ref-wan", "--checkpoint", str(folder), "--prompt", PROMPT, "--policy",
                  "quantcache", *HLC, "--steps", "4", "--seed", "3", "--reference", "--quiet", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("video.mp4", "video.png", "trace.json", "metrics.json", "decisions.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["compute_fraction"] < 1 and m["steps"] == 4 and m["policy"] == "quantcache"
    ref = m["reference"]
    assert ref["psnr_db"] > 0 and 0 < ref["ssim"] <= 1
    assert "checker" in m and "checker_fp" in ref and "checker_drop_points" in ref
    t = json.loads((out / "trace.json").read_text())
    assert t["policy"]["spec"] == "quantcache" and t["policy"]["overrides"]["hlc.delta1"] == "0.5"
    assert t["prompts"] == [PROMPT] and t["settings"]["seeds"] == [3] and len(t["steps"]) == 4
    assert t["units"] == ["embed", "block_0", "block_1", "block_2", "final"]
    assert t["compute_fraction"] == m["compute_fraction"] == t["session"]["compute_fraction"]
    assert t["model"]["name"] == "qc-ref-wan" and t["model"]["train_steps"] == 7
    assert set(t["model"]["files_sha256"]) == {"text_encoder.safetensors",
                                               "transformer/diffusion_pytorch_model.safetensors"}
    assert "timings" in t and t["settings"]["driver"] == "qc_compile.enable"
    assert "quantcache: " in captured.out and "vs FP: PSNR" in captured.out and f"wrote {out}/" in captured.out


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if the model is loaded: refusals must come before any load."""
    from qc_compile.commands import run_diffusers

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run_diffusers, "load", refuse)


@pytest.mark.parametrize("extra, flag", [
    (["--executor", "onnxruntime"], "--executor onnxruntime"),
    (["--frames", "8"], "--frames 8"),
    (["--fast"], "--fast"),
    (["--gpus", "2"], "--gpus 2"),
    (["--random-weights"], "--random-weights"),
    (["--set", "hlc.nope=1", "--policy", "hlc"], "nope"),
])
def test_inapplicable_flags_are_refused_before_any_load(folder: Path, tmp_path: Path, capsys, no_load,
                                                        extra, flag) -> None:
    out = tmp_path / "out"
    assert run_cli(["run", "--model", "qc-ref-wan", "--checkpoint", str(folder), "--prompt", PROMPT, *extra,
                    "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not out.exists()


def test_generate_qc_ref_wan_is_the_plain_sampler(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "a.mp4"
    assert run_cli(["generate", "--model", "qc-ref-wan", "--checkpoint", str(folder), "--prompt", PROMPT, "--steps",
                    "2", "--quiet", "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    assert "1 video(s), 2 steps, cfg 3.0, seed 0, 4x16x16" in capsys.readouterr().out
    bad = tmp_path / "b.mp4"
    assert run_cli(["generate", "--model", "qc-ref-wan", "--checkpoint", str(folder), "--prompt", PROMPT, "--height",
                    "32", "--vae", str(tmp_path), "-o", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--vae" in err and "--height 32" in err and not bad.exists()


PROMPT2 = "a blue square moving up on a gray background"


def test_sweep_qc_ref_wan_writes_the_table_and_plot(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"{PROMPT}\n{PROMPT2}\n")
    rc = run_cli(["sweep", "--model", "qc-ref-wan", "--checkpoint", str(folder), "--policies", "none,quantcache",
                  *HLC, "--prompt-file", str(pf), "--seeds", "3", "--steps", "4", "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("sweep.json", "sweep.md", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "sweep.json").read_text())
    assert res["model"] == "qc-ref-wan" and res["steps"] == 4 and res["seeds"] == [3] and res["jobs"] == 1
    assert res["checkpoint"] == str(folder) and res["device"] == "cpu" and res["caption_seed"] is None
    rows = {r["config"]: r for r in res["rows"]}
    assert list(rows) == ["none", "quantcache"] and all(r["videos"] == 2 for r in rows.values())
    none, qc = rows["none"], rows["quantcache"]
    assert none["compute_fraction"] == 1.0 and none["flop_fraction"] == 1.0
    assert none["psnr_db"] == none["psnr_db_min"] == 100.0 and none["ssim"] == 1.0  # the plain sampler bit for bit
    assert 0 < qc["compute_fraction"] < 1 and 0 < qc["flop_fraction"] < 1 and 0 < qc["psnr_db"] < 100
    for r in rows.values():
        assert {"checker", "checker_fp", "checker_drop_points", "seconds_per_video", "ssim"} <= set(r)
        assert r["checker_fp"] is not None and r["seconds_per_video"] > 0
    assert [v["seed"] for v in res["videos"] if v["config"] == "none"] == [3, 4]  # prompt k: noise seed 3 + k
    md = (out / "sweep.md").read_text()
    assert "| quantcache |" in md and "qc-ref-wan" in md
    t = json.loads((out / "runs" / "quantcache" / "trace.json").read_text())
    assert t["settings"]["driver"] == "qc_compile.enable" and len(t["steps"]) == 4 and t["prompts"] == [PROMPT]
    assert (out / "runs" / "quantcache" / "decisions.png").is_file()


def test_sweep_batch_is_one_call_per_seed(folder: Path, tmp_path: Path, capsys) -> None:
    """--batch keeps its meaning: all prompts of a seed in one sampler call (the policy decides for the batch)."""
    out = tmp_path / "sweep"
    rc = run_cli(["sweep", "--model", "qc-ref-wan", "--checkpoint", str(folder), "--policies", "none", "--prompts", "2",
                  "--caption-seed", "1", "--seeds", "0", "--steps", "2", "--batch", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "sweep.json").read_text())
    assert res["batch"] and res["caption_seed"] == 1 and res["rows"][0]["psnr_db"] == 100.0
    assert json.loads((out / "runs" / "none" / "trace.json").read_text())["settings"]["seeds"] == [0, 1]


@pytest.mark.parametrize("extra, flag", [
    (["--jobs", "2"], "--jobs 2"),
    (["--width", "32"], "--width 32"),
    (["--gpus", "2"], "--gpus 2"),
    (["--vae", "/x"], "--vae"),
    (["--random-weights"], "--random-weights"),
    (["--grid", "hlc.nope=1,2"], "nope"),
])
def test_sweep_inapplicable_flags_are_refused_before_any_load(folder: Path, tmp_path: Path, capsys, no_load,
                                                              extra, flag) -> None:
    out = tmp_path / "out"
    assert run_cli(["sweep", "--model", "qc-ref-wan", "--checkpoint", str(folder), "--policies", "none,quantcache",
                    "--prompts", "1", *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not out.exists()
