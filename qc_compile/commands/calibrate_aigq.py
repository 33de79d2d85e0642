"""`qc-compile calibrate WORK --method aigq`: the adaptive calibration (qc_compile.calib.aigq) on a work dir."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

import click

from qc_compile.errors import UserError


def run_aigq(work_dir: Path, *, budget: str, act_format: str, act_high_fraction: float, srap: bool, srap_budget_db: float,
             srap_min_saving: float, srap_max_error: float, sampling: str, hlc: bool = True,
             calib_samples: int, replay_samples: int, smoothing: bool, vc: bool, vc_policy: str, predictor: bool,
             num_prompts: int | None, fresh: bool, prompts_file: Path | None, steps: int | None, cfg: float | None,
             seed: int, target: str, quiet: bool, text_encoder: Path | None = None,
             caption_cache: Path | None = None, device: str = "cpu") -> None:
    import torch

    from qc_compile.calib import aigq, allocate, report
    from qc_compile.calib.collect import CollectSettings, text_captions
    from qc_compile.calib.inputs import load_for_calibration
    from qc_compile.manifest import tool_versions
    from qc_compile.linears import model_linears
    from qc_compile.plan import save_plan, validate
    from qc_compile.runtime.policies import expand

    allocate.menu_for(target)  # unknown target -> UserError before any work
    if not 0.0 <= act_high_fraction <= 1.0:
        raise UserError(f"--act-high-fraction must be in [0, 1], got {act_high_fraction}.")
    if calib_samples < 1 or replay_samples < 1:
        raise UserError("--calib-samples and --replay-samples must be at least 1.")
    if num_prompts is not None and num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1, got {num_prompts}.")
    expand(vc_policy)
    allocate.parse_budget(budget, 1)  # syntax check; the range is checked against the model's menu below
    start = time.perf_counter()
    work, info, loaded, prompts, gs = load_for_calibration(
        work_dir, prompts_file, num_prompts or 8, steps=steps, cfg=cfg, seed=seed,
        hint="see tools/eval_calibration.py for a run on synthetic caption features (speed and memory only).",
        text_encoder=text_encoder, caption_cache=caption_cache, device=device)
    frames, height, width = info.video_size
    settings = CollectSettings(steps=gs.steps, cfg=gs.cfg, seed=gs.seed, frames=frames, height=height, width=width,
                               fps=gs.fps, shift=gs.shift)
    torch.set_grad_enabled(False)
    opts = aigq.Options(budget=budget, target=target, act_format=act_format, act_high_fraction=act_high_fraction,
                        sampling=sampling, calib_samples=calib_samples, replay_samples=replay_samples,
                        smoothing=smoothing, vc=vc, vc_policy=vc_policy, predictor=predictor, seed=seed,
                        srap=srap, srap_budget_db=srap_budget_db, srap_min_saving=srap_min_saving,
                        srap_max_error=srap_max_error, hlc=hlc)
    cmd = f"qc-compile calibrate --method aigq --budget {budget} --target {target} --sampling {sampling}" + \
        (" --vc" if vc else "") + (" --predictor" if predictor else "")
    calib = {"prompts": prompts, "steps": gs.steps, "cfg": gs.cfg, "seed": gs.seed, "video": [frames, height, width],
             "method": "aigq", "options": {k: (str(v) if k == "budget" else v) for k, v in opts.__dict__.items()}}
    provenance = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": cmd,
                  "tool_versions": tool_versions(), "calibration": calib}
    meta = {"name": info.name, "config_sha256": info.config_sha256,
            "weights_sha256": info.data["weights"].get("state_sha256")}
    res = aigq.run(loaded, model_linears(loaded.model), meta, work.calib_dir, text_captions(loaded, prompts),
                   settings, opts, weights_id=str(meta["weights_sha256"]), provenance=provenance, fresh=fresh,
                   progress=not quiet)
    calib["selection"] = res.selection
    calib["samples"] = [list(s) for s in res.selected]
    calib["sensitivity"] = res.sens.to_dict() if res.sens else None
    calib["allocation"] = {k: v for k, v in res.alloc.to_dict().items() if k != "rel_weight_error"} \
        if res.alloc else None
    calib["redundancy"] = [None if x != x else x for x in res.redundancy]
    calib["timings_s"] = {k: round(v, 2) for k, v in res.timings.items()}
    if res.pred is not None:
        calib["predictor"] = {"r": res.pred.r, "pairs": sum(len(p) for p in res.pred.pairs.values())}
    if res.runtime:
        calib["runtime"] = res.runtime
    if res.vc_info is not None:
        calib["vc"] = res.vc_info
    lins = {li["name"]: li for li in info.linears()}
    validate(res.plan, linears=lins, model_name=info.name, config_sha256=info.config_sha256,
             where="calibrated plan")
    save_plan(res.plan, work.plan_json)
    rep = report.write(work.report_dir, res, info.name)
    a = res.alloc
    click.echo(f"calibrated {len(res.plan.linears)} linears over {len(prompts)} prompt(s) x {gs.steps} steps "
               f"({res.selection['method']} samples: {len(res.selected)}); weights {a.avg_bits:.2f} average bits "
               f"(budget {a.budget_bits:.2f}); schedule {' '.join(res.plan.schedule) or '-'}; wrote "
               f"{work.plan_json}; report {rep}; {time.perf_counter() - start:.1f} s")
    from qc_compile.calib.hlc_thresholds import summary_line as hlc_summary
    from qc_compile.calib.srap import summary_line

    for line in (summary_line((res.runtime or {}).get("srap")), hlc_summary((res.runtime or {}).get("hlc"))):
        if line:
            click.echo(line)
