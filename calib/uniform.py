"""Uniform calibration: one format for every linear, activation ranges measured over a few prompts and all steps,
the per-step precision schedule and optional SRAP thresholds from the same sampling runs (the simplest plan;
``calib/aigq.py`` is the adaptive one). Writes ranges, plan and report into the work dir."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qc_compile.errors import UserError

if TYPE_CHECKING:
    from qc_compile.calib.runtime_params import RuntimeOptions

FORMAT_ALIASES = {"fp8": "fp8_e4m3", "int4": "int4_b128", "fp4": "nvfp4"}


@dataclass(frozen=True)
class UniformOptions:
    fmt: str
    percentile: float | None = None  # None: the max of |x|
    exclude: tuple[str, ...] = ()
    quantize_embed_final: bool = False  # False: the embed and final units' linears stay bf16 (calibrate's default)
    target: str = "any"
    act_scales: str = "static"  # static (per tensor, from the ranges) | dynamic (per token at run time)
    runtime: "RuntimeOptions | None" = field(default=None)  # the per-step schedule and SRAP options

    def checked(self) -> "UniformOptions":
        """The options with the format alias resolved; UserError for an unknown format or target."""
        from dataclasses import replace

        from qc_compile.plan import WEIGHT_FORMATS
        from qc_compile.trt_compat import parse_target

        fmt = FORMAT_ALIASES.get(self.fmt, self.fmt)
        if fmt not in WEIGHT_FORMATS:
            raise UserError(f"--uniform {self.fmt!r}: unknown format; known: {', '.join(WEIGHT_FORMATS)} "
                            "(alias fp8).")
        if self.percentile is not None and not (0.0 < self.percentile <= 100.0):
            raise UserError(f"--percentile must be in (0, 100], got {self.percentile}.")
        parse_target(self.target, allow_any=True)
        return replace(self, fmt=fmt)


@dataclass
class UniformResult:
    plan: object
    kept: list[str]
    ranges: dict
    report: Path
    simulated: bool


def calibrate_uniform(work, info, loaded, prompts: list[str], settings, opts: UniformOptions, *,
                      progress: bool = True) -> UniformResult:
    """Measure ranges (and the runtime signals) over ``prompts`` x all steps, write ``calib/ranges.*``,
    ``plan.json`` and the report; the plan is validated against the exported model before it is written."""
    import torch

    from qc_compile.calib import runtime_params
    from qc_compile.calib.ranges import RangeCollector
    from qc_compile.plan import WEIGHT_FORMATS, save_plan, validate

    opts = opts.checked()
    torch.set_grad_enabled(False)
    rc = RangeCollector(loaded.model, percentile=opts.percentile)
    _, signals = runtime_params.measure(loaded, prompts, settings, progress=progress, contexts=[rc])
    ranges = rc.reduce()
    plan, kept, calib = write_ranges_and_plan(work, info, rc, ranges, opts, {
        "prompts": prompts, "steps": settings.steps, "cfg": settings.cfg, "seed": settings.seed,
        "video": list(info.video_size)})
    calib["runtime"] = runtime_params.add_runtime_params(plan, signals,
                                                         opts.runtime or runtime_params.RuntimeOptions())
    lins = {li["name"]: li for li in info.linears()}
    validate(plan, linears=lins, model_name=info.name, config_sha256=info.config_sha256, where="calibrated plan")
    save_plan(plan, work.plan_json)
    report = write_report(work, plan, ranges, kept,
                          {"prompts": prompts, "steps": settings.steps, "cfg": settings.cfg, "seed": settings.seed,
                           "method": calib["method"], "percentile": opts.percentile, "format": opts.fmt},
                          {n: st.amax for n, st in rc.stats.items()})
    return UniformResult(plan, kept, ranges, report, WEIGHT_FORMATS[opts.fmt].simulated)


def write_ranges_and_plan(work, info, rc, ranges: dict, opts: UniformOptions, calib: dict):
    """``calib/ranges.*`` from the collector, then the uniform plan over them (format, exclusions, activation scales)
    with its provenance; shared by the STDiT3 and the diffusers calibrations. Returns (plan, kept, calib record)."""
    from safetensors.torch import save

    from qc_compile.artifacts import write_bytes_atomic, write_json_atomic
    from qc_compile.manifest import tool_versions
    from qc_compile.plan import uniform_plan

    work.calib_dir.mkdir(parents=True, exist_ok=True)
    ranges_sha = write_bytes_atomic(work.calib_dir / "ranges.safetensors", save(rc.tensors()))
    calib = {**calib, "method": "percentile" if opts.percentile is not None else "max",
             "percentile": opts.percentile, "ranges_sha256": ranges_sha}
    write_json_atomic(work.calib_dir / "ranges.json", {"schema_version": 1, "calibration": calib, "ranges": ranges})
    provenance = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": f"qc-compile calibrate --uniform {opts.fmt}", "tool_versions": tool_versions(),
                  "calibration": calib}
    plan, kept = uniform_plan(info, opts.fmt, ranges, target=opts.target, exclude=list(opts.exclude),
                              blocks_only=not opts.quantize_embed_final, provenance=provenance)
    if opts.act_scales == "dynamic":
        for e in plan.linears.values():
            if e.activation in ("fp8_e4m3", "int8"):
                e.act_scale = "dynamic"
    calib["act_scales"] = opts.act_scales
    calib["quantize_embed_final"] = opts.quantize_embed_final
    return plan, kept, calib


def write_report(work, plan, ranges: dict, kept: list[str], settings: dict, per_call: dict) -> Path:
    """``report/calibration.md``: the ranges per linear and the per-step heatmap."""
    from qc_compile.artifacts import atomic_write

    lines = [f"# Calibration report: {plan.model['name']}", "",
             f"- prompts: {len(settings['prompts'])}, steps: {settings['steps']}, cfg {settings['cfg']}, "
             f"seed {settings['seed']}, method: {settings['method']}"
             + (f" (p{settings['percentile']})" if settings["percentile"] is not None else ""),
             f"- uniform format: `{settings['format']}`; kept at bf16: {len(kept)}", "",
             "| linear | unit | W | A | range used | max |", "|---|---|---|---|---|---|"]
    for name, e in plan.linears.items():
        r = ranges[name]
        lines.append(f"| `{name}` | {e.unit} | {e.weight} | {e.activation} | {r['amax']:.4g} | {r['max']:.4g} |")
    png = write_heatmap(work, plan, per_call)
    lines += ["", f"![per-step input ranges]({png.name})"]
    path = work.report_dir / "calibration.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_heatmap(work, plan, per_call: dict) -> Path:
    """log10 of each linear's input |x| max per denoising step (linears x steps)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from qc_compile.artifacts import write_bytes_atomic

    names = list(plan.linears)
    data = np.log10(np.maximum(np.array([per_call[n] for n in names], dtype=np.float64), 1e-6))
    fig, ax = plt.subplots(figsize=(min(4 + data.shape[1] * 0.25, 16), 2 + len(names) * 0.12))
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.set_xlabel("denoising step")
    ax.set_title(f"{plan.model['name']}: log10 max|x| at each linear's input")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = work.report_dir / "calibration_ranges.png"
    write_bytes_atomic(path, buf.getvalue())
    return path
