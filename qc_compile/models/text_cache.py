"""A file of T5 caption features, so calibration and sweeps over the same prompts don't rerun a 4.8 B-parameter T5.

One safetensors file holds, per entry, the features ``y.<key>`` (L, d_model) in the encoder's dtype (the full
padded length: bit-identical to a fresh encode, padding rows included) and the mask ``mask.<key>`` (L,) bool. The
key is ``sha256(encoder identity, text)`` where ``text`` is the prompt *after* Open-Sora's conventions (score
suffixes, cleaning), so a different T5 folder, dtype, max length or aesthetic score never hits a stale entry. The
metadata (format, schema version, key -> text) is checked on read; writes are atomic (a crash leaves the old file).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from qc_compile.errors import ArtifactError

FORMAT = "qc-compile/caption-cache"
SCHEMA_VERSION = "1"


def entry_key(identity: str, text: str) -> str:
    return hashlib.sha256(f"{identity}\0{text}".encode()).hexdigest()[:40]


def check_cache_path(path: str | os.PathLike) -> Path:
    """``--caption-cache`` checked before any work: an existing regular file (read, then rewritten atomically), or a
    new file in a writable folder. Written at the end of a run, so a bad location must fail at the start."""
    from qc_compile.outputs import check_writable_parent

    path = Path(path)
    if path.exists() and not path.is_file():
        raise ArtifactError(f"--caption-cache {path}: {'is a directory' if path.is_dir() else 'not a regular file'}; "
                            "pass the path of a .safetensors file (created if it does not exist).")
    check_writable_parent(path, "--caption-cache")
    return path


class CaptionCache:
    """Read on construction (if the file exists), looked up per text, written back by :meth:`save`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.y: dict[str, torch.Tensor] = {}
        self.mask: dict[str, torch.Tensor] = {}
        self.texts: dict[str, str] = {}
        self.dirty = False
        check_cache_path(self.path)
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ArtifactError(f"--caption-cache {self.path}: not a readable safetensors file ({e}); delete it to "
                                "start a new cache.") from None
        if meta.get("format") != FORMAT or meta.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(f"--caption-cache {self.path}: format {meta.get('format')!r} schema "
                                f"{meta.get('schema_version')!r}, expected {FORMAT!r} schema {SCHEMA_VERSION!r}; "
                                "pass another path or delete the file.")
        try:
            texts = json.loads(meta["texts"])
        except (KeyError, json.JSONDecodeError) as e:
            raise ArtifactError(f"--caption-cache {self.path}: its 'texts' metadata is missing or malformed ({e}); "
                                "delete the file.") from None
        for key in texts:
            if f"y.{key}" not in tensors or f"mask.{key}" not in tensors:
                raise ArtifactError(f"--caption-cache {self.path}: entry {key} lacks its tensors (damaged file); "
                                    "delete it.")
            self.y[key], self.mask[key] = tensors[f"y.{key}"], tensors[f"mask.{key}"].bool()
        self.texts = texts

    def get(self, identity: str, text: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = entry_key(identity, text)
        return (self.y[key], self.mask[key]) if key in self.y else None

    def put(self, identity: str, text: str, y: torch.Tensor, mask: torch.Tensor) -> None:
        """Store one prompt's features (L, C) and mask (L,)."""
        key = entry_key(identity, text)
        self.y[key] = y.detach().to("cpu").contiguous()
        self.mask[key] = mask.detach().to("cpu", torch.bool).contiguous()
        self.texts[key] = text
        self.dirty = True

    def __len__(self) -> int:
        return len(self.y)

    def save(self) -> None:
        if not self.dirty:
            return
        from safetensors.torch import save

        from qc_compile.artifacts import write_bytes_atomic

        tensors = {f"y.{k}": v for k, v in self.y.items()} | {f"mask.{k}": v for k, v in self.mask.items()}
        meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "texts": json.dumps(self.texts, sort_keys=True)}
        write_bytes_atomic(self.path, save(tensors, metadata=meta))
        self.dirty = False
