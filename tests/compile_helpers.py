"""Shared, cached work dirs for the compile-path tests (export once per session, copy before mutating).

qc-ref with random weights (the shipped checkpoint may not exist yet) at a small geometry: 4 frames of 16x16 pixels
(256 tokens), so an export takes ~4 s, a calibration ~1 s and a TensorRT-RTX build of the 10 units ~6 s on 2 cores.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import tempfile
from pathlib import Path

GEOMETRY = ["--frames", "4", "--height", "16", "--width", "16"]
CALIB_STEPS = "3"
_ROOT = Path(tempfile.mkdtemp(prefix="qc-compile-tests-"))
# ~2 GB of exports and engines per session: removed at exit (it used to stay, and repeated runs filled the disk)
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def run_cli(*args: str) -> tuple[int, str]:
    """Run ``qc-compile ARGS`` in-process; returns (exit code, stdout + stderr)."""
    from qc_compile.cli import main

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, buf.getvalue()


def _ok(args) -> str:
    code, out = run_cli(*args)
    assert code == 0, out
    return out


@functools.lru_cache(maxsize=None)
def exported() -> Path:
    work = _ROOT / "exported"
    _ok(["export", "qc-ref", "-o", work, "--random-weights", "--quiet", *GEOMETRY])
    return work


def copy_of(src: Path, name: str) -> Path:
    dst = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT)) / "work"
    shutil.copytree(src, dst)
    return dst


@functools.lru_cache(maxsize=None)
def calibrated(fmt: str, *extra: str) -> Path:
    work = copy_of(exported(), f"calib-{fmt}" + "".join(e.strip("-") for e in extra))
    _ok(["calibrate", work, "--uniform", fmt, "--steps", CALIB_STEPS, "--quiet", *extra])
    return work


@functools.lru_cache(maxsize=None)
def built(fmt: str, target: str) -> Path:
    work = copy_of(calibrated(fmt), f"built-{fmt}-{target.replace(':', '-')}")
    _ok(["build", work, "--target", target, "--quiet"])
    return work


@functools.lru_cache(maxsize=None)
def built_plugins() -> Path:
    """An FP8 build with ``qc::`` plugin nodes for full TensorRT (graphs only: no engine can be built here)."""
    work = copy_of(calibrated("fp8_e4m3"), "built-plugins")
    _ok(["build", work, "--target", "trt", "--onnx-only", "--plugins", "--quiet"])
    return work
