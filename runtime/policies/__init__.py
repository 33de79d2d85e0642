"""Step policies behind the one interface of :mod:`qc_compile.runtime.policy`, and the registry that builds them.

Single policies (``--policy NAME``; ``qc-compile run --help`` lists them):

==========  ==========================================================================================
none        compute everything (the FP baseline)
hlc         QuantCache hierarchical latent caching (Eq. 5–6)                 — :mod:`.hlc`
srap        QuantCache structural redundancy-aware pruning (Eq. 9–11)        — :mod:`.srap`
aigq        QuantCache activation-precision schedule (Eq. 8)                 — :mod:`.precision`
schedule    per-step precision variants from the plan                       — :mod:`.precision`
dmpq        6Bit-Diffusion precision predictor (err ≈ a·Γ + b)              — :mod:`.precision`
tdc         6Bit-Diffusion Temporal Delta Cache with guards and PDR          — :mod:`.tdc`
vc          Q&C variance compensation of the latent after each step         — :mod:`.vc`
interval    static interval, whole-unit residual reuse                     — :mod:`.peers`
fora        FORA (static, sub-block caches)                                 — :mod:`.peers`
teacache    TeaCache with the Open-Sora 1.2 coefficients                    — :mod:`.peers`
fbcache     First-Block Cache                                               — :mod:`.peers`
dbcache     DBCache (Fn/Bn)                                                 — :mod:`.peers`
pab         Pyramid Attention Broadcast                                     — :mod:`.peers`
guard       forces a compute of a unit skipped too long (combine: hlc+guard) — :mod:`.guard`
==========  ==========================================================================================

Combinations: ``a+b+c`` combines any of them (merge rules in :class:`Compose`); named ones:

* ``quantcache`` = ``hlc+aigq+srap`` — the paper's full system: HLC decides reuse across steps, AIGQ the precision
  of what is computed (with its post-skip coupling), SRAP prunes among the units HLC computes;
* ``6bit`` = ``dmpq+tdc`` — 6Bit-Diffusion's full system (DMPQ + TDC + PDR).

Parameters: defaults < the plan (``plan.cache_policy.params[<policy>]``, the plan's per-step ``schedule`` for
``aigq``/``schedule``, ``vc`` factors from the sidecar) < overrides ``{"<policy>.<param>": value}`` (``--set``);
an override without a prefix applies to the one component that has that parameter.
"""

from __future__ import annotations

from typing import Any, Mapping

from qc_compile.errors import UserError
from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.policies.base import BasePolicy, Param, variant_rank
from qc_compile.runtime.policies.guard import ReuseGuard
from qc_compile.runtime.policies.hlc import HLC
from qc_compile.runtime.policies.peers import DBCache, FBCache, FORA, PAB, StaticInterval, TeaCache
from qc_compile.runtime.policies.precision import AIGQ, DMPQ, PrecisionSchedule
from qc_compile.runtime.policies.srap import SRAP
from qc_compile.runtime.policies.tdc import TDC
from qc_compile.runtime.policies.vc import VarianceCompensation


class NoPolicy(BasePolicy):
    """The FP baseline: every unit computed at every step (the one "none" policy; the sampler's default)."""

    name = "none"
    reads_stats = "none"  # computes every unit, reads nothing: no statistics kernels, no residual cache


POLICIES: dict[str, type[BasePolicy]] = {c.name: c for c in (
    NoPolicy, HLC, SRAP, AIGQ, PrecisionSchedule, DMPQ, TDC, VarianceCompensation, StaticInterval, FORA, TeaCache,
    FBCache, DBCache, PAB, ReuseGuard)}

COMBINATIONS: dict[str, tuple[str, ...]] = {
    "quantcache": ("hlc", "aigq", "srap"),
    "6bit": ("dmpq", "tdc"),
}

_ACTION_ORDER = {Action.REUSE: 3, Action.PRUNE: 2, Action.GATED: 1, Action.COMPUTE: 0}


