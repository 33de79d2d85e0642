"""The interface between the sampler and step policies (caching, pruning, precision).

Before each step a policy returns a :class:`UnitDecision` per unit (units it leaves out are computed at the default
variant). After the step it receives :class:`StepStats`, computed by the executor on the device and copied to the
host once per step. ``embed`` and ``final`` are always computed: a policy may only skip block units.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol

STAT_NAMES: tuple[str, ...] = ("in_norm", "res_norm", "res_rel_l1", "cos_prev")
"""Per-unit statistics an executor reports after each step (NaN where a unit was not computed):

* ``in_norm``   – L2 norm of the unit's input (all batch elements);
* ``res_norm``  – L2 norm of the residual (output - input) just computed;
* ``res_rel_l1`` – ‖r_new - r_cached‖₁ / ‖r_cached‖₁ against the residual cached at the unit's last computation;
* ``cos_prev``  – cosine similarity between this unit's output and the previous unit's output this step.
"""


class Action(str, enum.Enum):
    COMPUTE = "compute"
    REUSE = "reuse"  # apply the residual cached at the unit's last computation to the current input (Δ-DiT style)
    PRUNE = "prune"  # identity: the unit's output is its input


@dataclass(frozen=True)
class UnitDecision:
    action: Action = Action.COMPUTE
    variant: str = "default"  # precision variant (engine) to run when computing


COMPUTE = UnitDecision()


@dataclass(frozen=True)
class StepInfo:
    index: int
    num_steps: int
    t: float  # model timestep on the [0, 1000] scale
    dt: float
    unit_names: tuple[str, ...]


@dataclass
class StepStats:
    unit_names: tuple[str, ...]
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # unit -> stat name -> value

    def get(self, unit: str, stat: str) -> float:
        return self.values.get(unit, {}).get(stat, math.nan)


class StepPolicy(Protocol):
    name: str

    def reset(self, unit_names: tuple[str, ...], num_steps: int) -> None: ...

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]: ...

    def observe(self, step: StepInfo, stats: StepStats) -> None: ...


class ComputeAll:
    """The FP baseline: every unit computed at every step."""

    name = "none"

    def reset(self, unit_names: tuple[str, ...], num_steps: int) -> None:
        pass

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        return {}

    def observe(self, step: StepInfo, stats: StepStats) -> None:
        pass
