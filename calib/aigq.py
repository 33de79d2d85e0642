"""The adaptive calibration, end to end: statistics -> samples (TAP | uniform) -> ranges -> AIGQ weight allocation ->
channel balancing -> activation schedule -> DMPQ predictor -> VC, into one :class:`qc_compile.plan.Plan`.

Works on a loaded model and its linear list, so the CLI (a work dir) and tools (a model loaded directly, e.g.
Open-Sora with synthetic captions) share it. Each stage lives in its own module; this one only wires them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from qc_compile.calib import act_schedule, allocate, predictor, sensitivity, smoothing, tap, vc
from qc_compile.calib.collect import Captions, CollectSettings, StatsStore, collect
from qc_compile.calib.replay import Replay
from qc_compile.errors import UserError
from qc_compile.plan import ACTIVATION_FORMATS, DEFAULT_VARIANT, LinearPlan, Plan, act_scale_for


@dataclass
class Options:
    method: str = "aigq"  # aigq | uniform
    uniform_format: str | None = None
    budget: str | float = 6.0
    target: str = "torch"
    simulated: bool = True  # allow int6_sim in the menu (torch/any targets only)
    act_format: str = "fp8_e4m3"  # default-variant activations (bf16 = weight-only)
    act_high_fraction: float = 0.3
    act_reading: str = "distance"
    sampling: str = "tap"
    calib_samples: int = 32
    replay_samples: int = 4
    smoothing: bool = True
    vc: bool = False
    vc_policy: str = "hlc"
    vc_prompts: int = 4
    predictor: bool = False
    predictor_high_fraction: float = 0.25
    post_skip: int = 3
    seed: int = 0
    srap: bool = True  # thresholds chosen by measured fidelity (calib/srap.py); never-pruning ones when none is safe
    srap_budget_db: float = 0.5
    srap_min_saving: float = 3.0
    srap_max_error: float = 0.5
    hlc: bool = True  # per-plan HLC thresholds measured on the plan's quantized run (calib/hlc_thresholds.py)


@dataclass
class Result:
    plan: Plan
    store: StatsStore
    selected: list[tuple[int, int]]
    selection: dict
    ranges: dict[str, dict]
    sens: sensitivity.Sensitivity | None = None
    alloc: allocate.Allocation | None = None
    balance: smoothing.Balance | None = None
    redundancy: list[float] = field(default_factory=list)
    pred: predictor.PredictorFit | None = None
    vc_info: dict | None = None
    runtime: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def act_format_for(target: str, weight: str, wanted: str) -> str:
    """The activation format a linear gets: ``wanted`` where the target runs it with this weight format, else the
    weight's own family (nvfp4), else bf16."""
    from qc_compile.trt_compat import parse_target, refusal_reason

    if weight == "bf16" or wanted == "bf16":
        return "bf16"
    t = parse_target(target, allow_any=True)
    for a in (wanted, weight if weight in ACTIVATION_FORMATS else None):
        if a and (t.backend in ("torch", "any") or refusal_reason(t, weight, a) is None):
            return a
    return "bf16"


def sample_features(store: StatsStore, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list]:
    feats, ts, idx = [], [], []
    for p in range(store.num_prompts):
        for s in range(store.num_steps):
            feats.append(torch.stack([store.sample(p, s, f"lin/{n}/amax").clamp_min(1e-8).log() for n in names]))
            ts.append(store.timesteps[s])
            idx.append((p, s))
    return torch.stack(feats), torch.tensor(ts), idx


def ranges_over(store: StatsStore, names: Sequence[str], samples: Sequence[tuple[int, int]]) -> dict[str, dict]:
    """Per linear: amax (max over the samples, both CFG branches), per-channel max, and the max over all samples."""
    out = {}
    for n in names:
        sel = torch.stack([store.sample(p, s, f"lin/{n}/ch_amax", "both").amax(0) for p, s in samples]).amax(0)
        out[n] = {"amax": float(sel.max()), "ch_amax": sel, "calls": len(samples)}
    return out