def merge_decisions(decisions: list[Mapping[str, UnitDecision]]) -> dict[str, UnitDecision]:
    """Merge the components' decisions per unit.

    Action: REUSE > PRUNE > GATED > COMPUTE — a unit is computed only if no component skips it; a cached residual is
    preferred to pruning (same cost, better output). Variant: the highest precision any component asks for
    (``fp`` > ``high`` > ``default`` > ``low``), so a refresh in high precision is never lowered. ``parts`` and
    ``gate`` come from the component that set them.
    """
    out: dict[str, UnitDecision] = {}
    for d in decisions:
        for u, new in d.items():
            old = out.get(u)
            if old is None:
                out[u] = new
                continue
            action = max(old.action, new.action, key=lambda a: _ACTION_ORDER[a])
            variant = old.variant
            if variant_rank(new.variant) > variant_rank(old.variant) or (
                    variant == "default" and variant_rank(new.variant) == variant_rank(old.variant)):
                variant = new.variant
            parts = old.parts if old.parts is not None else new.parts
            regate = old.regate if old.parts is not None else new.regate
            gate = old.gate or new.gate
            out[u] = UnitDecision(action, variant, parts, regate, gate)
    return out


class Compose:
    """Several policies acting together: decisions merged by :func:`merge_decisions`; every component observes the
    statistics; ``post_step`` hooks run in order."""

    def __init__(self, name: str, components: list[BasePolicy]) -> None:
        self.name = name
        self.components = components

    def reset(self, unit_names: tuple[str, ...], num_steps: int) -> None:
        for c in self.components:
            c.reset(unit_names, num_steps)

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        out = merge_decisions([c.decide(step) for c in self.components])
        for c in self.components:  # guards act on the merged decisions (they may turn a skip into a compute)
            if hasattr(c, "enforce"):
                out = c.enforce(step, out)
        return out

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        for c in self.components:
            c.observe(step, stats)

    @property
    def post_step(self):
        hooks = [c.post_step for c in self.components if hasattr(c, "post_step")]
        if not hooks:
            raise AttributeError("post_step")

        def run(z, step):
            for h in hooks:
                z = h(z, step)
            return z
        return run

    @property
    def extrapolation(self) -> float:
        return max((float(getattr(c, "extrapolation", 0.0)) for c in self.components), default=0.0)

    @property
    def requires(self) -> frozenset[str]:
        return frozenset().union(*(getattr(c, "requires", frozenset()) for c in self.components))

    def describe(self) -> dict:
        return {"name": self.name, "components": [c.describe() for c in self.components]}


def policy_names() -> list[str]:
    return sorted(POLICIES) + sorted(COMBINATIONS)


