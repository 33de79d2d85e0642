"""The one prompt reader: prompt files (``run --prompts``, ``sweep --prompt-file``, ``calibrate --prompts``) and
prompts given inline or through the API.

Why one place: each command used to read prompt files its own way (a binary file crashed one reader, another took
whitespace-only prompts, and a 10,000-word prompt was echoed back in full). Every rule lives here: UTF-8 text, one
prompt per line, ``#`` starts a comment, no empty/whitespace-only or control-character prompts, bounded sizes, and
error messages that quote at most a short excerpt of a prompt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from qc_compile.errors import UserError

MAX_FILE_BYTES = 4 << 20  # a prompt file larger than this is not a prompt file
MAX_PROMPTS = 4096
MAX_PROMPT_CHARS = 4000  # T5 sees at most 300 tokens; qc-ref far fewer


def excerpt(text: str, n: int = 60) -> str:
    """``text`` quoted, cut to ``n`` characters, so an error never echoes a huge prompt back."""
    text = str(text)
    return repr(text) if len(text) <= n else repr(text[:n]) + f"… ({len(text)} characters)"


def check_prompt(text: object, where: str) -> str:
    """One prompt: a non-empty string of printable text within :data:`MAX_PROMPT_CHARS`; returns it stripped."""
    if not isinstance(text, str):
        raise UserError(f"{where}: a prompt must be text, got {type(text).__name__}.")
    s = text.strip()
    if not s:
        raise UserError(f"{where}: empty or whitespace-only prompt; give a caption such as 'a red circle moving "
                        "right on a black background'.")
    if len(s) > MAX_PROMPT_CHARS:
        raise UserError(f"{where}: prompt {excerpt(s)} is too long; at most {MAX_PROMPT_CHARS} characters.")
    bad = next((c for c in s if (ord(c) < 32 and c != "\t") or ord(c) == 127), None)
    if bad is not None:
        raise UserError(f"{where}: prompt {excerpt(s)} contains the control character {bad!r}; prompts are plain "
                        "text, one per line.")
    return s


def check_prompts(prompts: Iterable[object], where: str = "prompt") -> list[str]:
    """Every prompt checked by :func:`check_prompt`; at least one, at most :data:`MAX_PROMPTS`."""
    out = [check_prompt(p, f"{where} {k + 1}" if where == "prompt" else where) for k, p in enumerate(prompts)]
    if not out:
        raise UserError(f"{where}: no prompts given; give at least one caption.")
    if len(out) > MAX_PROMPTS:
        raise UserError(f"{where}: {len(out)} prompts; at most {MAX_PROMPTS} per call.")
    return out


def read_prompt_file(path: str | os.PathLike, option: str = "--prompts") -> list[str]:
    """Prompts of a UTF-8 text file, one per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    where = f"{option} {path}"
    if not path.exists():
        raise UserError(f"{where}: file not found; give a text file with one prompt per line.")
    if not path.is_file():
        raise UserError(f"{where}: not a regular file; give a text file with one prompt per line.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(f"{where}: {size} bytes; a prompt file holds at most {MAX_FILE_BYTES >> 20} MiB of text.")
    data = path.read_bytes()[: MAX_FILE_BYTES + 1]  # /dev/zero-like files report size 0
    if len(data) > MAX_FILE_BYTES:
        raise UserError(f"{where}: more than {MAX_FILE_BYTES >> 20} MiB; not a prompt file.")
    if b"\0" in data:
        raise UserError(f"{where}: binary file (it contains NUL bytes); give a UTF-8 text file with one prompt per "
                        "line.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start}); give a UTF-8 text file with one prompt per "
                        "line.") from None
    lines = [(k + 1, ln.strip()) for k, ln in enumerate(text.splitlines())]
    prompts = [check_prompt(ln, f"{where}, line {k}") for k, ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise UserError(f"{where}: no prompts in the file (one per line; '#' starts a comment).")
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"{where}: {len(prompts)} prompts; at most {MAX_PROMPTS} per file.")
    return prompts
