"""`qc-compile compare WORK`: polygraphy accuracy report per unit and end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import click

import qc_compile.validate as V


@click.command("compare")
@click.argument("work_dir", metavar="WORK", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="Which build to compare (default: the first Q/DQ build in the manifest).")
@click.option("--atol", type=V.FiniteFloat(0.0, 1e6), default=1e-4, show_default=True, help="torch FP vs ONNX FP: absolute tolerance.")
@click.option("--rtol", type=V.FiniteFloat(0.0, 1e6), default=1e-3, show_default=True, help="torch FP vs ONNX FP: relative tolerance.")
@click.option("--min-unit-snr", type=V.FiniteFloat(-1e3, 1e3), default=15.0, show_default=True,
              help="FP vs Q/DQ graph, per unit: lowest acceptable SNR in dB.")
@click.option("--min-psnr", type=V.FiniteFloat(-1e3, 1e3), default=20.0, show_default=True,
              help="End to end: lowest acceptable PSNR (dB) of the Q/DQ video against the FP video.")
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt(s) (default: 2 qc-ref captions).")
@click.option("--steps", type=V.STEPS, default=None, help="Sampling steps (model default).")
@click.option("--seed", type=V.SEED, default=0, show_default=True)
@click.option("--unit", "units", multiple=True, help="Compare only these units (repeatable).")
@click.option("--no-e2e", is_flag=True, help="Skip the end-to-end videos.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Report path (default WORK/report/compare.json).")
def compare(work_dir: Path, target: str | None, atol: float, rtol: float, min_unit_snr: float, min_psnr: float,
            prompts: tuple[str, ...], steps: int | None, seed: int, units: tuple[str, ...], no_e2e: bool,
            json_out: Path | None) -> None:
    """Compare torch FP, ONNX FP and the Q/DQ graphs (and engines, where runnable) of WORK."""
    from qc_compile.artifacts import write_json_atomic
    from qc_compile.compare import CompareOptions, compare_workdir, format_table
    from qc_compile.errors import UserError
    from qc_compile.workdir import WorkDir, read_model_info

    work = WorkDir(work_dir)
    info = read_model_info(work)
    for u in units:
        if u not in info.unit_names:
            raise UserError(f"--unit {u}: no such unit; units are {', '.join(info.unit_names)}.")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}.")
    report = compare_workdir(work, CompareOptions(atol=atol, rtol=rtol, min_unit_snr=min_unit_snr,
                                                  min_psnr=min_psnr, steps=steps, seed=seed, prompts=list(prompts),
                                                  target=target, e2e=not no_e2e, units=list(units) or None))
    path = json_out or work.report_dir / "compare.json"
    write_json_atomic(path, report)
    click.echo(format_table(report))
    click.echo(f"report: {path}")
    if not report["passed"]:
        sys.exit(1)  # SystemExit passes through click (a click Exit would be swallowed with standalone_mode=False)
