"""Accuracy of the compiled graphs with polygraphy (per unit) and end to end (PSNR of the final video).

Per unit, on inputs captured from a real FP sampling run (a few steps: first, middle, last), polygraphy's
``Comparator`` runs:

* ``torch-fp``  — :func:`make_torch_runner`, our polygraphy ``BaseRunner`` around ``model.unit_module``;
* ``onnxrt-fp`` — ``OnnxrtRunner(SessionFromOnnx(WORK/onnx/fp/<unit>.onnx))``;
* ``onnxrt-q``  — ``OnnxrtRunner(SessionFromOnnx(<q graph>))`` on the build's Q/DQ graph (its onnxruntime twin,
  written by the build, when it holds TensorRT-only NVFP4 ops);
* ``trt``       — polygraphy's ``TrtRunner`` on the built engine, only when the target's TensorRT imports *and* can
  run on a GPU here; otherwise the report says ``not run: <reason>``.

``torch-fp`` vs ``onnxrt-fp`` is checked with ``CompareFunc.simple(atol, rtol)`` (the export is exact up to fp32
rounding); ``onnxrt-fp`` vs ``onnxrt-q`` (and vs ``trt``) is a quantization error, reported as SNR in dB and
relative L2, and checked against ``min_unit_snr``. End to end: the FP video (torch executor) against the video of
the Q/DQ graphs (the onnxruntime runner under the step executor), same seed and prompts: PSNR/SSIM, checked
against ``min_psnr``; the FP ONNX graphs are run end to end as well (a sanity line, expected ~100 dB).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from qc_compile.models.stdit3 import UNIT_INPUTS, UNIT_OUTPUTS, unit_kind


def select_polygraphy_trt(target) -> None:
    """Make polygraphy use ``target``'s TensorRT flavour (``tensorrt`` or ``tensorrt_rtx``).

    polygraphy reads ``POLYGRAPHY_USE_TENSORRT_RTX`` once, when ``polygraphy.config`` is first imported, and binds its
    TensorRT module when ``polygraphy.backend.trt`` is first imported. So this runs before :func:`compare_workdir`
    imports anything of polygraphy; if polygraphy was imported earlier in the process, its config is switched too,
    and a process whose ``polygraphy.backend.trt`` already bound the other flavour is refused."""
    import os
    import sys

    from qc_compile.errors import UserError
    from qc_compile.trt_compat import polygraphy_env

    env = polygraphy_env(target)
    want = env["POLYGRAPHY_USE_TENSORRT_RTX"] != "0"
    os.environ.update(env)
    cfg = sys.modules.get("polygraphy.config")
    if cfg is None or bool(cfg.USE_TENSORRT_RTX) == want:
        return
    if "polygraphy.backend.trt" in sys.modules:
        have = "tensorrt_rtx" if cfg.USE_TENSORRT_RTX else "tensorrt"
        raise UserError(f"compare --target {target.name}: polygraphy's TensorRT backend is already bound to {have} "
                        "in this process; run the comparison in a new process (e.g. the qc-compile CLI).")
    cfg.USE_TENSORRT_RTX = want


def _quiet_polygraphy():
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR


def _unit_runner(io: dict, name: str, run):
    """A polygraphy ``BaseRunner`` for one unit: its input metadata from ``io`` (the unit's model.json entry, by ONNX
    tensor name); ``run(feed_dict)`` returns the outputs by ONNX name, timed as the runner's ``inference_time``."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchUnitRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="torch-runner")

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for r in io["inputs"]:
                meta.add(r["onnx_name"], np.dtype(r["dtype"]), [-1 if isinstance(d, str) else d for d in r["shape"]])
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            out = run(feed_dict)
            self.inference_time = time.perf_counter() - start
            return out

    return TorchUnitRunner()


def make_torch_runner(module: torch.nn.Module, io: dict, name: str):
    """polygraphy runner for one unit of the torch model (feeds/returns the ONNX tensor names)."""

    def filler(n, by_name):
        if n == "mask":
            b = next(iter(by_name.values())).shape[0]
            return torch.ones(b, 1, dtype=torch.bool)
        raise KeyError(n)

    def run(feed_dict):
        by_name = {r["name"]: torch.from_numpy(np.asarray(feed_dict[r["onnx_name"]]))
                   for r in io["inputs"] if r["onnx_name"] in feed_dict}
        # inputs the graph dropped (embed's unused mask) still go to torch
        args = [by_name[n] if n in by_name else filler(n, by_name) for n in UNIT_INPUTS[module.kind]]
        with torch.no_grad():
            out = module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return OrderedDict((r["onnx_name"], np.ascontiguousarray(o.float().numpy()))
                           for r, o in zip(io["outputs"], out))

    return _unit_runner(io, name, run)


