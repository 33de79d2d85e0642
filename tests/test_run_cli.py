"""`qc-compile run` / `sweep` and the Pipeline API: artifacts written, reproducibility, and user errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli

PROMPT = "a red circle moving left on a black background"
SIZE = ["--frames", "4", "--height", "16", "--width", "16"]
SMALL = ["--random-weights", "--steps", "4", *SIZE, "--quiet"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_run_writes_video_trace_metrics_and_picture(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    rc = run_cli(["run", "--prompt", PROMPT, "--policy", "quantcache", "--set", "hlc.delta1=0.5", "--set",
                  "hlc.delta2=1", "--set", "hlc.tail=0", "--set", "hlc.warmup=2", "--reference", "-o", str(out),
                  *SMALL])
    assert rc == 0, capsys.readouterr().err
    for name in ("video.mp4", "video.png", "trace.json", "metrics.json", "decisions.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    trace = json.loads((out / "trace.json").read_text())
    assert trace["policy"]["name"] == "quantcache" and len(trace["steps"]) == 4
    assert [c["name"] for c in trace["policy"]["components"]] == ["hlc", "aigq", "srap"]
    blocks = [u for u in trace["units"] if u.startswith(("spatial", "temporal"))]
    assert all(set(s["decisions"]) == set(blocks) for s in trace["steps"])
    assert trace["steps"][3]["decisions"]["spatial_0"]["action"] == "reuse"  # delta1 = 0.5: tau_max after warmup
    assert trace["steps"][2]["decisions"]["spatial_0"]["action"] == "compute"  # aligned refresh at (i - warmup) % tau == 0
    assert "res_rel_l1" in trace["steps"][1]["stats"]["spatial_0"] and trace["timings"]["total_seconds"] > 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["compute_fraction"] < 1 and m["compute_fraction"] == trace["compute_fraction"]
    ref = m["reference"]
    assert ref["psnr_db"] > 0 and 0 < ref["ssim"] <= 1 and "checker_drop_points" in ref
    assert "PSNR" in capsys.readouterr().out


def test_batch_prompt_file_and_default_run_dir(tmp_path: Path, monkeypatch) -> None:
    pf = tmp_path / "prompts.txt"
    pf.write_text(f"# two captions\n{PROMPT}\na blue square moving up on a gray background\n")
    monkeypatch.chdir(tmp_path)
    assert run_cli(["run", "--prompts", str(pf), "--policy", "fora", *SMALL]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-fora-s0")
    assert {p.name for p in run_dir.iterdir()} >= {"video_0.mp4", "video_1.png", "trace.json", "metrics.json",
                                                     "decisions.png"}
    assert len(json.loads((run_dir / "trace.json").read_text())["prompts"]) == 2


def test_pipeline_api_is_reproducible() -> None:
    from qc_compile.runtime import Pipeline

    pipe = Pipeline.from_pretrained("qc-ref", random_weights=True)
    kw = dict(policy="hlc+srap", overrides={"srap.tau_low": -1, "srap.p_base": 0.5}, steps=6, frames=4, height=8,
              width=8)
    a, b, c = pipe(PROMPT, seed=1, **kw), pipe(PROMPT, seed=1, **kw), pipe(PROMPT, seed=2, **kw)
    acts = lambda r: [{u: d["action"] for u, d in s.decisions.items()} for s in r.steps]  # noqa: E731
    assert torch.equal(a.videos, b.videos) and acts(a) == acts(b)
    assert acts(a) != acts(c)


@pytest.mark.parametrize("args,msg", [
    (["--policy", "teacache", "--set", "teacache.rel_l1_thresh=-0.5"], r"teacache.rel_l1_thresh = '-0.5' is out of range"),
    (["--policy", "hlc", "--set", "hlc.delta1=0.3", "--set", "hlc.delta2=0.1"], "hlc.delta1 = 0.3 must not exceed"),
    (["--policy", "srap", "--set", "srap.p_base=2"], r"srap.p_base = '2' is out of range: expected a number in \[0, 1\]"),
    (["--policy", "warpdrive"], "unknown policy 'warpdrive'"),
    (["--policy", "hlc", "--set", "delta1"], "expected key=value"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--executor", "tensorrt"], "tensorrt"),
    (["--executor", "onnxruntime"], "runs the graphs of a work dir"),
])
def test_bad_input_exits_2_with_a_message(args, msg, capsys, tmp_path) -> None:
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = run_cli(["run", "--prompt", PROMPT, "-o", str(tmp_path / "r"), *SMALL, *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:")
    import re

    assert re.search(msg, err), err


def test_bad_work_dir_and_prompt_errors(tmp_path: Path, capsys) -> None:
    assert run_cli(["run", str(tmp_path / "nowhere"), "--prompt", PROMPT]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli(["run", "--random-weights"]) == 2
    assert "give a prompt" in capsys.readouterr().err


def test_sweep_table_and_plot(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    rc = run_cli(["sweep", "--policies", "none,fora,teacache", "--grid", "teacache.rel_l1_thresh=0.5", "--prompts", "2",
                  "--caption-seed", "7", "--steps", "4", "--random-weights", *SIZE, "--jobs", "2", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "sweep.json").read_text())
    labels = [r["config"] for r in res["rows"]]
    assert labels == ["none", "fora", "teacache", "teacache rel_l1_thresh=0.5"]
    none = res["rows"][0]
    assert none["compute_fraction"] == 1.0 and none["psnr_db"] == 100.0
    assert res["rows"][1]["compute_fraction"] < 1 and len(res["videos"]) == 8
    md = (out / "sweep.md").read_text()
    assert "| fora |" in md and (out / "pareto.png").stat().st_size > 0
    assert (out / "runs" / "fora" / "decisions.png").is_file()
    assert run_cli(["sweep", "--policies", "fora", "--grid", "hlc.delta1=0.1", "-o", str(out), "--random-weights"]) == 2
    assert "no policy in --policies" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["run", "WORK", "--model", "qc-ref-wan", "--prompt", PROMPT, "--steps", "2"],
    ["run", "--model", "cogvideox:/models/cog", "--prompt", PROMPT, "--steps", "2"],
    ["sweep", "--model", "cogvideox:/models/cog", "--policies", "none", "--prompts", "1"],
    ["sweep", "WORK", "--model", "qc-ref-wan", "--policies", "none", "--prompts", "1"],
    ["generate", "--model", "cogvideox:/models/cog", "--prompt", PROMPT],
])
def test_diffusers_models_on_the_stdit3_cli_are_a_clear_refusal(tmp_path: Path, capsys, args) -> None:
    """A diffusers model where the command line does not take it (`run WORK`, `sweep WORK`, and cogvideox:PATH
    folders on run/generate/sweep; `run`/`generate`/`sweep --model qc-ref-wan` are tests/test_run_diffusers_cli.py,
    wan2.1:PATH pipeline folders tests/test_run_diffusers_pipeline.py, export tests/test_export_diffusers.py): exit 2,
    one paragraph
    pointing at enable() and tools/peers_wan.py, no traceback, nothing written."""
    out = tmp_path / ("a.mp4" if args[0] == "generate" else "out")
    args = [str(tmp_path / "work") if a == "WORK" else a for a in args]
    assert run_cli([*args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "diffusers video transformer" in err and "qc_compile.enable" in err and "Traceback" not in err
    assert not out.exists()
