"""``qc_compile.enable(pipe)``: run a diffusers video pipeline's transformer through qc-compile's step policies.

    import qc_compile
    session = qc_compile.enable(pipe, policy="quantcache")   # pipe: WanPipeline, CogVideoXPipeline, ...
    video = pipe(prompt, num_inference_steps=30).frames[0]
    session.compute_fraction, session.trace()                # what ran: units x steps
    qc_compile.disable(pipe)                                 # the pipeline's own forward again

How it works: the transformer's ``forward`` is replaced (on the instance; the class is untouched) by a
:class:`QCSession` that turns each call into the adapter's units (:mod:`qc_compile.models.diffusers_adapter`) and
runs them with the runtime's one :class:`~qc_compile.runtime.step_executor.StepExecutor` (over the torch runner)
under a step policy. The session also wraps the
transformer's ``cache_context`` to learn, from pipelines that say so (Wan), which CFG branch and step a call is;
otherwise a new step starts when the timestep changes, and calls within a step are branches in call order. One
decision per step, shared by the branches; each branch has its own executor (caches, gate references), so an
in-step gate is evaluated per branch as diffusers' and cache-dit's hooks do per cache context. The policy observes
the branches' mean statistics (the ``action`` column: the first branch's) when the next step starts (one
device-to-host copy per step).

``executor="onnxruntime"`` / ``"tensorrt"`` (with ``work=WORK`` from ``qc-compile export``): the executor runs each
unit through the work dir's graphs instead of the transformer's modules — the exported FP graphs, or the Q/DQ graphs
(onnxruntime) / engines (TensorRT) of a ``qc-compile build`` (:class:`WorkDirRunner`). The call's geometry and text
length must be the export's (the graphs fix every axis but the batch), the transformer must be the exported one
(config, and with ``check_weights`` its state digest: the graphs carry their own weights), and the policy must run
whole units (sub-block caches and in-step gates need the torch executor).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from qc_compile.diffusers_runners import AdapterRunner, WorkDirGraphs, WorkDirRunner, work_dir_graphs
from qc_compile.errors import UserError


def _transformers(pipe: Any) -> list[torch.nn.Module]:
    """The denoiser(s) of a pipeline (Wan 2.2 A14B has two), or the transformer itself."""
    if isinstance(pipe, torch.nn.Module) and hasattr(pipe, "config") and not hasattr(pipe, "transformer"):
        return [pipe]
    found = [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]
    if not found:
        raise UserError(f"qc_compile.enable: {type(pipe).__name__} has no `transformer`; pass a diffusers video "
                        "pipeline (WanPipeline, CogVideoXPipeline, ...) or its transformer.")
    return found


class QCSession:
    """One enabled transformer: its adapter, policy, per-branch caches and the decision record of the last run."""

    def __init__(self, transformer: torch.nn.Module, policy: Any, *, scheduler: Any = None,
                 num_steps: int | None = None, quantize: str | None = None, plan: Any = None,
                 graphs: Any = None) -> None:
        from qc_compile.models.diffusers_adapter import adapter_for

        self.transformer = transformer
        self.graphs: WorkDirGraphs | None = graphs  # executor onnxruntime / tensorrt: the work dir's units
        self.quantize = quantize
        self.plan = plan  # a work dir's plan: its quantized linears run on FastLinear (diffusers_quant.apply_plan)
        self._variants = None  # the plan's per-unit precision variant of the step (diffusers_quant.VariantSelector)
        self._swaps: list = []  # the block linears replaced by quantized ones (undone at uninstall)
        self.adapter = adapter_for(transformer)
        self.policy = policy
        self.policy_name = getattr(policy, "name", type(policy).__name__)
        self.scheduler = scheduler
        self.num_steps_arg = num_steps
        self.unit_names = tuple(self.adapter.unit_names())
        self._orig_cache_context = transformer.cache_context
        self._signature = inspect.signature(type(transformer).forward)
        self._context: tuple[str, dict] | None = None
        self.runs = 0
        self.steps: list = []  # StepRecords of the current (or last) run
        self._cur: dict | None = None  # the step in progress
        self._executors: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ patching
    def install(self) -> None:
        if self.quantize is not None:
            from qc_compile.diffusers_quant import quantize_blocks

            self._swaps = quantize_blocks(self.adapter.blocks, self.quantize)
        elif self.plan is not None:
            from qc_compile.diffusers_quant import VariantSelector, apply_plan

            self._variants = VariantSelector()
            self._swaps = apply_plan(self.transformer, self.plan, self._variants)
        self.transformer.forward = self.forward
        self.transformer.cache_context = self.cache_context
        self.transformer._qc_session = self

    def uninstall(self) -> None:
        from qc_compile.diffusers_quant import restore

        self.finish()
        for attr in ("forward", "cache_context", "_qc_session"):
            self.transformer.__dict__.pop(attr, None)
        restore(self._swaps)
        self._swaps = []

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """The transformer's own ``cache_context`` (diffusers hooks keep working) that also tells us the branch."""
        self._context = (name, kwargs)
        try:
            with self._orig_cache_context(name, **kwargs):
                yield
        finally:
            self._context = None

    # ------------------------------------------------------------------------------------------------ steps
    def _num_steps(self, ctx_kwargs: dict) -> int:
        n = ctx_kwargs.get("num_inference_steps") or self.num_steps_arg
        if n is None and self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
            n = len(self.scheduler.timesteps)
        if not n:
            raise UserError("qc_compile.enable: cannot tell the number of denoising steps; pass num_steps=N to "
                            "enable() when driving the transformer without a pipeline scheduler.")
        return int(n)

    def _dt(self, index: int, num_steps: int) -> float:
        s = self.scheduler
        sig = getattr(s, "sigmas", None) if s is not None else None
        if isinstance(sig, torch.Tensor) and sig.numel() > index + 1 and float(sig.max()) <= 1.0 + 1e-6:
            return float(sig[index] - sig[index + 1])  # flow matching: sigma goes 1 -> 0
        ts = getattr(s, "timesteps", None) if s is not None else None
        if isinstance(ts, torch.Tensor) and ts.numel() > index:
            nxt = float(ts[index + 1]) if ts.numel() > index + 1 else 0.0
            return (float(ts[index]) - nxt) / 1000.0
        return 1.0 / num_steps

    def _begin_step(self, t: float, branch: str | None, ctx_kwargs: dict) -> None:
        from qc_compile.runtime.policy import StepInfo

        cur = self._cur
        idx_given = ctx_kwargs.get("step_index")
        new_run = cur is None
        if cur is not None:
            if idx_given is not None:
                new_run = idx_given <= cur["info"].index
            else:
                new_run = t > cur["info"].t or cur["info"].index + 1 >= cur["info"].num_steps
        self.finish()
        num_steps = self._num_steps(ctx_kwargs)
        if new_run:
            self.runs += 1
            self.steps = []
            self._executors = {}
            self.policy.reset(self.unit_names, num_steps)
            index = 0 if idx_given is None else int(idx_given)
        else:
            index = cur["info"].index + 1 if idx_given is None else int(idx_given)
        info = StepInfo(index=index, num_steps=num_steps, t=t, dt=self._dt(index, num_steps),
                        unit_names=self.unit_names)
        self._cur = {"info": info, "decisions": dict(self.policy.decide(info)), "branches": [],
                     "stats": [], "seconds": 0.0}

    def finish(self) -> None:
        """Hand the step in progress to the policy (``observe``) and the record; called when the next step starts."""
        from qc_compile.runtime.policy import STAT_NAMES, StepStats
        from qc_compile.runtime.sampler import StepRecord, _record

        cur, self._cur = self._cur, None
        if cur is None or not cur["stats"]:
            return
        from qc_compile.runtime.policy import STAT_INDEX

        host = torch.stack(cur["stats"]).nanmean(dim=0)
        host[:, STAT_INDEX["action"]] = cur["stats"][0][:, STAT_INDEX["action"]]  # what the first branch did
        host = host.cpu()  # the one device-to-host copy per step
        stats = StepStats(self.unit_names, {u: {s: float(host[j, k]) for k, s in enumerate(STAT_NAMES)
                                                if not math.isnan(float(host[j, k]))}
                                            for j, u in enumerate(self.unit_names)})
        info = cur["info"]
        self.policy.observe(info, stats)
        self.steps.append(StepRecord(info.index, info.t, {u: _record(d, stats.get(u, "action"))
                                                          for u, d in cur["decisions"].items()},
                                     stats.values, cur["seconds"]))

    # ------------------------------------------------------------------------------------------------ forward
    def _executor(self, branch: str, g):
        """The branch's step executor (rebuilt, with empty caches, when the geometry changes)."""
        from qc_compile.runtime.step_executor import StepExecutor

        ex = self._executors.get(branch)
        if ex is None or ex.g != g:
            runner = AdapterRunner(self.adapter, g) if self.graphs is None else self.graphs.runner(g)
            ex = self._executors[branch] = StepExecutor(runner, g)
            ex.use_policy(self.policy)  # its statistics level and reuse extrapolation, as the sampler does
        return ex

    def forward(self, *args: Any, **kwargs: Any):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        from qc_compile.runtime.protocols import Conditioning

        bound = self._signature.bind(self.transformer, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self", None)
        if a.get("attention_kwargs"):
            raise UserError("qc_compile.enable: attention_kwargs (e.g. a LoRA scale) are not supported while the "
                            "transformer runs through qc-compile; call qc_compile.disable(pipe) for such runs.")
        inputs, g = self.adapter.call_inputs(a)
        if self.graphs is not None:
            self.graphs.check_call(inputs, g)
        t = float(inputs["timestep"].float().max())
        name, ctx_kwargs = self._context if self._context is not None else (None, {})
        cur = self._cur
        if (cur is None or t != cur["info"].t or (name is not None and name in cur["branches"])
                or (ctx_kwargs.get("step_index") is not None and ctx_kwargs["step_index"] != cur["info"].index)):
            self._begin_step(t, name, ctx_kwargs)
            cur = self._cur
        branch = name if name is not None else f"call{len(cur['branches'])}"
        cur["branches"].append(branch)
        ex = self._executor(branch, g)
        ex.runner.extra = {k: v for k, v in inputs.items() if k not in ("x", "timestep", "y")}
        ex.step_index = cur["info"].index  # the pipeline's step, not this branch's call count (CFG may skip calls)
        if self._variants is not None:
            self._variants.set(cur["decisions"])  # the plan's linears run the variant each unit was given
        start = time.perf_counter()
        v, stats = ex.step(inputs["x"], inputs["timestep"], Conditioning(y=inputs["y"], mask=None, fps=None),
                           cur["decisions"])
        cur["seconds"] += time.perf_counter() - start
        cur["stats"].append(stats)
        if self.graphs is not None:  # the graphs compute in float32; hand back the caller's dtype, as forward does
            v = v.to(inputs["x"].dtype)
        if not a.get("return_dict", True):
            return (v,)
        return Transformer2DModelOutput(sample=v)

    # ------------------------------------------------------------------------------------------------ results
    @property
    def compute_fraction(self) -> float:
        """Block-unit evaluations computed / all, over the last run."""
        from qc_compile.runtime.trace import compute_fractions

        self.finish()
        return compute_fractions(self.steps, self.unit_names)[0]

    def trace(self) -> dict:
        """The decision trace of the last run (the ``trace.json`` document of ``qc-compile run``)."""
        from qc_compile.runtime.trace import build_trace

        self.finish()
        describe = getattr(self.policy, "describe", None)
        return build_trace(policy=describe() if describe else {"name": self.policy_name}, unit_names=self.unit_names,
                           steps=self.steps, settings={"model": type(self.transformer).__name__,
                                                       "driver": "qc_compile.enable", "steps": len(self.steps),
                                                       "quantize": self.quantize,
                                                       "executor": "torch" if self.graphs is None else
                                                       self.graphs.describe()},
                           prompts=[], costs=None, seconds=sum(s.seconds for s in self.steps))


EXECUTORS = ("torch", "onnxruntime", "tensorrt")


def _plan_of(work: str | Path | None):
    if work is None:
        return None
    from qc_compile.plan import load_plan
    from qc_compile.workdir import WorkDir

    wd = WorkDir(Path(work))
    if not wd.plan_json.is_file():
        raise UserError(f"qc_compile.enable: work dir {work} has no plan.json; run `qc-compile calibrate {work}` "
                        "first, or pass work=None to use the policy defaults.")
    return load_plan(wd.plan_json)


def enable(pipe: Any, work: str | Path | None = None, policy: Any = "quantcache", *,
           overrides: Mapping[str, Any] | None = None, seed: int = 0, num_steps: int | None = None,
           quantize: str | None = None, executor: str = "torch", target: str | None = None,
           graphs: str = "auto", device: str | None = None, check_weights: bool = True):
    """Make ``pipe``'s transformer(s) run through qc-compile's step policies; returns the :class:`QCSession`
    (a list of sessions for pipelines with two transformers, e.g. Wan 2.2 A14B).

    ``policy``: a name (``none``, ``quantcache``, ``hlc``, ``fbcache``, ``pab``, ... or ``a+b``) or a policy object;
    ``work``: a qc-compile work dir whose plan supplies the policy's calibrated thresholds; ``overrides``:
    ``{"hlc.delta1": 0.2}`` as ``--set``; ``num_steps``: only when driving a bare transformer without a scheduler;
    ``quantize="fp8"``: every block linear W8A8 FP8 on qc-compile's kernels (:mod:`qc_compile.diffusers_quant`;
    undone by :func:`disable`); a quantized plan in ``work`` runs its per-linear formats the same way
    (:func:`qc_compile.diffusers_quant.apply_plan`).

    ``executor``: ``"torch"`` (the transformer's own modules, default); ``"onnxruntime"`` runs every unit through the
    graphs of ``work`` (the exported FP graphs, or after ``qc-compile build`` its Q/DQ graphs — ``target`` picks the
    build, ``graphs="fp"`` forces the FP graphs; ``device`` "cpu" or "cuda" with onnxruntime-gpu); ``"tensorrt"`` the
    build's engines on a GPU TensorRT runs on. Both need the call at the export's geometry and text length, policies
    that run whole units (not pab / fora / teacache / fbcache), and the exported transformer (``check_weights``:
    compare its float32 state digest with the export's, since the graphs carry their own weights).
    """
    from qc_compile.diffusers_quant import check_format, plan_is_quantized
    from qc_compile.plan import load_plan
    from qc_compile.runtime.policies import get_policy, plan_policy_name

    check_format(quantize)
    transformers = _transformers(pipe)
    if executor not in EXECUTORS:
        raise UserError(f"qc_compile.enable: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}.")
    graph_units = None
    if executor != "torch":
        graph_units = work_dir_graphs(executor, work, transformers, quantize, target=target, graphs=graphs,
                                   device=device, check_weights=check_weights)
        wd = graph_units.work
        plan = load_plan(wd.plan_json) if wd.plan_json.is_file() else None  # its policy settings, if any
    else:
        if target is not None or graphs != "auto" or device is not None:
            raise UserError("qc_compile.enable: target=, graphs= and device= choose the work dir's graphs of "
                            "executor='onnxruntime' / 'tensorrt'; executor='torch' runs the transformer as it is "
                            "(move it with .to(device)).")
        plan = _plan_of(work)
    if quantize is not None and plan is not None and plan_is_quantized(plan):
        raise UserError(f"qc_compile.enable: quantize={quantize!r} and the quantized plan of work dir {work} both "
                        "set the linears' formats; pass one of them.")
    if policy is None:
        policy = plan_policy_name(plan) or "none"
    sessions = []
    for tr in transformers:
        if getattr(tr, "_qc_session", None) is not None:
            raise UserError("qc_compile.enable: this pipeline is already enabled; call qc_compile.disable(pipe) "
                            "first.")
        if getattr(tr, "is_cache_enabled", False) or getattr(getattr(tr, "_diffusers_hook", None), "hooks", None):
            raise UserError("qc_compile.enable: the transformer carries diffusers hooks (a cache or offloading); "
                            "call transformer.disable_cache() / remove them first — both would replace its forward.")
        if isinstance(policy, str):
            pol = get_policy(policy, overrides, plan, seed=seed)  # one policy object per transformer (own state)
        elif len(transformers) > 1:
            raise UserError("qc_compile.enable: this pipeline has two transformers; give the policy by name so each "
                            "gets its own instance.")
        else:
            pol = policy
        if graph_units is not None:
            missing = sorted(set(getattr(pol, "requires", ())) - set(WorkDirRunner.supports))
            if missing:
                what = {"parts": "block sub-steps (its sub-block caches)", "gate": "in-step gates"}
                raise UserError(f"qc_compile.enable: policy {getattr(pol, 'name', policy)!r} needs "
                                f"{' and '.join(what.get(m, m) for m in missing)}, which only executor='torch' has: "
                                f"the {executor} executor runs whole unit graphs (one graph or engine per block). "
                                "Use executor='torch' for this policy, or a whole-unit policy (none, quantcache, hlc, "
                                "srap, ...).")
        sessions.append(QCSession(tr, pol, scheduler=getattr(pipe, "scheduler", None), num_steps=num_steps,
                                  quantize=quantize, plan=None if graph_units is not None else plan,
                                  graphs=graph_units))
    installed: list[QCSession] = []
    try:  # all or nothing: a second transformer that fails to install leaves the first as it was
        for s in sessions:
            s.install()
            installed.append(s)
    except BaseException:
        for s in reversed(installed):
            s.uninstall()
        raise
    return sessions[0] if len(sessions) == 1 else sessions


def disable(pipe: Any) -> list[QCSession]:
    """Undo :func:`enable`: the transformers' own ``forward`` again. Returns the sessions (their records stay
    readable); a pipeline that is not enabled is left as it is."""
    out = []
    for tr in _transformers(pipe):
        s = getattr(tr, "_qc_session", None)
        if s is not None:
            s.uninstall()
            out.append(s)
    return out