def capture_unit_inputs(loaded, info, prompts: list[str], steps: int, seed: int, pick: list[int]) -> dict:
    """Unit inputs (ONNX names -> numpy) at the steps in ``pick``, from an FP sampling run; also returns the video."""
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.generation import GenerationSettings, generate

    frames, height, width = info.video_size
    settings = GenerationSettings.defaults(loaded, steps=steps, seed=seed, frames=frames, height=height, width=width)
    g = info.geometry()
    ex = torch_executor(loaded.model, g)
    captured: dict[str, list[dict]] = {u: [] for u in info.unit_names}
    io = {u["name"]: u for u in info.units}
    state = {"step": -1}
    orig = loaded.model.run_unit

    def run_unit(name, inputs, geom):
        if name == "embed":
            state["step"] += 1
        if state["step"] in pick:
            names = {r["name"]: r for r in io[name]["inputs"]}
            captured[name].append({names[k]["onnx_name"]: v.detach().cpu().numpy().astype(
                np.bool_ if names[k]["dtype"] == "bool" else np.float32) for k, v in inputs.items() if k in names})
        return orig(name, inputs, geom)

    loaded.model.run_unit = run_unit
    try:
        video, _ = generate(loaded, prompts, settings, executor=ex, progress=False)
    finally:
        del loaded.model.run_unit
    return captured, video, settings


def make_adapter_runner(adapter, unit: str, g, io: dict, name: str):
    """polygraphy runner for one unit of a diffusers adapter (:mod:`qc_compile.models.diffusers_adapter`): feeds the
    unit's inputs by their model.json names, returns its outputs by ONNX name."""

    def run(feed_dict):
        inputs = {r["name"]: torch.from_numpy(np.asarray(feed_dict[r["onnx_name"]])) for r in io["inputs"]}
        with torch.no_grad():
            out = adapter.run_unit(unit, inputs, g)
        return OrderedDict((r["onnx_name"], np.ascontiguousarray(out[r["name"]].float().numpy()))
                           for r in io["outputs"])

    return _unit_runner(io, name, run)


def capture_diffusers_unit_inputs(loaded, info, prompts: list[str], steps: int, seed: int, pick: list[int]):
    """Unit inputs (ONNX names -> numpy) of the ``pick``-th model calls (CFG branches count separately) of the
    sampler's FP run through the torch executor of ``qc_compile.enable``; also returns that run's video."""
    import qc_compile

    captured: dict[str, list[dict]] = {u: [] for u in info.unit_names}
    io = {u["name"]: u for u in info.units}
    state = {"call": -1}
    session = qc_compile.enable(loaded.transformer, policy="none")
    orig = session.adapter.run_unit

    def run_unit(name, inputs, geom):
        if name == "embed":
            state["call"] += 1
        if state["call"] in pick:
            names = {r["name"]: r for r in io[name]["inputs"]}
            captured[name].append({names[k]["onnx_name"]: v.detach().cpu().float().numpy()
                                   for k, v in inputs.items() if k in names and v is not None})
        return orig(name, inputs, geom)

    session.adapter.run_unit = run_unit
    try:
        video = loaded.sample(prompts, seed=seed, steps=steps)
    finally:
        qc_compile.disable(loaded.transformer)
        session.adapter.__dict__.pop("run_unit", None)
    return captured, video


def _simple_compare(atol: float, rtol: float):
    """polygraphy's elementwise compare function (SimpleCompareFunc from 0.49.x, CompareFunc.simple before)."""
    try:
        from polygraphy.comparator import SimpleCompareFunc

        return SimpleCompareFunc(atol=atol, rtol=rtol)
    except ImportError:  # pragma: no cover - older polygraphy
        from polygraphy.comparator import CompareFunc

        return CompareFunc.simple(atol=atol, rtol=rtol)


