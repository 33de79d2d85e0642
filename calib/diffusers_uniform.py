"""`qc-compile calibrate WORK --uniform FORMAT` on a diffusers work dir (`export qc-ref-wan`, or `export
wan2.1:PIPELINE_FOLDER` of a whole WanPipeline folder): the same plan, ranges and report as STDiT3's
:mod:`qc_compile.calib.uniform`, measured while the model's **own** sampler (:meth:`QCRefWan.sample`, or the
WanPipeline's: CFG as a cond and an uncond call per step) runs the calibration prompts.

* Ranges: :class:`~qc_compile.calib.ranges.RangeCollector`'s pre-hooks on every ``nn.Linear`` of the transformer,
  keyed by their diffusers module path (the names model.json records); the calls of one step (cond, uncond) are
  folded into one per-step maximum, so ``ranges.safetensors`` and the heatmap are per step as for STDiT3.
* Runtime parameters ported: the per-step activation schedule (``variants.high`` + ``schedule``, AIGQ Eq. 8's
  redundancy D_t = mean relative L1 change of each block's residual (out - in) since the previous step, over block
  units and calibration prompts, cond branch — the signal :class:`qc_compile.calib.srap.BlockSignals` measures for
  STDiT3, here from forward hooks on the diffusers blocks) and AIGQ's ``post_skip``.
* Not ported, with the reason in ``calibration.runtime`` (and on the command's output): SRAP thresholds and HLC
  thresholds (:data:`NOT_PORTED`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qc_compile.errors import ArtifactError, UserError

NOT_PORTED = {
    "srap": "not ported to diffusers models: SRAP's threshold search replays single denoising steps with one block "
            "pruned and runs candidate thresholds end to end through the STDiT3 sampler (calib/runtime_params.py "
            "measure / fidelity_evaluator); the srap policy runs with its defaults on this work dir",
    "hlc": "not ported to diffusers models: HLC threshold calibration runs the plan's fake-quantized STDiT3 copies "
           "end to end (calib/runtime_params.py plan_evaluator); the hlc policy runs with its defaults on this work "
           "dir",
}


def refuse_aigq(info) -> UserError:
    return UserError(f"calibrate --method aigq: not available for {info.name}, a diffusers (Wan) work dir. AIGQ's "
                     "sensitivity, smoothing and allocation replay single denoising steps through the STDiT3 "
                     "runtime's statistics store, which is not ported to diffusers transformers driven by their own "
                     f"sampler. Use `qc-compile calibrate {info.path.parent} --uniform FORMAT` (fp8, int4_b128, "
                     "int4_b64 or bf16 run on a diffusers model's torch executor), which measures the ranges and the "
                     "per-step activation schedule with the model's own sampler.")


def check_calibratable(info) -> None:
    """qc-ref-wan work dirs (the model ships its caption encoder) and work dirs exported from a whole WanPipeline
    folder calibrate; a ``wan2.1:PATH`` transformer folder has no text encoder or scheduler to sample with: refused in
    one paragraph."""
    from qc_compile.diffusers_run import is_pipeline_work

    if info.name == "qc-ref-wan" or is_pipeline_work(info):
        return
    raise UserError(f"calibrate: {info.path.parent} holds {info.name}, a diffusers transformer folder exported on its "
                    "own. Calibration runs the model's own sampler over text prompts, which needs the text encoder, "
                    "tokenizer, VAE and scheduler of a whole WanPipeline folder (model_index.json beside "
                    "transformer/); a transformer folder holds none of them. Export the pipeline folder instead "
                    "(`qc-compile export wan2.1:PIPELINE_FOLDER -o WORK`), calibrate qc-ref-wan (`qc-compile export "
                    "qc-ref-wan -o WORK`), or write a plan elsewhere with linears named by their diffusers module "
                    "path (as model.json lists them).")


def load_for_calibration(work_dir: Path, prompts_file: Path | None, num_prompts: int, *, steps, cfg, seed,
                         device: str = "cpu"):
    """(work, info, loaded, prompts, settings dict) for a diffusers work dir: the model checked against model.json;
    qc-ref-wan's prompts through its caption tokenizer (default: qc-ref's shapes captions, in its vocabulary), a
    WanPipeline's through its own tokenizer (default: the general video prompts calibrate uses for Open-Sora)."""
    from qc_compile.calib.ranges import default_prompts
    from qc_compile.diffusers_run import check_captions, load_work
    from qc_compile.prompts import read_prompt_file
    from qc_compile.workdir import WorkDir, read_model_info

    work = WorkDir(work_dir)
    info = read_model_info(work)
    check_calibratable(info)
    pipeline = info.name != "qc-ref-wan"
    prompts = read_prompt_file(prompts_file) if prompts_file else \
        default_prompts("opensora-v1.2" if pipeline else "qc-ref", num_prompts)
    try:
        check_captions(prompts, info.name)
    except UserError as e:
        raise UserError(f"--prompts {prompts_file or '(default)'}: {e}") from None
    loaded, _ = load_work(work.root, info, device)
    d = loaded.defaults
    if tuple(info.video_size) != (d.frames, d.height, d.width):
        raise ArtifactError(f"{info.path}: video size {info.video_size} differs from the model folder's own "
                            f"{d.frames}x{d.height}x{d.width}; the folder changed since export. Re-run qc-compile "
                            "export.")
    settings = {"steps": steps or d.steps, "cfg": d.cfg if cfg is None else cfg, "seed": seed}
    return work, info, loaded, prompts, settings


