"""Issue 4 must-show experiments: AIGQ vs uniform at equal weight bits, activation-schedule readings, TAP vs uniform
samples and VC on/off under quantization + caching (qc-ref), and an Open-Sora 1.2 calibration (random weights,
synthetic captions, 240p/51 frames) for peak memory and wall time.

    python tools/eval_calibration.py --device cuda --out DIR [--skip-opensora] [--seeds 0 1 2]

Writes DIR/calib_qc_ref.json + .md (and DIR/calib_opensora.json). Every number records the device and commit
(QC_COMMIT env). Evaluation: held-out captions ``sample_captions(8, seed=20261122)``, 30 steps, the shipped
checkpoint; PSNR/SSIM against the FP video of the same caption and noise seed; caption-checker accuracy.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def _device_name(dev: str) -> str:
    return torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"


def variant_models(loaded, plan):
    from qc_compile.torch_package import apply_plan, package_tensors

    tensors = package_tensors(loaded.model, plan)
    dev = str(loaded.model.x_embedder.proj.weight.device)
    models = {v: apply_plan(copy.deepcopy(loaded), plan, tensors, variant=v, device=dev).model
              for v in plan.variant_names}
    models.setdefault("fp", loaded.model)
    return models


def evaluate(loaded, plan, captions, seeds, fp_cache, policy_spec=None, steps=30):
    """Mean PSNR/SSIM vs FP and checker accuracy over captions x seeds."""
    from qc_compile.metrics.caption_checker import score_videos
    from qc_compile.metrics.fidelity import compare_videos
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.generation import GenerationSettings, generate
    from qc_compile.runtime.policies import get_policy

    models = variant_models(loaded, plan) if plan is not None else None
    psnr, ssim, ok, cf, n = [], [], 0, [], 0
    for seed in seeds:
        s = GenerationSettings.defaults(loaded, seed=seed, steps=steps)
        g = Geometry.for_model(loaded.config, s.frames, s.height, s.width)
        if seed not in fp_cache:
            fp_cache[seed] = generate(loaded, captions, s, progress=False)[0]
        ex = torch_executor(models["default"], g, variant_models=models) if models else torch_executor(loaded.model, g)
        pol = get_policy(policy_spec, None, plan, seed=seed) if policy_spec else None
        v, rec = generate(loaded, captions, s, executor=ex, policy=pol, progress=False)
        for a, b in zip(v, fp_cache[seed]):
            c = compare_videos(a, b)
            psnr.append(c["psnr_db"])
            ssim.append(c["ssim"])
        sc = score_videos(list(v), captions)
        ok += sum(r.all_ok for r in sc["results"])
        n += len(captions)
        if pol is not None:
            cf.append(rec.compute_fraction(ex.unit_names))
    out = {"psnr_db": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim), "psnr_db_min": min(psnr),
           "checker_all": ok / n, "videos": n}
    if cf:
        out["compute_fraction"] = sum(cf) / len(cf)
    return out


def fp_checker(fp_cache, captions):
    from qc_compile.metrics.caption_checker import score_videos

    ok = n = 0
    for v in fp_cache.values():
        sc = score_videos(list(v), captions)
        ok += sum(r.all_ok for r in sc["results"])
        n += len(captions)
    return ok / n


def qc_ref(args, out: dict, save) -> None:
    from qc_compile.calib import act_schedule, aigq
    from qc_compile.calib.allocate import average_bits
    from qc_compile.calib.collect import CollectSettings, text_captions
    from qc_compile.calib.ranges import default_prompts
    from qc_compile.data.shapes import sample_captions
    from qc_compile.linears import model_linears
    from qc_compile.models import load_model
    from qc_compile.runtime.generation import GenerationSettings

    dev = args.device
    loaded = load_model("qc-ref", device=dev)
    lins = model_linears(loaded.model)
    params = {li.name: li.in_features * li.out_features for li in lins}
    prompts = default_prompts("qc-ref", args.calib_prompts)
    caps = text_captions(loaded, prompts)
    gs = GenerationSettings.defaults(loaded, seed=0, steps=args.steps)
    st = CollectSettings(steps=gs.steps, cfg=gs.cfg, seed=0, frames=gs.frames, height=gs.height, width=gs.width,
                         fps=gs.fps, shift=gs.shift)
    work = Path(tempfile.mkdtemp())
    meta = {"name": "qc-ref", "config_sha256": "0" * 64, "weights_sha256": None}
    prov = {"created": "eval", "command": "tools/eval_calibration.py", "tool_versions": {}}
    evalcaps = [c.text() for c in sample_captions(args.eval_captions, 20261122)]
    seeds = args.seeds
    fp = {}

    def calib(**kw):
        t0 = time.perf_counter()
        r = aigq.run(loaded, lins, meta, work, caps, st, aigq.Options(**kw), weights_id="shipped",
                     provenance=prov, progress=False)
        r.timings["total_s"] = time.perf_counter() - t0
        return r

    out["qc_ref"] = {"calib_prompts": prompts, "eval_captions": evalcaps, "seeds": seeds, "steps": gs.steps,
                     "sections": {}}
    sec = out["qc_ref"]["sections"]
    def guarded(name, fn):
        import traceback

        try:
            fn()
        except Exception:
            sec[f"{name}_error"] = traceback.format_exc()[-3000:]
        save()

    if "weights" in args.sections:
        guarded("weights", lambda: _weights(loaded, calib, params, evalcaps, seeds, fp, out, sec, save, args))
    if "act" in args.sections:
        guarded("act_schedule", lambda: _act(loaded, calib, evalcaps, seeds, fp, sec, save, args))
    if "tapvc" in args.sections:
        guarded("tap_vc", lambda: _tapvc(loaded, calib, evalcaps, seeds, fp, out, sec, save, args))


def _weights(loaded, calib, params, evalcaps, seeds, fp, out, sec, save, args):
    from qc_compile.calib.allocate import average_bits

    # ---- 1. weights: AIGQ vs uniform at equal average bits (activations bf16 in every plan: weights isolated)
    rows = []
    for ufmt in ("int6_sim", "int4_b128"):
        u = calib(method="uniform", uniform_format=ufmt, sampling="uniform")
        ub = average_bits({n: e.weight for n, e in u.plan.linears.items()}, params)
        rows.append({"plan": f"uniform {ufmt}", "avg_bits": ub, **evaluate(loaded, u.plan, evalcaps, seeds, fp, steps=args.steps)})
        save()
        for sim in (True, False):
            a = calib(method="aigq", budget=ub, act_format="bf16", smoothing=False, simulated=sim,
                      calib_samples=32, replay_samples=args.replay_samples)
            rows.append({"plan": f"aigq budget {ub:.3f}" + (" (menu incl. int6_sim)" if sim else " (hardware menu)"),
                         "avg_bits": a.alloc.avg_bits,
                         "formats": {f: sum(1 for e in a.plan.linears.values() if e.weight == f)
                                     for f in sorted({e.weight for e in a.plan.linears.values()})},
                         "calib_seconds": a.timings, **evaluate(loaded, a.plan, evalcaps, seeds, fp, steps=args.steps)})
            if ufmt == "int6_sim" and sim:
                out["qc_ref"]["sensitivity"] = a.sens.to_dict()
                out["qc_ref"]["allocation_6bit"] = a.alloc.formats
            save()
    sec["weights"] = rows
    sec["fp_checker_all"] = fp_checker(fp, evalcaps)
    save()


def _act(loaded, calib, evalcaps, seeds, fp, sec, save, args):
    from qc_compile.calib import act_schedule

    # ---- 2. activation schedule: distance reading vs opposite, same number of high steps
    base = calib(method="aigq", budget=6, act_format="int6_sim", smoothing=True, calib_samples=32,
                 replay_samples=args.replay_samples, act_high_fraction=0.3)
    rows = []
    bits = {"high": 16, "default": 6}
    for reading in ("distance", "opposite"):
        p = copy.deepcopy(base.plan)
        p.schedule = act_schedule.schedule_from(base.redundancy, 0.3, reading)
        rows.append({"reading": reading, "schedule": p.schedule,
                     "avg_act_bits": act_schedule.average_act_bits(p.schedule, bits),
                     **evaluate(loaded, p, evalcaps, seeds, fp, policy_spec="schedule", steps=args.steps)})
        save()
    p = copy.deepcopy(base.plan)
    p.schedule = ["default"] * len(p.schedule)
    rows.append({"reading": "none (all steps int6_sim activations)", "avg_act_bits": 6.0,
                 **evaluate(loaded, p, evalcaps, seeds, fp, steps=args.steps)})
    sec["act_schedule"] = {"redundancy": [None if x != x else x for x in base.redundancy], "rows": rows,
                           "smoothing": {"alpha": base.balance.alpha, "rotation": base.balance.rotation}
                           if base.balance else None,
                           "note": "weights: AIGQ budget 6 (menu incl. int6_sim); default activations int6_sim "
                                   "(simulated), high = bf16 activations; 30% of steps high"}
    save()


def _tapvc(loaded, calib, evalcaps, seeds, fp, out, sec, save, args):
    # ---- 3. TAP vs uniform samples, VC on/off, under quantization + caching (hlc+aigq)
    rows = []
    spec = "hlc+aigq"
    for sampling in ("tap", "uniform"):
        r = calib(method="aigq", budget=6, act_format="int6_sim", smoothing=True, sampling=sampling,
                  calib_samples=args.tap_samples, replay_samples=args.replay_samples, vc=True, vc_policy=spec,
                  vc_prompts=args.calib_prompts, predictor=(sampling == "tap"))
        if r.pred is not None:
            out["qc_ref"]["predictor"] = {"a": r.pred.a, "b": r.pred.b, "threshold": r.pred.threshold,
                                          "r": r.pred.r, "units": r.pred.units,
                                          "pairs": {u: p for u, p in r.pred.pairs.items()}}
        novc = copy.deepcopy(r.plan)
        novc.vc = None
        rows.append({"sampling": sampling, "vc": False, "samples": [list(s) for s in r.selected],
                     **evaluate(loaded, novc, evalcaps, seeds, fp, policy_spec=spec, steps=args.steps)})
        save()
        rows.append({"sampling": sampling, "vc": True, "vc_k_range": [float(r.plan.tensors["vc.K"].min()),
                                                                      float(r.plan.tensors["vc.K"].max())],
                     **evaluate(loaded, r.plan, evalcaps, seeds, fp, policy_spec=spec + "+vc", steps=args.steps)})
        save()
    rows.append({"sampling": "-", "vc": False, "plan": "FP model under hlc+aigq (caching only)",
                 **evaluate(loaded, None, evalcaps, seeds, fp, policy_spec="hlc", steps=args.steps)})
    sec["tap_vc"] = {"policy": spec, "calib_samples": args.tap_samples, "rows": rows}
    save()


def opensora(args, out: dict, save) -> None:
    from qc_compile.calib import aigq
    from qc_compile.calib.collect import CollectSettings, random_captions
    from qc_compile.linears import model_linears
    from qc_compile.models import load_model

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = load_model("opensora-v1.2", device=args.device, dtype=torch.bfloat16, random_weights=True)
    t_load = time.perf_counter() - t0
    caps = random_captions(loaded, args.os_prompts, seed=0)
    st = CollectSettings(steps=args.os_steps, cfg=7.0, seed=0, frames=51, height=240, width=426, fps=24, shift=None,
                         batch_size=args.os_prompts)
    meta = {"name": "opensora-v1.2", "config_sha256": "0" * 64, "weights_sha256": None}
    t0 = time.perf_counter()
    r = aigq.run(loaded, model_linears(loaded.model), meta, Path(tempfile.mkdtemp()), caps, st,
                 aigq.Options(method="aigq", budget=6, act_format="fp8_e4m3", smoothing=False, predictor=True,
                              calib_samples=4, replay_samples=1),
                 weights_id="random", provenance={"created": "eval", "command": "x", "tool_versions": {}},
                 progress=False)
    wall = time.perf_counter() - t0
    out["opensora"] = {"model": "opensora-v1.2 (random weights, bf16)", "video": [51, 240, 426],
                       "prompts": args.os_prompts, "steps": args.os_steps, "caption_features": "random N(0,1)",
                       "stages": "statistics + TAP + sensitivity (1 replay sample) + allocation (budget 6) + schedule "
                                 "+ predictor; smoothing and VC off",
                       "load_s": t_load, "calibration_wall_s": wall, "timings_s": r.timings,
                       "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                       "avg_bits": r.alloc.avg_bits, "linears": len(r.plan.linears)}
    save()


def render_md(res: dict) -> str:
    q = res.get("qc_ref", {})
    L = [f"# Calibration must-show results (commit {res['commit']}, device {res['device']})", ""]
    sec = q.get("sections", {})
    if "weights" in sec:
        L += [f"Held-out captions: {len(q['eval_captions'])} (seed 20261122) x noise seeds {q['seeds']}, "
              f"{q['steps']} steps; FP checker accuracy {sec.get('fp_checker_all', float('nan')):.3f}.", "",
              "## Weights: AIGQ vs uniform at equal average bits (activations bf16)", "",
              "| plan | avg bits | PSNR dB | min PSNR | SSIM | checker |", "|---|---|---|---|---|---|"]
        for r in sec["weights"]:
            L.append(f"| {r['plan']} | {r['avg_bits']:.3f} | {r['psnr_db']:.2f} | {r['psnr_db_min']:.2f} | "
                     f"{r['ssim']:.4f} | {r['checker_all']:.3f} |")
    if "act_schedule" in sec:
        L += ["", "## Activation schedule readings (same number of high steps)", "", sec["act_schedule"]["note"], "",
              "| reading | avg act bits | PSNR dB | SSIM | checker | schedule |", "|---|---|---|---|---|---|"]
        for r in sec["act_schedule"]["rows"]:
            sch = "".join("H" if v == "high" else "." for v in r.get("schedule", []))
            L.append(f"| {r['reading']} | {r['avg_act_bits']:.2f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | "
                     f"{r['checker_all']:.3f} | `{sch}` |")
    if "tap_vc" in sec:
        L += ["", f"## TAP vs uniform samples, VC on/off, under quantization + {sec['tap_vc']['policy']}", "",
              "| sampling | VC | PSNR dB | SSIM | checker | compute fraction |", "|---|---|---|---|---|---|"]
        for r in sec["tap_vc"]["rows"]:
            L.append(f"| {r['sampling']} | {r['vc']} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['checker_all']:.3f} "
                     f"| {r.get('compute_fraction', 1.0):.3f} |")
    if "opensora" in res:
        o = res["opensora"]
        L += ["", "## Open-Sora 1.2 calibration (random weights)", "",
              f"{o['video']} frames/height/width, {o['prompts']} prompt(s) x {o['steps']} steps, {o['stages']}: "
              f"wall {o['calibration_wall_s']:.1f} s, peak GPU memory {o['peak_gpu_mem_gib']:.2f} GiB "
              f"(stages: {o['timings_s']})."]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-captions", type=int, default=8)
    ap.add_argument("--calib-prompts", type=int, default=8)
    ap.add_argument("--replay-samples", type=int, default=4)
    ap.add_argument("--tap-samples", type=int, default=12)
    ap.add_argument("--os-prompts", type=int, default=2)
    ap.add_argument("--os-steps", type=int, default=4)
    ap.add_argument("--skip-opensora", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sections", nargs="+", default=["weights", "act", "tapvc"])
    ap.add_argument("--skip-qc-ref", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"commit": os.environ.get("QC_COMMIT", "unknown"), "device": _device_name(args.device),
           "torch": torch.__version__, "args": vars(args)}

    def save():
        (out_dir / "calib_qc_ref.json").write_text(json.dumps(res, indent=1, default=float))
        (out_dir / "calib_qc_ref.md").write_text(render_md(res))

    t0 = time.perf_counter()
    if not args.skip_opensora:
        try:
            opensora(args, res, save)
        except Exception as e:  # recorded, so the qc-ref part still runs
            res["opensora_error"] = repr(e)
        save()
        torch.cuda.empty_cache()
    if not args.skip_qc_ref:
        qc_ref(args, res, save)
    res["total_s"] = time.perf_counter() - t0
    save()


if __name__ == "__main__":
    main()