def expand(spec: str) -> tuple[str, list[str]]:
    """(normalized spec, component names) of a spec such as ``quantcache`` or ``hlc+srap+vc``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"--policy: expected a policy name; known: {', '.join(policy_names())}.")
    names: list[str] = []
    for part in spec.strip().lower().split("+"):
        part = part.strip()
        if part in COMBINATIONS:
            names += COMBINATIONS[part]
        elif part in POLICIES:
            names.append(part)
        else:
            raise UserError(f"--policy {spec}: unknown policy {part!r}; known policies: {', '.join(policy_names())} "
                            "(combine with '+', e.g. hlc+srap).")
    seen = [n for i, n in enumerate(names) if n not in names[:i]]
    if len(seen) > 1 and "none" in seen:
        seen.remove("none")
    return spec.strip().lower(), seen


def plan_sections(plan: Any) -> dict[str, dict]:
    """Per-policy parameter sections from a plan: a :class:`qc_compile.plan.Plan`, the dict of a ``plan.json``, or a
    dict of sections ``{policy: {param: value}}``.

    Reads ``cache_policy.params`` (sections by policy name; flat params go to the policy named by
    ``cache_policy.name`` when it is a single policy), the per-step ``schedule`` (-> ``aigq.schedule`` and
    ``schedule.steps`` unless they are given), and the ``vc`` factors (``{"factors": [[...]]}`` inline, or
    ``{"tensor": key}`` in the plan's sidecar tensors).
    """
    if plan is None:
        return {}
    get = (lambda k, default=None: getattr(plan, k, default)) if not isinstance(plan, Mapping) else plan.get
    sections: dict[str, dict] = {}
    cp = get("cache_policy") or get("policy") or {}
    if isinstance(cp, Mapping):
        params = cp.get("params", {k: v for k, v in cp.items() if k != "name"}) or {}
        if not isinstance(params, Mapping):
            raise UserError(f"plan cache_policy.params: expected a mapping, got {type(params).__name__}.")
        flat = {k: v for k, v in params.items() if k not in POLICIES}
        for k, v in params.items():
            if k in POLICIES:
                if not isinstance(v, Mapping):
                    raise UserError(f"plan cache_policy.params.{k}: expected a mapping of parameters.")
                sections[k] = dict(v)
        if flat:
            owner = str(cp.get("name", "")).lower()
            if owner not in POLICIES:
                raise UserError(f"plan cache_policy.params has entries {sorted(flat)} that name no policy; group "
                                f"them by policy name ({', '.join(sorted(POLICIES))}).")
            sections.setdefault(owner, {}).update(flat)
    sched = get("schedule")
    if sched:
        sections.setdefault("aigq", {}).setdefault("schedule", list(sched))
        sections.setdefault("schedule", {}).setdefault("steps", list(sched))
    vc = get("vc")
    if vc:
        if "factors" in vc:
            sections.setdefault("vc", {})["factors"] = vc["factors"]
        elif "tensor" in vc:
            tensors = get("tensors", {}) or {}
            if vc["tensor"] not in tensors:
                raise UserError(f"plan vc.tensor {vc['tensor']!r} is not in the plan's sidecar tensors.")
            sections.setdefault("vc", {})["factors"] = [[float(x) for x in row] for row in tensors[vc["tensor"]]]
    return sections


def plan_policy_name(plan: Any) -> str | None:
    """The policy the plan names (``cache_policy.name``), if any."""
    if plan is None:
        return None
    cp = plan.get("cache_policy") if isinstance(plan, Mapping) else getattr(plan, "cache_policy", None)
    name = cp.get("name") if isinstance(cp, Mapping) else None
    return str(name) if name else None


def split_overrides(names: list[str], overrides: Mapping[str, Any] | None) -> dict[str, dict]:
    """``{"hlc.delta1": v, "p_base": w}`` -> ``{"hlc": {"delta1": v}, "srap": {"p_base": w}}`` for the components."""
    out: dict[str, dict] = {n: {} for n in names}
    for key, value in (overrides or {}).items():
        if "." in key:
            pol, param = key.split(".", 1)
            pol = pol.lower()
            if pol not in out:
                raise UserError(f"--set {key}: policy {pol!r} is not part of this run's policy "
                                f"({'+'.join(names)}).")
            out[pol][param] = value
            continue
        owners = [n for n in names if key in POLICIES[n].PARAMS]
        if len(owners) != 1:
            where = "no component has" if not owners else f"several components have ({', '.join(owners)})"
            raise UserError(f"--set {key}: {where} a parameter {key!r}; write it as <policy>.{key} "
                            f"(components: {', '.join(names)}).")
        out[owners[0]][key] = value
    return out


def get_policy(spec: str, overrides: Mapping[str, Any] | None = None, plan: Any = None, *, seed: int = 0):
    """Build the policy ``spec`` (a name, a named combination or ``a+b``) with plan and override parameters.

    Returns a single policy object or a :class:`Compose`; every object has ``name``, ``reset``, ``decide``,
    ``observe``, ``describe`` (and ``post_step`` where it changes the latent).
    """
    spec, names = expand(spec)
    sections = plan_sections(plan)
    per = split_overrides(names, overrides)
    built = [POLICIES[n].build(sections.get(n), per[n], seed=seed) for n in names]
    if len(built) == 1:
        p = built[0]
        if spec != p.name:
            p.name = spec
        return p
    return Compose(spec, built)


__all__ = ["POLICIES", "COMBINATIONS", "get_policy", "policy_names", "merge_decisions", "Compose", "BasePolicy",
           "Param", "HLC", "SRAP", "AIGQ", "PrecisionSchedule", "DMPQ", "TDC", "VarianceCompensation",
           "StaticInterval", "FORA", "TeaCache", "FBCache", "DBCache", "PAB", "ReuseGuard", "plan_sections",
           "plan_policy_name"]
