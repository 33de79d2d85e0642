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

from qc_compile.cli import main  # noqa: E402
from qc_compile.models import qc_ref_wan as qrw  # noqa: E402

TINY = {"num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2, "freq_dim": 32}
SMALL = qrw.SamplingDefaults(frames=4, height=16, width=16, steps=3, cfg=3.0, shift=4.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code)
    return 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tr = qrw.build_transformer({**qrw.TRANSFORMER_CONFIG, **TINY})
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return qrw.save_qc_ref_wan(tmp_path_factory.mktemp("qrw") / "qc_ref_wan", tr, qrw.build_text_encoder(),
                               defaults=SMALL, provenance={"test": True})


@pytest.fixture(scope="module")
def exported(folder: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("work") / "w"
    assert _run(["export", "qc-ref-wan", "--checkpoint", str(folder), "-o", str(work), "--quiet"]) == 0
    return work


def _copy(work: Path, dst: Path) -> Path:
    shutil.copytree(work, dst)
    return dst


@pytest.fixture(scope="module")
def fp8_work(exported: Path, tmp_path_factory) -> Path:
    work = _copy(exported, tmp_path_factory.mktemp("fp8") / "w")
    assert _run(["calibrate", str(work), "--uniform", "fp8", "--quiet"]) == 0
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
    assert _run(["calibrate", str(work), "--uniform", "fp8", "--quantize-embed-final", "--num-prompts", "2",
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
    assert _run(["calibrate", str(work), "--method", "aigq"]) == 2
    err = capsys.readouterr().err
    assert "--method aigq: not available for qc-ref-wan" in err and "--uniform FORMAT" in err
    assert "Traceback" not in err
    bad = tmp_path / "prompts.txt"
    bad.write_text("a purple dragon flying over a castle\n")
    assert _run(["calibrate", str(work), "--uniform", "fp8", "--prompts", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (work / "plan.json").exists()


def test_calibrate_wan_transformer_folder_is_refused(tmp_path: Path, capsys) -> None:
    from diffusers_helpers import tiny_wan

    src = tmp_path / "Wan-tiny"
    tiny_wan(3).save_pretrained(str(src / "transformer"), safe_serialization=True)
    work = tmp_path / "w"
    assert _run(["export", f"wan2.1:{src}", "-o", str(work), "--frames", "5", "--height", "16", "--width", "32",
                 "--text-length", "7", "--quiet"]) == 0
    capsys.readouterr()
    assert _run(["calibrate", str(work), "--uniform", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "a diffusers transformer folder exported on its own" in err and "Traceback" not in err
    assert not (work / "plan.json").exists()
