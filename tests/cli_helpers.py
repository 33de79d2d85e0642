"""The qc-compile CLI called in-process, as the CLI tests call it."""

from __future__ import annotations

from qc_compile.cli import main


def run_cli(args: list[str]) -> int:
    """`qc-compile ARGS` in this process; its exit code (0 when it returns without SystemExit)."""
    try:
        main(args)
    except SystemExit as e:
        return int(e.code)
    return 0
