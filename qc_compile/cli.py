"""The ``qc-compile`` console script.

Subcommands live in ``qc_compile/commands/<name>.py`` and are imported only when used, so ``--help`` stays fast
and a command's heavy dependencies (TensorRT, onnxruntime) never slow down the others.
"""

from __future__ import annotations

import importlib
import sys

import click

from qc_compile.errors import UserError

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


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qc-compile")
def cli() -> None:
    """qc-compile: export, calibrate, build and run video diffusion transformers fast.

    Pipeline: export -> calibrate -> build -> run / compare / bench. `generate` samples the FP model directly.
    """


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one paragraph on stderr and exit code 2, without a traceback."""
    try:
        cli.main(args=argv, prog_name="qc-compile", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
