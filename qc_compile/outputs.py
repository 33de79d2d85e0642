"""Output paths of the commands: checked before any work, never silently overwritten, and written whole or not at all.

Why: a long run that fails at the very end on a read-only or existing output wastes its work, and a reused run
directory that mixes stale videos with new results misleads whoever reads it. So every output is checked up front
(``--overwrite`` is needed to replace an existing one), and directories of results are written into a fresh temp
directory beside the target and swapped in only when complete (:func:`fresh_dir`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from qc_compile.errors import UserError


def check_writable_parent(path: Path, option: str) -> None:
    """The folder ``path`` will be written into (or its first existing ancestor) is a writable directory."""
    parent = path.parent
    while not parent.exists():  # created on write; the first existing ancestor must be a writable directory
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is not a directory.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot write into {parent} (permission denied); choose another location.")


def check_output_file(path: str | os.PathLike, option: str, overwrite: bool) -> Path:
    """A file the command will write: not a directory, not existing unless ``overwrite``, in a writable place."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a directory; give a file path.")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"{option} {path}: the file exists; pass --overwrite to replace it or choose another "
                            "path.")
        if not path.is_file():
            raise UserError(f"{option} {path}: exists and is not a regular file; choose another path.")
    check_writable_parent(path, option)
    return path


def check_output_dir(path: str | os.PathLike, option: str, overwrite: bool) -> Path:
    """A directory of results: absent or empty, or (with ``overwrite``) replaced whole by :func:`fresh_dir`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: exists and is not a directory.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{option} {path}: the directory exists and is not empty; results from another run would "
                        "mix with these. Choose a new directory or pass --overwrite to replace it.")
    check_writable_parent(path / "x", option) if path.is_dir() else check_writable_parent(path, option)
    return path


@contextlib.contextmanager
def fresh_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory beside ``path``; on success it replaces ``path`` (whatever was there is
    removed), on failure it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; results get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "d")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