class ResidualChange:
    """Forward hooks on the transformer's blocks: per step, the relative L1 change of each block's residual
    (output - input) since the previous step, per prompt, on the first call of the step (the cond branch under
    WanPipeline and qc-ref-wan's sampler). A step ends when the transformer is called with another timestep (a
    pre-hook on the transformer) or at exit."""

    def __init__(self, transformer) -> None:
        self.transformer = transformer
        self.blocks = list(transformer.blocks)
        self._t: float | None = None
        self._prev: dict[int, torch.Tensor] = {}
        self._calls: dict[int, int] = {}
        self._cur: dict[int, torch.Tensor] = {}
        self.steps: list[torch.Tensor] = []  # per step: (units, prompts)
        self._handles: list = []

    def _hook(self, j: int):
        def hook(mod, args, kwargs, out):
            k = self._calls.get(j, 0)
            self._calls[j] = k + 1
            if k:  # uncond (and any later) calls of the step
                return
            x = (args[0] if args else kwargs["hidden_states"]).detach().float()
            o = (out[0] if isinstance(out, tuple) else out).detach().float()
            B = x.shape[0]
            r = (o - x).reshape(B, -1)
            prev = self._prev.get(j)
            self._cur[j] = ((r - prev).abs().sum(1) / prev.abs().sum(1).clamp_min(1e-12)).cpu() \
                if prev is not None and prev.shape == r.shape else torch.full((B,), math.nan)
            self._prev[j] = r
        return hook

    def _step_hook(self, mod, args, kwargs) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        key = float(torch.as_tensor(t).flatten()[0])
        if self._t is not None and key != self._t:
            self.take_step()
        self._t = key

    def __enter__(self) -> "ResidualChange":
        self._handles.append(self.transformer.register_forward_pre_hook(self._step_hook, with_kwargs=True))
        for j, b in enumerate(self.blocks):
            self._handles.append(b.register_forward_hook(self._hook(j), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if exc[0] is None and self._cur:
            self.take_step()

    def take_step(self) -> None:
        missing = [j for j in range(len(self.blocks)) if j not in self._cur]
        if missing:
            raise RuntimeError(f"residual change: blocks {missing} did not run this step")
        self.steps.append(torch.stack([self._cur[j] for j in range(len(self.blocks))]))
        self._cur, self._calls = {}, {}

    def by_unit(self) -> dict[str, torch.Tensor]:
        """block_i -> (prompts, steps), what :func:`qc_compile.calib.act_schedule.redundancy` reads."""
        t = torch.stack(self.steps, dim=-1)  # (units, prompts, steps)
        return {f"block_{j}": t[j] for j in range(t.shape[0])}


def _per_step(values: list[float], steps: int) -> list[float]:
    """The per-call values of one linear folded to one per step (the max over the step's calls)."""
    if not values or len(values) % steps:
        raise RuntimeError(f"calibration: {len(values)} calls do not divide into {steps} steps")
    k = len(values) // steps
    return [max(values[i * k:(i + 1) * k]) for i in range(steps)]


def calibrate_uniform(work, info, loaded, prompts: list[str], settings: dict, opts, *, progress: bool = True):
    """Ranges and the activation schedule over ``prompts`` (prompt k: noise seed ``seed + k``) x all steps of the
    model's own sampler; writes ``calib/ranges.*``, ``plan.json`` (validated against model.json) and the report.
    Returns :class:`qc_compile.calib.uniform.UniformResult`."""
    from qc_compile.calib import act_schedule, runtime_params
    from qc_compile.calib.ranges import RangeCollector
    from qc_compile.calib.uniform import UniformResult, write_ranges_and_plan, write_report
    from qc_compile.plan import WEIGHT_FORMATS, save_plan, validate

    opts = opts.checked()
    rt_opts = opts.runtime or runtime_params.RuntimeOptions()
    torch.set_grad_enabled(False)
    steps, cfg, seed = settings["steps"], settings["cfg"], settings["seed"]
    rc = RangeCollector(loaded.transformer, percentile=opts.percentile)
    resid = ResidualChange(loaded.transformer)
    with rc, resid:
        loaded.sample(list(prompts), seed=seed, steps=steps, cfg=cfg, progress=progress)
    if len(resid.steps) != steps:
        raise RuntimeError(f"calibration: the sampler ran {len(resid.steps)} distinct timesteps, expected {steps}")
    exported = {li["name"] for li in info.linears()}
    unused = sorted(n for n, st in rc.stats.items() if not st.amax)
    if set(rc.stats) != exported:
        raise ArtifactError(f"{info.path}: the loaded transformer's linears differ from model.json's (e.g. "
                            f"{sorted(set(rc.stats) ^ exported)[:3]}); re-run qc-compile export.")
    if unused:
        raise RuntimeError(f"calibration: linears {unused[:4]} were never called by the sampler")
    for st in rc.stats.values():  # per step, as STDiT3's ranges (one call per step there)
        st.amax = _per_step(st.amax, steps)
        if st.pct:
            st.pct = _per_step(st.pct, steps)
    ranges = rc.reduce()
    bad = [n for n, r in ranges.items() if not (math.isfinite(r["amax"]) and r["amax"] > 0)]
    if bad:
        raise UserError(f"calibration: linear(s) {', '.join(bad[:4])} saw no finite non-zero input range over the "
                        "calibration prompts (a zero or non-finite activation); the model's weights are degenerate "
                        "there, so no activation scale can be calibrated.")
    plan, kept, calib = write_ranges_and_plan(work, info, rc, ranges, opts, {
        "prompts": list(prompts), "steps": steps, "cfg": cfg, "seed": seed, "video": list(info.video_size),
        "sampler": f"{info.name}: the model's own sampler (CFG as cond + uncond calls; per-step range = max over both)"})
    report: dict = {}
    high = runtime_params.high_variant(plan, rt_opts.high)
    if high is not None:
        plan.variants.setdefault("high", high)
        d = act_schedule.redundancy(resid.by_unit())
        plan.schedule = act_schedule.schedule_from(d, rt_opts.act_high_fraction, rt_opts.act_reading)
        report["redundancy"] = [None if x != x else x for x in d]
        report["schedule"] = {"written": True, "signal": "relative L1 change of each block's residual since the "
                                                         "previous step (cond branch), mean over blocks and prompts",
                              "high_fraction": rt_opts.act_high_fraction, "high": rt_opts.high}
    else:
        report["schedule"] = {"written": False, "reason": "unquantized plan: nothing for a high variant to undo"}
    cp = plan.cache_policy or {"name": "none", "params": {}}
    cp.setdefault("params", {}).setdefault("aigq", {})["post_skip"] = rt_opts.post_skip
    plan.cache_policy = cp
    if rt_opts.srap:
        report["srap"] = {"written": False, "reason": NOT_PORTED["srap"]}
    if rt_opts.hlc:
        report["hlc"] = {"written": False, "reason": NOT_PORTED["hlc"]}
    calib["runtime"] = report
    lins = {li["name"]: li for li in info.linears()}
    validate(plan, linears=lins, model_name=info.name, config_sha256=info.config_sha256, where="calibrated plan")
    save_plan(plan, work.plan_json)
    rep = write_report(work, plan, ranges, kept,
                       {"prompts": list(prompts), "steps": steps, "cfg": cfg, "seed": seed, "method": calib["method"],
                        "percentile": opts.percentile, "format": opts.fmt},
                       {n: st.amax for n, st in rc.stats.items()})
    return UniformResult(plan, kept, ranges, rep, WEIGHT_FORMATS[opts.fmt].simulated)


def summary_lines(plan) -> list[str]:
    """What the command prints about the runtime parameters (written or not, and why)."""
    rt = (plan.provenance or {}).get("calibration", {}).get("runtime", {})
    out = []
    s = rt.get("schedule") or {}
    if s.get("written"):
        out.append(f"activation schedule: {plan.schedule.count('high')} of {len(plan.schedule)} steps run the "
                   f"`high` variant ({s['high']}), from the blocks' per-step residual change")
    for k in ("srap", "hlc"):
        if k in rt and not rt[k].get("written", True):
            out.append(f"{k.upper()} thresholds not written: {rt[k]['reason']}.")
    return out