def run(loaded, linears: Sequence, model_meta: dict, calib_dir: str | Path, captions: Captions,
        settings: CollectSettings, opts: Options, *, weights_id: str, provenance: dict, fresh: bool = False,
        progress: bool = True) -> Result:
    from qc_compile.models.stdit3 import Geometry

    tm: dict[str, float] = {}
    t0 = time.perf_counter()
    store = collect(loaded, captions, settings, Path(calib_dir) / "stats", weights_id=weights_id, fresh=fresh,
                    progress=progress)
    tm["statistics_s"] = time.perf_counter() - t0
    names = [li.name for li in linears]
    t0 = time.perf_counter()
    feat, ts, pool = sample_features(store, names)
    idx, selection = tap.select(feat, ts, opts.calib_samples, opts.sampling, seed=opts.seed)
    selected = [pool[i] for i in idx]
    ranges = ranges_over(store, names, selected)
    tm["sampling_s"] = time.perf_counter() - t0
    plan = Plan(model=dict(model_meta), linears={}, target=opts.target, provenance=provenance)
    res = Result(plan, store, selected, selection, ranges, timings=tm)
    if opts.method == "uniform":
        from qc_compile.plan import WEIGHT_FORMATS

        fmt = opts.uniform_format
        for li in linears:
            e = LinearPlan(unit=li.unit, act_amax=ranges[li.name]["amax"])
            a = fmt if fmt in ACTIVATION_FORMATS else "bf16"
            if allocate.fits(fmt, li.in_features) and (not ACTIVATION_FORMATS[a].block
                                                      or li.in_features % ACTIVATION_FORMATS[a].block == 0):
                e.weight, e.activation = fmt, a
                e.act_scale = act_scale_for(a, e.act_amax) if a != "bf16" else None
            plan.linears[li.name] = e
        assert WEIGHT_FORMATS[fmt]
        return res
    if opts.method != "aigq":
        raise UserError(f"--method {opts.method!r}: expected aigq or uniform.")
    menu = allocate.menu_for(opts.target, simulated=opts.simulated)
    act = {"fp8": "fp8_e4m3"}.get(opts.act_format, opts.act_format)
    if act not in ACTIVATION_FORMATS:
        raise UserError(f"--act-format {opts.act_format!r}: unknown; known: {', '.join(ACTIVATION_FORMATS)}.")
    modules = dict(loaded.model.named_modules())
    params = {li.name: li.in_features * li.out_features for li in linears}
    budget = allocate.parse_budget(opts.budget, sum(params.values()))
    probe = {li.name: next(f for f in menu if allocate.fits(f, li.in_features)) for li in linears}
    rel = allocate.weight_rel_errors({li.name: modules[li.name].weight.detach().float() for li in linears}, menu)
    # fail on an impossible budget before the expensive part
    mins = sum(allocate.WEIGHT_FORMATS[probe[n]].bits * params[n] for n in params) / sum(params.values())
    if budget + 1e-9 < mins:
        allocate.allocate({n: 1.0 for n in params}, params, rel, probe, budget)  # raises with the explanation
    g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
    rep_samples = [selected[int(round(i))] for i in torch.linspace(0, len(selected) - 1,
                                                                   min(opts.replay_samples, len(selected))).tolist()]
    t0 = time.perf_counter()
    replays = [Replay.build(loaded, g, store, captions, [s], settings.cfg, settings.fps) for s in rep_samples]
    amax_grids = {n: store.grid(f"lin/{n}/amax") for n in names}
    res.sens = sensitivity.measure(loaded, replays, linears, probe, amax_grids, progress=progress)
    tm["sensitivity_s"] = time.perf_counter() - t0
    res.alloc = allocate.allocate(res.sens.score, params, rel, probe, budget)
    for li in linears:
        w = res.alloc.formats[li.name]
        a = act_format_for(opts.target, w, act)
        amax = ranges[li.name]["amax"]
        plan.linears[li.name] = LinearPlan(unit=li.unit, weight=w, activation=a, act_amax=amax,
                                           act_scale=act_scale_for(a, amax) if a != "bf16" else None)
    t0 = time.perf_counter()
    if opts.smoothing and any(e.activation != "bf16" for e in plan.linears.values()):
        bal = smoothing.search(loaded, replays, plan.linears, {n: ranges[n]["ch_amax"] for n in names})
        res.balance = bal
        for n, s in bal.vectors.items():
            key = "smoothing.caption" if n.endswith("cross_attn.kv_linear") else f"smoothing.{n}"
            plan.tensors[key] = s.numpy()
            plan.linears[n].smoothing = {"tensor": key}
        for n, amax in bal.act_amax.items():
            e = plan.linears[n]
            e.act_amax = amax
            e.act_scale = act_scale_for(e.activation, amax)
        for n, b in bal.rotation.items():
            plan.linears[n].rotation = b
    tm["smoothing_s"] = time.perf_counter() - t0
    if any(e.activation != "bf16" for e in plan.linears.values()):
        plan.variants["high"] = {"*": {"activation": "bf16"}}
        res.redundancy = act_schedule.redundancy({u: store.grid(f"blk/{u}/res_change")
                                                 for u in store.block_units()})
        plan.schedule = act_schedule.schedule_from(res.redundancy, opts.act_high_fraction, opts.act_reading)
    plan.cache_policy = {"name": "none", "params": {"aigq": {"post_skip": opts.post_skip}}}
    if opts.srap:
        t0 = time.perf_counter()
        from qc_compile.calib import runtime_params, srap

        sig = runtime_params.store_signals(loaded, store, captions, settings)
        cal = srap.calibrate(sig.grid, sig.prune_error, sig.evaluate, budget_db=opts.srap_budget_db,
                             min_saving=opts.srap_min_saving, max_error=opts.srap_max_error)
        plan.cache_policy["params"]["srap"] = cal.params
        res.runtime = {"srap": cal.report, "srap_pruning_units": cal.pruning_units}
        tm["srap_s"] = time.perf_counter() - t0
    if opts.predictor:
        t0 = time.perf_counter()
        import copy

        from qc_compile.torch_package import apply_plan

        q_model = apply_plan(copy.deepcopy(loaded), plan, variant=DEFAULT_VARIANT,
                             device=str(loaded.model.x_embedder.proj.weight.device)).model
        pred_samples = [s for s in selected if s[1] >= 1][: max(opts.replay_samples * 2, 4)]
        pairs: dict[str, list] = {}
        blocks = store.block_units()
        for i in range(0, len(pred_samples), 4):
            chunk = pred_samples[i:i + 4]
            rep = Replay.build(loaded, g, store, captions, chunk, settings.cfg, settings.fps)
            for u, pr in predictor.collect_pairs(rep, q_model, store, chunk, blocks).items():
                pairs.setdefault(u, []).extend(pr)
        del q_model
        res.pred = predictor.fit(pairs, opts.predictor_high_fraction)
        plan.cache_policy["params"]["dmpq"] = res.pred.plan_params()
        tm["predictor_s"] = time.perf_counter() - t0
    if opts.vc:
        t0 = time.perf_counter()
        P = min(opts.vc_prompts, store.num_prompts)
        fp = torch.stack([torch.stack([store.sample(p, s, "z_out") for p in range(P)])
                          for s in range(store.num_steps)])
        k, info = vc.fit(loaded, plan, captions.take(range(P)), settings, fp, opts.vc_policy)
        plan.tensors["vc.K"] = k.numpy()
        plan.vc = {"tensor": "vc.K", "note": f"Q&C VC factors (steps x channels), fitted on {P} prompt(s) under "
                                             f"quantization + {opts.vc_policy}"}
        res.vc_info = info
        tm["vc_s"] = time.perf_counter() - t0
    if opts.hlc:  # last: the run that measures them is the finished plan's own (variants, schedule, SRAP)
        t0 = time.perf_counter()
        from qc_compile.calib import runtime_params

        sig = runtime_params.store_signals(loaded, store, captions, settings)
        res.runtime = {**(res.runtime or {}),
                       "hlc": runtime_params.calibrate_hlc(plan, sig.plan_evaluate, runtime_params.RuntimeOptions())}
        tm["hlc_s"] = time.perf_counter() - t0
    return res