def _snr(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    err = float(np.linalg.norm((out - ref).astype(np.float64)))
    nrm = float(np.linalg.norm(ref.astype(np.float64)))
    if err == 0:
        return math.inf, 0.0
    return 20 * math.log10(max(nrm, 1e-30) / err), err / max(nrm, 1e-30)


@dataclass
class CompareOptions:
    atol: float = 1e-4
    rtol: float = 1e-3
    min_unit_snr: float = 15.0
    min_psnr: float = 20.0
    steps: int | None = None
    seed: int = 0
    prompts: list[str] = field(default_factory=list)
    target: str | None = None
    e2e: bool = True
    units: list[str] | None = None


def compare_workdir(work, opts: CompareOptions, log=print) -> dict:
    """Run every comparison; returns the report dict (``report["passed"]`` overall)."""
    from qc_compile.errors import UserError
    from qc_compile.manifest import Manifest
    from qc_compile.metrics.fidelity import compare_videos
    from qc_compile.onnx_utils import load_onnx, ort_opt_level
    from qc_compile.runtime.runners.onnxruntime import OrtRunner
    from qc_compile.runtime.step_executor import StepExecutor
    from qc_compile.trt_compat import parse_target, runnable_reason
    from qc_compile.workdir import load_model_for, read_model_info

    start = time.perf_counter()
    info = read_model_info(work)
    trec = Manifest.load(work, opts.target, info=info).target(opts.target, need="graphs")
    tname, sources = trec.name, trec.sources()
    target = parse_target(tname)
    select_polygraphy_trt(target)  # before polygraphy's first import: it reads the flavour once
    _quiet_polygraphy()
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    trt_reason = "no engines in this build (--onnx-only)" if not trec.engines else runnable_reason(target)
    loaded = load_model_for(info)
    if info.is_diffusers and not hasattr(loaded, "sample"):
        raise UserError(f"compare feeds the FP model real prompts through its sampler; the {info.name} work dir "
                        f"{work.root} comes from a transformer-only folder, with no text encoder or sampler here. "
                        "Compare a qc-ref-wan work dir, or check the unit graphs of this one with "
                        "qc_compile.enable(transformer, work=WORK, executor='onnxruntime') against the torch run.")
    if getattr(loaded, "text_encoder", None) is None:
        raise UserError(f"compare feeds the FP model real prompts; model {info.name} has no text encoder here.")
    prompts = opts.prompts or _default_prompts(info.name)
    steps = opts.steps or (loaded.defaults.steps if info.is_diffusers else loaded.config.default_steps)
    torch.set_grad_enabled(False)
    if info.is_diffusers:  # units are called per CFG branch: pick calls of the first, middle and last step
        per_step = 1 if loaded.defaults.cfg == 1.0 else 2
        pick = sorted({0, per_step * (steps // 2), per_step * (steps - 1)})
        captured, fp_video = capture_diffusers_unit_inputs(loaded, info, prompts, steps, opts.seed, pick)
    else:
        pick = sorted({0, steps // 2, steps - 1})
        captured, fp_video, settings = capture_unit_inputs(loaded, info, prompts, steps, opts.seed, pick)
    g = info.geometry()
    report: dict = {"schema_version": 1, "model": info.name, "target": tname, "steps": steps, "prompts": prompts,
                    "seed": opts.seed, "tolerances": {"atol": opts.atol, "rtol": opts.rtol,
                                                      "min_unit_snr_db": opts.min_unit_snr,
                                                      "min_psnr_db": opts.min_psnr},
                    "trt": {"run": trt_reason is None, "reason": trt_reason}, "units": {}, "e2e": {}}
    passed = True
    fp_cmp = _simple_compare(opts.atol, opts.rtol)
    units = opts.units or info.unit_names
    for unit in units:
        io = info.unit(unit)
        src = sources[unit]["default"]
        if src.ort_onnx is None:
            raise UserError(f"target {tname} was built with --plugins (qc:: plugin nodes), which onnxruntime cannot "
                            "run; compare a build without --plugins.")
        fp_bytes = load_onnx(work.fp_onnx(unit)).SerializeToString()
        qproto = load_onnx(src.ort_onnx)
        basic = ort_opt_level()
        torch_runner = (make_adapter_runner(loaded.model, unit, g, io, "torch-fp") if info.is_diffusers else
                        make_torch_runner(loaded.model.unit_module(unit, g), io, "torch-fp"))
        runners = [torch_runner,
                   OnnxrtRunner(SessionFromOnnx(fp_bytes, graph_optimization_level=basic), name="onnxrt-fp"),
                   OnnxrtRunner(SessionFromOnnx(qproto.SerializeToString(), graph_optimization_level=basic),
                                name="onnxrt-q")]
        if trt_reason is None and src.engine:  # pragma: no cover - needs a GPU this target runs on
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner  # flavour chosen above

            runners.append(TrtRunner(EngineFromBytes(src.engine.read_bytes()), name="trt"))
        results = Comparator.run(runners, data_loader=captured[unit])
        acc = Comparator.compare_accuracy(results, comparisons=[(0, 1)], compare_func=fp_cmp)
        fp_ok = bool(acc)
        outs = {r: results[i][1] for i, r in enumerate(["torch-fp", "onnxrt-fp", "onnxrt-q", "trt"][:len(runners)])}
        fp_err, q_snr, q_rel, trt_snr = 0.0, math.inf, 0.0, None
        for k in range(len(captured[unit])):
            for r in io["outputs"]:
                n = r["onnx_name"]
                a, b, q = outs["torch-fp"][k][n], outs["onnxrt-fp"][k][n], outs["onnxrt-q"][k][n]
                fp_err = max(fp_err, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
                s, rel = _snr(b, q)
                q_snr, q_rel = min(q_snr, s), max(q_rel, rel)
                if "trt" in outs:  # pragma: no cover
                    s2, _ = _snr(b, outs["trt"][k][n])
                    trt_snr = s2 if trt_snr is None else min(trt_snr, s2)
        q_ok = q_snr >= opts.min_unit_snr
        passed &= fp_ok and q_ok
        report["units"][unit] = {"fp_torch_vs_onnx": {"max_rel_err": fp_err, "passed": fp_ok},
                                 "fp_vs_q": {"snr_db": q_snr, "rel_l2": q_rel, "passed": q_ok,
                                             "onnxruntime_twin": src.twin},
                                 "trt": ({"snr_db": trt_snr} if trt_snr is not None else
                                         {"not_run": trt_reason or "no engine"}),
                                 "samples": len(captured[unit])}
    if opts.e2e and info.is_diffusers:
        import qc_compile

        for label, kw in (("onnx_fp", {"graphs": "fp"}), ("onnx_q", {"target": tname})):
            qc_compile.enable(loaded.transformer, work=work, executor="onnxruntime", policy="none", **kw)
            try:
                video = loaded.sample(prompts, seed=opts.seed, steps=steps)
            finally:
                qc_compile.disable(loaded.transformer)
            res = compare_videos(video, fp_video)
            ok = res["psnr_db"] >= opts.min_psnr if label == "onnx_q" else res["psnr_db"] >= 60.0
            passed &= ok
            report["e2e"][label] = {"psnr_db": res["psnr_db"], "ssim": res["ssim"], "passed": ok}
    elif opts.e2e:
        frames, height, width = info.video_size
        from qc_compile.runtime.generation import GenerationSettings, generate

        settings = GenerationSettings.defaults(loaded, steps=steps, seed=opts.seed, frames=frames, height=height,
                                               width=width)
        for label, ex in (("onnx_fp", StepExecutor(OrtRunner.from_workdir(work, "fp"), info.geometry())),
                          ("onnx_q", StepExecutor(OrtRunner.from_workdir(work, "q", tname), info.geometry()))):
            video, _ = generate(loaded, prompts, settings, executor=ex, progress=False)
            res = compare_videos(video, fp_video)
            ok = res["psnr_db"] >= opts.min_psnr if label == "onnx_q" else res["psnr_db"] >= 60.0
            passed &= ok
            report["e2e"][label] = {"psnr_db": res["psnr_db"], "ssim": res["ssim"], "passed": ok}
    report["passed"] = bool(passed)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _default_prompts(model: str) -> list[str]:
    from qc_compile.calib.ranges import default_prompts

    if model == "qc-ref-wan":  # the qc-ref caption vocabulary (its caption encoder's)
        from qc_compile.data.shapes import sample_captions

        return [c.text() for c in sample_captions(2, 4321)]
    return default_prompts(model, n=2, seed=4321)


def format_table(report: dict) -> str:
    rows = [f"{'unit':<12} {'torch vs onnx fp':>18} {'fp vs q SNR dB':>15} {'rel L2':>8} {'trt':>10}"]
    for u, r in report["units"].items():
        trt = r["trt"]
        trt_s = f"{trt['snr_db']:.1f} dB" if "snr_db" in trt else "not run"
        flag = "" if r["fp_torch_vs_onnx"]["passed"] and r["fp_vs_q"]["passed"] else "  FAIL"
        rows.append(f"{u:<12} {r['fp_torch_vs_onnx']['max_rel_err']:>18.2e} {r['fp_vs_q']['snr_db']:>15.1f} "
                    f"{r['fp_vs_q']['rel_l2']:>8.4f} {trt_s:>10}{flag}")
    if report["trt"]["reason"]:
        rows.append(f"trt: not run: {report['trt']['reason']}")
    for label, r in report["e2e"].items():
        rows.append(f"end to end {label:<8} vs torch FP video: PSNR {r['psnr_db']:.2f} dB, SSIM {r['ssim']:.4f}"
                    f"{'' if r['passed'] else '  FAIL'}")
    rows.append(f"{'PASSED' if report['passed'] else 'FAILED'} ({report['seconds']:.1f} s, {report['steps']} steps, "
                f"{len(report['prompts'])} prompt(s), target {report['target']})")
    return "\n".join(rows)
