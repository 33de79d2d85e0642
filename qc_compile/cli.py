"""The ``qc-compile`` console script.

Subcommands live in ``qc_compile/commands/<name>.py`` and are imported only when used, so ``--help`` stays fast
and a command's heavy dependencies (TensorRT, onnxruntime) never slow down the others.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import threading

import click

from qc_compile.errors import UserError

_DEBUG = {"on": False}  # set by the global --debug flag (or QC_COMPILE_DEBUG=1)

# name -> (module, attribute, one-line help). Add a line here when adding a command.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("qc_compile.commands.generate", "generate", "Plain FP sampling of a model (the baseline and the demo)."),
    "eval": ("qc_compile.commands.evaluate", "evaluate", "Fidelity between two videos and the shapes caption checker."),
    "run": ("qc_compile.commands.run", "run", "Generate under a step policy: video, decision trace, metrics, picture."),
    "sweep": ("qc_compile.commands.sweep", "sweep", "Policies x thresholds x prompts x seeds: one table and a Pareto plot."),
    "export": ("qc_compile.commands.export", "export", "Export a model to one ONNX graph per unit (checked against torch)."),
    "calibrate": ("qc_compile.commands.calibrate", "calibrate", "Calibrate activation ranges and write plan.json."),
    "build": ("qc_compile.commands.build", "build", "Apply the plan's passes and build engines for a target."),
    "compare": ("qc_compile.commands.compare", "compare", "Accuracy of the compiled graphs (polygraphy, per unit and end to end)."),
    "serve": ("qc_compile.commands.serve", "serve", "Serve a model or work dir behind Triton Inference Server (HTTP, gRPC, metrics)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    _DEBUG["on"] = _DEBUG["on"] or bool(value)
    return value


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qc-compile")
@click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=_set_debug,
              help="Show the full traceback of an unexpected error (also QC_COMPILE_DEBUG=1).")
def cli() -> None:
    """qc-compile: export, calibrate, build and run video diffusion transformers fast.

    Pipeline: export -> calibrate -> build -> run / compare / bench. `generate` samples the FP model directly.
    Errors in what you gave (files, options, prompts, the disk) print one paragraph and exit 2; an internal error
    exits 1 with a one-line cause (`qc-compile --debug COMMAND ...` shows its traceback).
    """


def describe_os_error(e: OSError) -> str:
    """One sentence for a file-system error: what failed, on which path, and what to do."""
    path = e.filename if e.filename is not None else "a file"
    if e.filename2 is not None:
        path = f"{e.filename} -> {e.filename2}"
    hints = {
        errno.ENOSPC: "the disk is full; free space (or choose another output location) and re-run",
        errno.EDQUOT: "the disk quota is exhausted; free space and re-run",
        errno.EACCES: "permission denied; choose a location you can write to or fix its permissions",
        errno.EPERM: "operation not permitted; choose a location you can write to or fix its permissions",
        errno.EROFS: "the file system is read-only; choose a writable output location",
        errno.EISDIR: "it is a directory where a file was expected; give a file path",
        errno.ENOTDIR: "a part of the path is a file where a directory was expected",
        errno.EEXIST: "it already exists; remove it or pass --overwrite where the command offers it",
        errno.ENOENT: "no such file or directory",
        errno.ENAMETOOLONG: "the file name is too long",
        errno.EMFILE: "too many open files",
    }
    why = hints.get(e.errno, e.strerror or type(e).__name__)
    return f"{path}: {why} ({type(e).__name__}, errno {e.errno})." if e.errno else f"{path}: {e}."


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "…"


def main(argv: list[str] | None = None) -> None:
    """Entry point and the one error boundary of the CLI.

    * :class:`UserError` / ``ArtifactError`` / validation errors and ``OSError`` (permissions, disk full, a path
      that is a directory or already exists): one paragraph on stderr, exit 2, no traceback;
    * Ctrl-C: exit 130 (what each stage leaves behind is documented in README "Errors and safety");
    * anything else is a bug: exit 1 with a one-line cause and a pointer to ``--debug``, which re-raises it with
      its traceback.
    """
    _DEBUG["on"] = os.environ.get("QC_COMPILE_DEBUG", "") not in ("", "0")
    interrupted = {"on": False}

    def on_sigint(signum, frame):  # remembered, so an interrupt that a C extension turns into another error
        interrupted["on"] = True  # (e.g. ImportError from an interrupted module init) still exits as one
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        _run(argv, interrupted)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(argv: list[str] | None, interrupted: dict) -> None:
    try:
        cli.main(args=argv, prog_name="qc-compile", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted; nothing half-written is trusted by later stages (see README: Errors and safety).",
                   err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except OSError as e:
        if _DEBUG["on"]:
            raise
        click.echo(f"error: {describe_os_error(e)}", err=True)
        sys.exit(2)
    except MemoryError:
        if _DEBUG["on"]:
            raise
        click.echo("error: out of memory; reduce --steps, the video size, the batch or the number of prompts.",
                   err=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001  (the boundary: everything else is a bug)
        if interrupted["on"]:
            click.echo("interrupted; nothing half-written is trusted by later stages (see README: Errors and "
                       "safety).", err=True)
            sys.exit(130)
        if _DEBUG["on"]:
            raise
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError (a RuntimeError)
            click.echo(f"error: the GPU ran out of memory ({_one_line(e, 160)}); reduce the video size, the batch or "
                       "the number of prompts.", err=True)
            sys.exit(2)
        where = ""
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" (at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"
        click.echo(f"internal error: {type(e).__name__}: {_one_line(e)}{where}. This is a bug in qc-compile; "
                   "re-run with `qc-compile --debug ...` for the traceback and report it.", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
