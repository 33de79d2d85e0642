"""The commands docs/DEPLOY.md gives that can run here: the profile flags from tools/trt_shapes.py, and the
polygraphy build of one Q/DQ unit for an RTX target with them (TensorRT-RTX builds on the CPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compile_helpers import built

ROOT = Path(__file__).resolve().parents[1]


def _shapes(*args: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "trt_shapes.py"), *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.slow  # a TensorRT-RTX engine build through polygraphy (~15 s on 2 cores)
def test_polygraphy_builds_a_unit_with_the_documented_flags(tmp_path: Path) -> None:
    work = built("fp8_e4m3", "rtx:sm89")
    flags = _shapes(str(work), "spatial_0", "--max-batch", "2")
    assert flags.startswith("--minShapes=x:1x") and ",mask:1x" in flags and "--maxShapes=x:2x" in flags
    assert "cached_residual" not in flags and "cached_residual:2x" in _shapes(str(work), "spatial_0", "--plugins")
    poly = _shapes(str(work), "spatial_0", "--polygraphy")
    assert poly.startswith("--trt-min-shapes x:[1,") and " --trt-max-shapes x:[2," in poly
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    env = dict(os.environ, POLYGRAPHY_USE_TENSORRT_RTX="1")
    out = tmp_path / "spatial_0.engine"
    r = subprocess.run([exe, "convert", str(work / "onnx" / "q" / "spatial_0.onnx"), "--compute-capabilities", "8.9",
                        *poly.split(), "-o", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert out.stat().st_size > 100_000
