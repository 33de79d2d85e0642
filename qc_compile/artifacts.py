"""Atomic, verifiable artifact IO.

Every stage writes through :func:`atomic_write` (temp name in the same folder, fsync, rename), so a crash never
leaves a half-written file that a later stage would trust. JSON artifacts carry a ``schema_version``; binary ones
are recorded with their sha256 and checked on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from qc_compile.errors import ArtifactError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp file name beside ``path`` for a writer that opens files by name (e.g. ffmpeg); on success it is
    fsynced and renamed over ``path``, on failure removed. Readers never see a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts get the usual permissions
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``; on failure remove it."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` atomically and return its sha256."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> str:
    """Write ``obj`` as indented JSON atomically and return the file's sha256."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    return write_bytes_atomic(path, data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise :class:`ArtifactError` unless the file exists and hashes to ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: file is missing; expected an artifact with sha256 {expected[:12]}…. "
                            "Re-run the stage that writes it.")
    got = sha256_file(path)
    if got != expected:
        raise ArtifactError(f"{path}: sha256 is {got[:12]}… but the manifest records {expected[:12]}…; the file "
                            "was modified or truncated after it was written. Re-run the stage that writes it.")


def read_json(path: str | os.PathLike, *, kind: str, schema_version: int | None = None) -> dict:
    """Read a JSON artifact, with a clear error for a missing/garbled file or a schema version we do not read."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: {kind} not found.")
    if not path.is_file():
        raise ArtifactError(f"{path}: the {kind} is not a regular file (a directory or a device); the work dir is "
                            "damaged. Re-run the stage that writes it.")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: {kind} is not valid JSON ({str(e)[:160]}); the file is damaged or not a "
                            f"{kind}.") from None
    except RecursionError:
        raise ArtifactError(f"{path}: {kind} is nested too deeply to be a {kind}; the file is damaged.") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: {kind} must be a JSON object, found {type(obj).__name__}.")
    if schema_version is not None and obj.get("schema_version") != schema_version:
        raise ArtifactError(f"{path}: {kind} has schema_version {obj.get('schema_version')!r}; this qc-compile "
                            f"reads schema_version {schema_version}. Re-create it with this version of qc-compile.")
    return obj
