"""Shared machinery of the step policies: validated parameters, unit bookkeeping, variant ranking.

Parameters come from three layers, later ones winning: the policy's published (or our documented) defaults, the
plan's policy block (``plan["policy"][<policy name>]``), and ``--set`` overrides. Every value is checked against its
declared type and range; a bad one is a :class:`~qc_compile.errors.UserError` that names the field and the range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from qc_compile.errors import UserError
from qc_compile.models.units import is_block
from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision, decode_action

VARIANT_RANK: dict[str, int] = {"low": 0, "default": 1, "mid": 1, "high": 2, "fp": 3}
"""Precision variants by rank. ``default`` is the plan's main format for a unit; ``high`` its higher-precision
variant (e.g. INT8 next to NVFP4, or BF16 next to FP8); ``low`` a lower one; ``fp`` the unquantized unit.
When combined policies disagree, the higher rank wins (a refresh in high precision is never lowered)."""


def variant_rank(v: str) -> int:
    return VARIANT_RANK.get(v, 1)


@dataclass(frozen=True)
class Param:
    """One policy parameter: default, type, and the valid range (bounds inclusive unless ``*_open``)."""

    default: Any
    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    nullable: bool = False
    doc: str = ""

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is bool:
            return "true or false"
        if self.kind in (list, dict):
            return f"a {'list' if self.kind is list else 'mapping'}"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        lb = "(" if self.lo is None or self.lo_open else "["
        rb = ")" if self.hi is None or self.hi_open else "]"
        what = "an integer" if self.kind is int else "a number"
        return f"{what} in {lb}{lo}, {hi}{rb}" + (" or null" if self.nullable else "")


def _convert(field: str, p: Param, value: Any) -> Any:
    if value is None or (p.kind is not str and isinstance(value, str) and value.lower() in ("none", "null")):
        if p.nullable:
            return None
        raise UserError(f"{field}: a value is required; expected {p.range_text()}.")
    try:
        if p.kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if p.kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        if p.kind is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if math.isnan(v):
                raise ValueError
            return v
        if p.kind is str:
            return str(value)
        if p.kind is list:
            if isinstance(value, str):
                return [s.strip() for s in value.split(",") if s.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
        if p.kind is dict:
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise UserError(f"{field} = {value!r}: expected {p.range_text()}.") from None
    return value


def check_value(field: str, p: Param, value: Any) -> Any:
    v = _convert(field, p, value)
    if v is None:
        return v
    if p.choices is not None and v not in p.choices:
        raise UserError(f"{field} = {value!r}: expected {p.range_text()}.")
    if p.kind in (int, float):
        bad = ((p.lo is not None and (v < p.lo or (p.lo_open and v == p.lo)))
               or (p.hi is not None and (v > p.hi or (p.hi_open and v == p.hi))))
        if bad:
            raise UserError(f"{field} = {value!r} is out of range: expected {p.range_text()}.")
    return v


def resolve_params(name: str, spec: Mapping[str, Param], *layers: tuple[str, Mapping[str, Any] | None]) -> dict:
    """Defaults, then each (source, mapping) layer in order; unknown keys and bad values are UserErrors."""
    out = {k: p.default for k, p in spec.items()}
    for source, layer in layers:
        for k, v in (layer or {}).items():
            if k not in spec:
                raise UserError(f"{source}: policy {name!r} has no parameter {k!r}; its parameters are "
                                f"{', '.join(sorted(spec)) or '(none)'}.")
            out[k] = check_value(f"{name}.{k}", spec[k], v)
    return out


def require_order(name: str, params: Mapping[str, Any], *keys: str) -> None:
    """Raise unless params[keys[0]] <= params[keys[1]] <= ... (None values skipped)."""
    vals = [(k, params[k]) for k in keys if params.get(k) is not None]
    for (ka, a), (kb, b) in zip(vals, vals[1:]):
        if a > b:
            raise UserError(f"{name}.{ka} = {a:g} must not exceed {name}.{kb} = {b:g} "
                            f"(expected {' <= '.join(f'{name}.{k}' for k in keys)}).")


def computed(stats: StepStats, unit: str) -> bool:
    """Whether the executor computed (all or part of) ``unit`` in the step these statistics describe."""
    a = stats.get(unit, "action")
    if not math.isnan(a):
        return decode_action(a) == "compute"  # whole or partial computation
    return not math.isnan(stats.get(unit, "res_norm"))


def residual_change_rates(stats: StepStats, step: StepInfo, units, last_computed: dict[str, int]) -> dict[str, float]:
    """Per computed unit, its residual's relative L1 change per step since its last computation (``res_rel_l1``
    divided by the steps in between); updates ``last_computed``. Units computed for the first time give no rate."""
    rates = {}
    for u in units:
        if not computed(stats, u):
            continue
        last = last_computed.get(u)
        rel = stats.get(u, "res_rel_l1")
        if last is not None and not math.isnan(rel):
            rates[u] = rel / max(step.index - last, 1)
        last_computed[u] = step.index
    return rates


class BasePolicy:
    """Unit bookkeeping shared by the policies: block units, the last step each unit was computed, parameters."""

    name = "base"
    PARAMS: dict[str, Param] = {}
    requires: frozenset[str] = frozenset()  # executor features: "parts" (sub-block caches), "gate" (in-step test)
    # the statistics level the policy needs from the executor (step_stats.STATS_LEVELS): "none" for a policy that
    # never reuses and reads no statistics; "full" (the safe default) for every caching policy
    reads_stats: str = "full"

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = resolve_params(self.name, self.PARAMS, ("defaults", params))
        self.validate()
        self.units: tuple[str, ...] = ()
        self.blocks: tuple[str, ...] = ()
        self.num_steps = 0
        self.last_computed: dict[str, int] = {}

    @classmethod
    def build(cls, plan_section: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None,
              seed: int = 0) -> "BasePolicy":
        params = resolve_params(cls.name, cls.PARAMS, ("plan.json policy." + cls.name, plan_section),
                                ("--set", overrides))
        if "seed" in cls.PARAMS and params.get("seed") is None:
            params["seed"] = seed
        return cls(params)

    def validate(self) -> None:
        """Cross-field checks (each policy adds its own)."""

    def __getattr__(self, item: str) -> Any:  # parameters read as attributes: self.delta1
        params = self.__dict__.get("params")
        if params is not None and item in params:
            return params[item]
        raise AttributeError(item)

    def reset(self, unit_names: tuple[str, ...], num_steps: int) -> None:
        self.units = tuple(unit_names)
        self.blocks = tuple(u for u in unit_names if is_block(u))
        self.num_steps = num_steps
        self.last_computed = {}

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        return {}

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        for u in self.blocks:
            if computed(stats, u):
                self.last_computed[u] = step.index

    def describe(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    # helpers
    def in_edges(self, step: StepInfo, warmup: int, tail: int) -> bool:
        """True during the first ``warmup`` or the last ``tail`` steps."""
        return step.index < warmup or step.index >= step.num_steps - tail


def reuse_all(units, **kw) -> dict[str, UnitDecision]:
    return {u: UnitDecision(Action.REUSE, **kw) for u in units}
