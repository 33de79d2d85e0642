"""`qc-compile eval`: summaries, JSON, and user errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli
from qc_compile.data.shapes import Caption, render
from qc_compile.video_io import write_mp4, write_png_strip

CAP = Caption("red", "circle", "right", "black")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval")
    v = render([CAP], seed=1)[0]
    return {
        "mp4": write_mp4(d / "v.mp4", v),
        "png": write_png_strip(d / "v.png", v),
        "noisy": write_png_strip(d / "noisy.png", (v + 0.05 * torch.randn(v.shape, generator=torch.Generator()
                                                                           .manual_seed(0))).clamp(-1, 1)),
        "short": write_png_strip(d / "short.png", v[:, :8]),
        "dir": d,
    }


def test_reference_and_caption(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out_json = files["dir"] / "out" / "r.json"
    code = run_cli(["eval", str(files["mp4"]), "--reference", str(files["png"]), "--caption", CAP.text(),
                    "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("psnr ") and " dB  ssim 0." in out
    assert "caption: color ok (red) shape ok (circle) direction ok (right) background ok (black)" in out
    rep = json.loads(out_json.read_text())
    assert rep["schema_version"] == 1 and rep["fidelity"]["psnr_db"] > 30
    assert len(rep["fidelity"]["psnr_db_per_frame"]) == 16 and rep["caption"]["all_ok"] is True


def test_wrong_caption_reports_fail(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    code = run_cli(["eval", str(files["png"]), "--caption", "a red circle moving left on a black background"])
    out = capsys.readouterr().out
    assert code == 0 and "direction FAIL (right, want left)" in out and "psnr" not in out


def test_reference_only(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["eval", str(files["noisy"]), "--reference", str(files["png"])]) == 0
    out = capsys.readouterr().out
    assert "psnr 3" in out and "caption" not in out  # sigma 0.05 -> 32 dB, a bit more where clamped


def test_needs_reference_or_caption(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["eval", str(files["png"])]) == 2
    assert "--reference" in capsys.readouterr().err


def test_mismatched_shapes_name_both_files(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["eval", str(files["png"]), "--reference", str(files["short"])]) == 2
    err = capsys.readouterr().err
    assert "v.png" in err and "short.png" in err and "(3, 16, 32, 32)" in err and "(3, 8, 32, 32)" in err
    assert "Traceback" not in err


def test_bad_caption_and_missing_file(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert run_cli(["eval", str(files["png"]), "--caption", "a red blob moving left on a black background"]) == 2
    err = capsys.readouterr().err
    assert "'blob'" in err and "triangle" in err
    assert run_cli(["eval", str(files["dir"] / "missing.mp4"), "--caption", CAP.text()]) == 2
    assert "missing.mp4" in capsys.readouterr().err
