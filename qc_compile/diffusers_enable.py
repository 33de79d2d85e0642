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
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

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
                 num_steps: int | None = None, quantize: str | None = None) -> None:
        from qc_compile.models.diffusers_adapter import adapter_for

        self.transformer = transformer
        self.quantize = quantize
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
            ex = self._executors[branch] = StepExecutor(_AdapterRunner(self.adapter, g), g)
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
        start = time.perf_counter()
        v, stats = ex.step(inputs["x"], inputs["timestep"], Conditioning(y=inputs["y"], mask=None, fps=None),
                           cur["decisions"])
        cur["seconds"] += time.perf_counter() - start
        cur["stats"].append(stats)
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
                                                       "quantize": self.quantize},
                           prompts=[], costs=None, seconds=sum(s.seconds for s in self.steps))


class _AdapterRunner:
    """The torch runner over a diffusers adapter, plus the embed inputs the runtime's ``Conditioning`` does not
    carry (Wan I2V image features, CogVideoX's rotary table / ofs / timestep_cond): set per call in ``extra``."""

    def __init__(self, adapter: Any, g: Any) -> None:
        from qc_compile.runtime.runners.torch import TorchRunner

        self._torch = TorchRunner(adapter, g)
        self.backend, self.supports, self.stats = "torch", self._torch.supports, self._torch.stats
        self.unit_names = self._torch.unit_names
        self.extra: dict[str, torch.Tensor] = {}

    def run_unit(self, unit: str, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if unit == "embed":
            inputs = {**inputs, **self.extra}
        return self._torch.run_unit(unit, variant, inputs)

    def block_steps(self, unit: str, variant: str, ctx: Mapping[str, torch.Tensor]):
        return self._torch.block_steps(unit, variant, ctx)

    def begin_step(self, h: torch.Tensor, ctx: Mapping[str, torch.Tensor]) -> None:
        pass

    def describe(self) -> dict:
        return {"runner": "torch", "model": type(self._torch.model.transformer).__name__}


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
           quantize: str | None = None):
    """Make ``pipe``'s transformer(s) run through qc-compile's step policies; returns the :class:`QCSession`
    (a list of sessions for pipelines with two transformers, e.g. Wan 2.2 A14B).

    ``policy``: a name (``none``, ``quantcache``, ``hlc``, ``fbcache``, ``pab``, ... or ``a+b``) or a policy object;
    ``work``: a qc-compile work dir whose plan supplies the policy's calibrated thresholds; ``overrides``:
    ``{"hlc.delta1": 0.2}`` as ``--set``; ``num_steps``: only when driving a bare transformer without a scheduler;
    ``quantize="fp8"``: every block linear W8A8 FP8 on qc-compile's kernels (:mod:`qc_compile.diffusers_quant`;
    undone by :func:`disable`).
    """
    from qc_compile.diffusers_quant import check_format
    from qc_compile.runtime.policies import get_policy, plan_policy_name

    check_format(quantize)
    transformers = _transformers(pipe)
    plan = _plan_of(work)
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
        sessions.append(QCSession(tr, pol, scheduler=getattr(pipe, "scheduler", None), num_steps=num_steps,
                                  quantize=quantize))
    for s in sessions:
        s.install()
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
