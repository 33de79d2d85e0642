"""`qc-compile build WORK --target T`: passes per plan -> Q/DQ ONNX -> engines -> manifest.json."""

from __future__ import annotations

from pathlib import Path

import click

import qc_compile.validate as V


@click.command("build")
@click.argument("work_dir", metavar="WORK", type=click.Path(path_type=Path))
@click.option("--target", "target", required=True,
              help="trt (full TensorRT, sm80/sm90 servers; trt:smXX to declare the GPU) | rtx:sm86 | rtx:sm89 | "
                   "rtx:sm120 (TensorRT-RTX, built on the CPU) | torch (a package the torch executor loads).")
@click.option("--max-batch", type=V.BoundedInt(1, V.BATCH_MAX), default=2, show_default=True,
              help="Largest batch the engines accept (CFG batch = 2 x prompts).")
@click.option("--plugins", is_flag=True, help="Opt in to qc:: plugin nodes (fused rotate+quant+GEMM, cache stats); "
                                              "full TensorRT only.")
@click.option("--onnx-only", is_flag=True, help="Write the Q/DQ graphs and the manifest, build no engines (e.g. "
                                                "for a machine with full TensorRT).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(work_dir: Path, target: str, max_batch: int, plugins: bool, onnx_only: bool, quiet: bool) -> None:
    """Build WORK for one target."""
    from qc_compile.build import build_workdir
    from qc_compile.workdir import WorkDir

    res = build_workdir(WorkDir(work_dir), target, max_batch=max_batch, plugins=plugins, onnx_only=onnx_only,
                        progress=not quiet)
    if "package" in res.units:
        click.echo(f"wrote the torch package to {work_dir}/torch ({len(res.units['package']['files'])} files) and "
                   f"{work_dir}/manifest.json in {res.seconds:.1f} s")
        return
    graphs = res.graphs()
    engines = [v["engine"] for _, v in graphs if v.get("engine")]
    size = sum(e["bytes"] for e in engines)
    slow = max(((v["seconds"], u) for u, v in graphs), default=(0, ""))
    click.echo(f"built {target}: {len(graphs)} Q/DQ graph(s) in {work_dir}/onnx/q, {len(engines)} engine(s) "
               f"({size / 1e6:.1f} MB) in {work_dir}/engines, manifest.json; {res.seconds:.1f} s "
               f"(slowest unit {slow[1]} {slow[0]:.1f} s)")
