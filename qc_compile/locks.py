"""The work-dir lock: one writer (export --force, calibrate, build) per work dir at a time.

An advisory ``fcntl.flock`` on ``WORK/.qc-lock``, whose content names the holder (pid, command, start time) so a
refusal can say who holds it. The kernel drops a flock when its process dies, so a lock file left behind by a killed
process is stale by construction: the next writer takes it and says so. The file is removed on release (after
checking it is still the file we locked), so a finished command leaves the work dir byte-for-byte as it wrote it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
from pathlib import Path
from typing import Iterator

from qc_compile.errors import UserError

LOCK_NAME = ".qc-lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def workdir_lock(root: str | os.PathLike, command: str, *, log=None) -> Iterator[Path]:
    """Hold the lock of work dir ``root`` for ``command``; raise UserError naming the holder if another has it."""
    import fcntl

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"work dir {root} does not exist; create it with `qc-compile export MODEL -o {root}`.")
    path = root / LOCK_NAME
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            h = _holder(path)
            pid = h.get("pid")
            alive = isinstance(pid, int) and _pid_alive(pid)
            who = (f"`qc-compile {h.get('command', '?')}` (pid {pid}, started {h.get('started', '?')})" if pid
                   else "another qc-compile process")
            extra = "" if alive or not pid else (" The recorded pid is no longer running, but the lock is still "
                                                  "held (by a child process, or on a file system without flock); "
                                                  f"if no qc-compile runs on {root}, delete {path}.")
            raise UserError(f"{root} is locked by {who}; one command at a time may write a work dir. Wait for it "
                            f"to finish (or stop it) and re-run.{extra}") from None
        try:
            st_fd, st_path = os.fstat(fd), (os.stat(path) if path.exists() else None)
        except OSError:
            st_path = None
        if st_path is None or (st_fd.st_ino, st_fd.st_dev) != (st_path.st_ino, st_path.st_dev):
            os.close(fd)  # the holder removed the file between our open and our flock: take the new one
            continue
        break
    else:
        raise UserError(f"{path}: could not take the work-dir lock (the file keeps changing); re-run.")
    stale = _holder(path)
    if stale.get("pid") and stale.get("pid") != os.getpid() and log is not None:
        log(f"note: took over a stale lock of {root} left by pid {stale['pid']} ({stale.get('command', '?')}), "
            "which is no longer running.")
    info = {"pid": os.getpid(), "command": command,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
