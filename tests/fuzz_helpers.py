"""Helpers of the reliability tests: a good, built work dir shared by every case (hard-linked copies), a sha256
snapshot of a directory tree, and in-place-safe file mutation."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from compile_helpers import calibrated, copy_of, run_cli

PROMPT = "a red circle moving right on a black background"
TARGET = "rtx:sm89"


@functools.lru_cache(maxsize=None)
def good_work() -> Path:
    """qc-ref (random weights, 4x16x16), calibrated --uniform fp8, built for rtx:sm89 --onnx-only (Q/DQ graphs and a
    manifest; no TensorRT needed)."""
    work = copy_of(calibrated("fp8_e4m3"), "fuzz-good")
    code, out = run_cli("build", work, "--target", TARGET, "--onnx-only", "--quiet")
    assert code == 0, out
    return work


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose files are hard links (cheap). Safe because qc-compile replaces files by rename and
    :func:`replace_file` does the same; a writer that wrote in place would show up in the snapshot check."""
    shutil.copytree(src, dst, copy_function=os.link, symlinks=True)
    return dst


def replace_file(path: Path, data: bytes | str) -> None:
    """Give ``path`` new content without touching the (possibly shared) old inode."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 (files), 'dir' (directories) or 'link:<target>' (symlinks), for the whole tree."""
    out: dict[str, str] = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            p = Path(dirpath) / d
            out[str(p.relative_to(root))] = f"link:{os.readlink(p)}" if p.is_symlink() else "dir"
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_symlink():
                out[str(p.relative_to(root))] = f"link:{os.readlink(p)}"
            elif p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p.relative_to(root))] = "special"
    return out


def scratch(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-"))


@functools.lru_cache(maxsize=None)
def opensora_files() -> Path:
    """Tiny random Open-Sora 1.2 parts as a user has them (the architectures of tests/test_opensora_e2e.py):
    DIR/dit.safetensors (STDiT3), DIR/t5/ (a T5 folder) and DIR/vae/model.safetensors (OpenSora-VAE-v1.2)."""
    import torch

    from qc_compile.models.checkpoint import save_checkpoint
    from qc_compile.models.opensora_random import random_vae, save_random_t5
    from qc_compile.models.opensora_vae import save_vae
    from qc_compile.models.stdit3 import STDiT3
    from test_opensora_e2e import TINY_DIT

    d = scratch("fuzz-opensora")
    torch.manual_seed(0)
    save_checkpoint(d / "dit.safetensors", STDiT3(TINY_DIT), TINY_DIT, dtype=torch.float32)
    save_random_t5(d / "t5")
    (d / "vae").mkdir()
    save_vae(d / "vae" / "model.safetensors", random_vae())
    return d
