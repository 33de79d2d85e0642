"""The interface between the sampler and step policies (caching, pruning, precision).

Before each step a policy returns a :class:`UnitDecision` per unit (units it leaves out are computed at the default
variant). After the step it receives :class:`StepStats`, computed by the executor on the device and copied to the
host once per step. ``embed`` and ``final`` are always computed: a policy may only skip block units.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

STAT_NAMES: tuple[str, ...] = ("in_norm", "res_norm", "res_rel_l1", "cos_prev",
                               # appended for the step policies (runtime/policies); keep additions append-only
                               "in_out_rel_l1", "motion", "in_outlier", "mod_rel_l1", "latent_rel_l1", "gate_rel_l1",
                               "action")
"""Per-unit statistics an executor reports after each step (NaN where a unit was not computed):

* ``in_norm``   – L2 norm of the unit's input (all batch elements);
* ``res_norm``  – L2 norm of the residual (output - input) just computed;
* ``res_rel_l1`` – ‖r_new - r_cached‖₁ / ‖r_cached‖₁ against the residual cached at the unit's last computation;
* ``cos_prev``  – cosine similarity between this unit's output and the previous unit's output this step;
* ``in_out_rel_l1`` – ‖out - in‖₁ / ‖in‖₁, the unit's relative input-to-output change (6Bit-Diffusion's Γ);
* ``motion``    – ‖r[:, f+1] - r[:, f]‖₁ / ‖r‖₁ over frames f: the relative inter-frame change of the residual
  just computed (the motion term of HLC's Eq. 5); NaN for single-frame inputs;
* ``in_outlier`` – max|x| / mean|x| of the unit's input (PDR's outlier ratio, at unit granularity);
* ``mod_rel_l1`` – first block unit only, on steps with a ``modulated_input`` gate: mean|F_t - F_prev| / mean|F_prev|
  of its adaLN-modulated input F = modulate(norm1(x), shift, scale) (TeaCache's indicator);
* ``latent_rel_l1`` – ``embed`` row: ‖z_t - z_prev‖₁ / ‖z_prev‖₁ of the latent entering this step vs the previous step;
* ``gate_rel_l1`` – ``embed`` row: the value a :class:`Gate` was evaluated on this step (see :attr:`Action.GATED`);
* ``action``    – block units, every step: what the executor actually did (:data:`ACTION_CODES`).
"""
STAT_INDEX: dict[str, int] = {name: i for i, name in enumerate(STAT_NAMES)}


class Action(str, enum.Enum):
    COMPUTE = "compute"
    REUSE = "reuse"  # apply the residual cached at the unit's last computation to the current input (Δ-DiT style)
    PRUNE = "prune"  # identity: the unit's output is its input
    # Decided inside the step by the decision's :class:`Gate` (TeaCache, First-Block Cache, DBCache): REUSE when the
    # gate opens, else COMPUTE. The sampler's record shows the action that was taken.
    GATED = "gated"


ACTION_CODES: dict[str, float] = {"compute": 0.0, "reuse": 1.0, "prune": 2.0, "partial": 3.0}
"""Values of the ``action`` statistic; ``partial`` = computed with some sub-blocks taken from the cache (PAB, FORA)."""

_TAKEN = {code: ("compute" if name == "partial" else name) for name, code in ACTION_CODES.items()}
_CODE_TENSORS: dict = {}


def decode_action(code: float) -> str | None:
    """The action a trace records for an ``action`` statistic (``partial`` counts as computed); None if unknown."""
    return _TAKEN.get(code)


def action_code_tensor(device) -> dict:
    """``{action: 0-d tensor on device}``, so an executor writes codes device-to-device (assigning a Python scalar
    into a CUDA tensor is a host-to-device copy that synchronises inside the step)."""
    import torch

    key = str(device)
    if key not in _CODE_TENSORS:
        t = torch.tensor(list(ACTION_CODES.values()), device=device)
        _CODE_TENSORS[key] = {name: t[i] for i, name in enumerate(ACTION_CODES)}
    return _CODE_TENSORS[key]

SUB_BLOCKS: tuple[str, ...] = ("attn", "cross", "mlp")
"""The sub-blocks of a block unit whose outputs a decision may take from the cache (``UnitDecision.parts``)."""


@dataclass(frozen=True, eq=False)
class Gate:
    """An in-step cache test shared by the GATED units of one step.

    ``probe`` says what the executor measures before the first gated unit:

    * ``"modulated_input"`` – relative L1 change of the first block unit's adaLN-modulated input against the previous
      step's (TeaCache); evaluated right after ``embed``;
    * ``"residual"`` – relative L1 change of the residual from the stack input to the current hidden state (the output
      of the units before the first gated one) against the same residual at the last step where the gate was closed,
      i.e. the last full computation (First-Block Cache / DBCache's Fn residual).

    ``opens(value) -> bool``: True = reuse the gated units; ``value`` is ``inf`` when there is nothing to compare with.
    This costs one scalar device-to-host copy in the middle of the step, as the original methods do.
    """

    probe: str
    opens: Callable[[float], bool]


@dataclass(frozen=True)
class UnitDecision:
    action: Action = Action.COMPUTE
    variant: str = "default"  # precision variant (engine) to run when computing
    # Sub-blocks (of SUB_BLOCKS) whose last computed output is reused while the rest of the unit is computed;
    # None = run the unit whole. An empty tuple runs it sub-block-wise and stores every sub-block output (PAB/FORA).
    parts: tuple[str, ...] | None = None
    # With ``parts``: multiply reused self-attention / MLP outputs by the *current* step's adaLN gates (FORA) instead
    # of reusing the gated outputs as they were (PAB).
    regate: bool = False
    gate: Gate | None = None  # required with Action.GATED


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
