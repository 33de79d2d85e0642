"""What every calibrated plan carries for the runtime besides its formats: precision variants and the per-step
schedule (AIGQ, Eq. 8), SRAP's per-unit thresholds, and AIGQ's post-skip coupling.

Both calibration methods call :func:`add_runtime_params` with the signals of their FP sampling pass (the uniform
method through :func:`measure`, the adaptive one from its statistics store), so a ``--uniform`` plan is as complete
for the step policies as an AIGQ plan:

* ``variants.high`` — activations in bf16 where the plan quantizes them (weight-only plans: the unquantized weights);
  ``high="fp"`` (``calibrate --uniform``'s default): weights and activations unquantized;
  ``variants.low`` only when asked for (``low_activation``), since no 8-bit plan has a lower activation format that
  every target runs;
* ``schedule`` — ``high`` on the ``high_fraction`` of steps whose block residuals change most (``act_schedule``);
* ``cache_policy.params.srap`` — per-unit cosine thresholds (:mod:`qc_compile.calib.srap`), chosen by running
  candidate thresholds end to end on the calibration prompts (:func:`fidelity_evaluator`) and keeping the most
  permissive within the PSNR budget, or thresholds that never prune with the reason;
* ``cache_policy.params.aigq.post_skip``;
* ``cache_policy.params.hlc`` — delta1/delta2 for quantized plans whose quantized execution raises HLC's compute
  above the unquantized model's at the default thresholds (:mod:`qc_compile.calib.hlc_thresholds`, measured end to
  end with the plan's own executor: :func:`plan_evaluator`); unquantized plans keep the defaults without extra runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qc_compile.calib import act_schedule
from qc_compile.calib import hlc_thresholds
from qc_compile.calib import srap as srap_calib


@dataclass
class RuntimeOptions:
    act_high_fraction: float = 0.3
    act_reading: str = "distance"
    high: str = "activations"  # "fp": the high variant runs unquantized weights too (calibrate --uniform's default)
    low_activation: str | None = None
    srap: bool = True  # thresholds validated end to end (never-pruning ones with the reason when nothing is safe)
    srap_budget_db: float = srap_calib.DEFAULT_BUDGET_DB
    srap_min_saving: float = srap_calib.DEFAULT_MIN_SAVING
    srap_max_error: float = srap_calib.DEFAULT_MAX_ERROR
    srap_samples: int = 2
    srap_eval_prompts: int = 4
    post_skip: int = 3
    hlc: bool = True  # per-plan HLC thresholds for quantized plans (calibrate --hlc-thresholds/--no-hlc-thresholds)
    hlc_budget_db: float = hlc_thresholds.DEFAULT_BUDGET_DB
    hlc_factors: tuple[float, ...] = hlc_thresholds.DEFAULT_FACTORS


@dataclass
class Signals:
    """FP sampling-pass signals: SRAP's similarity grid, the residual change (prompts, steps, units; cond branch),
    a function measuring the velocity error of pruning a unit at a calibration sample, and one running the
    calibration prompts end to end under given SRAP thresholds (None: not available)."""

    grid: srap_calib.SimilarityGrid
    res_change: torch.Tensor
    prune_error: Callable[[int, int, str], float] | None
    evaluate: srap_calib.Evaluate | None = None
    plan_evaluate: Callable[..., hlc_thresholds.Evaluate] | None = None  # plan -> evaluate(hlc params, quantized)


def high_variant(plan, mode: str = "activations") -> dict | None:
    """The ``high`` variant's overrides: bf16 activations where quantized, else bf16 weights where quantized;
    ``mode="fp"``: bf16 weights and activations (the unquantized model at the schedule's high steps: on qc-ref the
    early steps decide which way a trajectory goes, and FP8 *weights* alone flip some captions there; see
    bench/results/methods_qc_ref_cpu/ablation_fp8.md)."""
    quantized = any(e.activation != "bf16" or e.weight != "bf16" for e in plan.linears.values())
    if mode == "fp" and quantized:
        return {"*": {"weight": "bf16", "activation": "bf16"}}
    if any(e.activation != "bf16" for e in plan.linears.values()):
        return {"*": {"activation": "bf16"}}
    if any(e.weight != "bf16" for e in plan.linears.values()):
        return {"*": {"weight": "bf16"}}
    return None


def add_runtime_params(plan, signals: Signals, opts: RuntimeOptions) -> dict:
    """Add variants, schedule and SRAP/AIGQ parameters to ``plan`` in place; returns a report dict."""
    report: dict = {}
    high = high_variant(plan, opts.high)
    if high is not None:
        plan.variants.setdefault("high", high)
        if opts.low_activation:
            plan.variants.setdefault("low", {"*": {"activation": opts.low_activation}})
        d = act_schedule.redundancy({u: signals.res_change[:, :, j] for j, u in enumerate(signals.grid.units)})
        plan.schedule = act_schedule.schedule_from(d, opts.act_high_fraction, opts.act_reading)
        report["redundancy"] = [None if x != x else x for x in d]
    cp = plan.cache_policy or {"name": "none", "params": {}}
    params = cp.setdefault("params", {})
    params.setdefault("aigq", {})["post_skip"] = opts.post_skip
    if opts.srap:
        cal = srap_calib.calibrate(signals.grid, signals.prune_error, signals.evaluate, budget_db=opts.srap_budget_db,
                                   min_saving=opts.srap_min_saving, max_error=opts.srap_max_error,
                                   samples_per_unit=opts.srap_samples)
        params["srap"] = cal.params
        report["srap"] = cal.report
        report["srap_pruning_units"] = cal.pruning_units
    plan.cache_policy = cp
    if opts.hlc:
        report["hlc"] = calibrate_hlc(plan, signals.plan_evaluate, opts)
    return report


def is_quantized(plan) -> bool:
    """Whether any linear of ``plan`` runs a quantized weight or activation format."""
    return any(e.activation != "bf16" or e.weight != "bf16" for e in plan.linears.values())


def calibrate_hlc(plan, plan_evaluate, opts: RuntimeOptions) -> dict:
    """Write ``cache_policy.params.hlc`` thresholds into ``plan`` (after its variants, schedule and SRAP are set,
    since the run that measures them is the plan's own) when the measurement asks for them; returns the report."""
    if not is_quantized(plan):
        return {"skipped": "unquantized plan: the defaults were tuned on the unquantized model"}
    if plan_evaluate is None:
        return {"skipped": "no end-to-end evaluation of the plan was available"}
    cal = hlc_thresholds.calibrate(plan_evaluate(plan), factors=opts.hlc_factors, budget_db=opts.hlc_budget_db)
    if cal.params is not None:
        plan.cache_policy.setdefault("params", {}).setdefault("hlc", {}).update(cal.params)
    return cal.report


def measure(loaded, prompts, settings, *, progress: bool = False, contexts=()) -> tuple[torch.Tensor, Signals]:
    """One FP sampling pass over ``prompts`` with the block signals recorded (and any extra context managers, e.g.
    a range collector, active); returns (videos, signals) with a replaying ``prune_error``."""
    import contextlib

    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import generate, torch_executor

    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    sig = srap_calib.BlockSignals(loaded.model)
    rec = _SignalExecutor(torch_executor(loaded.model, g), sig)
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        stack.enter_context(sig)
        videos, _ = generate(loaded, list(prompts), settings, executor=rec, progress=progress)
    grid, res = sig.grid()
    fp = torch_executor(loaded.model, g)
    P = len(prompts)
    refs: dict[tuple[int, int], torch.Tensor] = {}

    def prune_error(p: int, s: int, unit: str) -> float:
        from qc_compile.runtime.protocols import Conditioning

        c = rec.cond
        rows = [p, P + p]
        cond = Conditioning(y=c.y[rows], mask=c.mask[rows], fps=c.fps[rows])
        dev = c.y.device
        err, ref = srap_calib.step_prune_error(fp, rec.z[s][p:p + 1].to(dev), rec.t[s][rows].to(dev), cond,
                                               settings.cfg, unit, refs.get((p, s)))
        refs[(p, s)] = ref
        return err
    y, mask = loaded.encode_prompts(list(prompts))
    null = loaded.null_captions(P).to(y.device)
    caps = [(y[k:k + 1], mask[k:k + 1], null[k:k + 1]) for k in range(P)]
    evaluate = fidelity_evaluator(loaded, settings, caps, list(videos))
    return videos, Signals(grid, res, prune_error, evaluate,
                           lambda plan: plan_evaluator(loaded, settings, caps, list(videos), plan))


def plan_evaluator(loaded, settings, captions: list, references: list[torch.Tensor], plan, *,
                   policy: str = hlc_thresholds.POLICY, max_prompts: int = 4) -> hlc_thresholds.Evaluate:
    """``evaluate(hlc_params, quantized)``: the first ``max_prompts`` calibration prompts (noise seed
    ``settings.seed + k``) under ``policy`` with ``plan``'s parameters (+ ``hlc`` overrides; None: the defaults),
    on the plan's own computation (``quantized``: the fake-quantized torch copies per variant, what
    ``qc-compile run`` executes on the torch backend, CPU or CUDA) or the unquantized model; each final video's PSNR
    against ``references[k]`` (full compute, FP) and the mean compute fraction. Unlike :func:`fidelity_evaluator`
    (SRAP's, on the unquantized model) this sees the quantization noise HLC's score reacts to."""
    from qc_compile.metrics.fidelity import psnr
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.models.units import block_units
    from qc_compile.runtime.generation import generate_from_features, torch_executor
    from qc_compile.runtime.policies import get_policy
    from qc_compile.runtime.runners import plan_models

    units = tuple(block_units(loaded.model.unit_names()))
    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    device = str(loaded.model.x_embedder.proj.weight.device)
    n = min(max_prompts, len(captions))
    models: dict = {}

    def evaluate(hlc_params: dict | None, quantized: bool) -> srap_calib.Fidelity:
        if quantized:
            if not models:
                models.update(plan_models(loaded, plan, device))
            ex = torch_executor(models["default"], g, variant_models=models)
        else:
            ex = torch_executor(loaded.model, g)
        over = {f"hlc.{k}": v for k, v in (hlc_params or {}).items()}
        ps, comp = [], []
        for k in range(n):
            seed = settings.seed + k
            video, rec = generate_from_features(loaded, *captions[k], settings, progress=False, seeds=[seed],
                                                policy=get_policy(policy, over, plan, seed=seed), executor=ex)
            ref = references[k].float().cpu()
            rng = 2.0 if loaded.config.space == "pixel" else float(ref.max() - ref.min()) or 1.0
            ps.append(min(srap_calib.PSNR_CAP, float(psnr(video[0], ref, data_range=rng))))
            comp.append(rec.compute_fraction(units))
        return srap_calib.Fidelity(ps, sum(comp) / len(comp))
    evaluate.resolution = 1.0 / (len(units) * settings.steps)  # one unit evaluation of one video
    return evaluate


def fidelity_evaluator(loaded, settings, captions: list, references: list[torch.Tensor], *, context: str = "hlc",
                       max_prompts: int = 4) -> srap_calib.Evaluate:
    """``evaluate(srap_params)``: the first ``max_prompts`` calibration prompts (prompt k from noise seed
    ``settings.seed + k``, as in the FP pass) under ``context`` (+ ``srap`` with those params; None: the context
    alone, computed once), each final video's PSNR against the FP pass's ``references[k]`` and the mean compute
    fraction. Pixel-space videos in [-1, 1] (data range 2); latents against their own range."""
    from qc_compile.metrics.fidelity import psnr
    from qc_compile.models.units import block_units
    from qc_compile.runtime.generation import generate_from_features
    from qc_compile.runtime.policies import get_policy

    units = tuple(block_units(loaded.model.unit_names()))
    n = min(max_prompts, len(captions))
    cache: dict = {}

    def evaluate(srap_params: dict | None) -> srap_calib.Fidelity:
        if srap_params is None and "base" in cache:
            return cache["base"]
        spec = context if srap_params is None else f"{context}+srap"
        plan = None if srap_params is None else {"cache_policy": {"name": "none", "params": {"srap": srap_params}}}
        ps, comp = [], []
        for k in range(n):
            seed = settings.seed + k
            video, rec = generate_from_features(loaded, *captions[k], settings, progress=False, seeds=[seed],
                                                policy=get_policy(spec, None, plan, seed=seed))
            ref = references[k].float().cpu()
            rng = 2.0 if loaded.config.space == "pixel" else float(ref.max() - ref.min()) or 1.0
            ps.append(min(srap_calib.PSNR_CAP, float(psnr(video[0], ref, data_range=rng))))
            comp.append(rec.compute_fraction(units))
        fid = srap_calib.Fidelity(ps, sum(comp) / len(comp))
        if srap_params is None:
            cache["base"] = fid
        return fid
    return evaluate


class _SignalExecutor(srap_calib.LatentRecorder):
    def __init__(self, executor, signals: srap_calib.BlockSignals) -> None:
        super().__init__(executor)
        self.signals = signals

    def step(self, z, timestep, cond, decisions):
        out = super().step(z, timestep, cond, decisions)
        self.signals.take_step()
        return out


def store_signals(loaded, store, captions, settings) -> Signals:
    """Signals from an AIGQ statistics store (latents per sample are in the store)."""
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.protocols import Conditioning

    grid = srap_calib.grid_from_store(store)
    res = torch.stack([store.grid(f"blk/{u}/res_change") for u in grid.units], -1)
    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    fp = torch_executor(loaded.model, g)
    dev = loaded.model.x_embedder.proj.weight.device
    refs: dict[tuple[int, int], torch.Tensor] = {}

    def prune_error(p: int, s: int, unit: str) -> float:
        cap = captions.take([p])
        cond = Conditioning(y=torch.cat([cap.y, cap.y_null]).to(dev), mask=torch.cat([cap.mask, cap.mask]).to(dev),
                            fps=torch.full((2,), float(settings.fps), device=dev))
        z = store.sample(p, s, "z_in")[None].to(dev)
        t = torch.full((2,), float(store.timesteps[s]), device=dev)
        err, ref = srap_calib.step_prune_error(fp, z, t, cond, settings.cfg, unit, refs.get((p, s)))
        refs[(p, s)] = ref
        return err
    # the FP pass's final latents are in the store: the last step's output (clamped like generate's videos)
    last = store.num_steps - 1
    finals = [store.sample(p, last, "z_out") for p in range(store.num_prompts)]
    if loaded.config.space == "pixel":
        finals = [f.clamp(-1, 1) for f in finals]
    caps = [(captions.y[p:p + 1], captions.mask[p:p + 1], captions.y_null[p:p + 1]) for p in range(store.num_prompts)]
    return Signals(grid, res, prune_error, fidelity_evaluator(loaded, settings, caps, finals),
                   lambda plan: plan_evaluator(loaded, settings, caps, finals, plan))
