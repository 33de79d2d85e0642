"""Validators shared by the commands, the Pipeline API and the runtime: numbers, seeds, sizes and finite tensors.

Why one module: a bound such as "steps at most 1000" or "seeds in 0..2^63-1" must be the same whether it comes from
``qc-compile run --steps``, ``Pipeline(...)(steps=...)`` or a served request, and the message must name the option.
The click parameter types below turn a bad value into click's usage error (exit 2, names the option); the plain
functions raise :class:`~qc_compile.errors.UserError`. Imports only torch and click (the runtime may import it).
"""

from __future__ import annotations

import math
from typing import Any

import click

from qc_compile.errors import UserError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; -1 and 2^64-1 alias, so only 0..2^63-1
STEPS_MAX = 1000  # the schedule has 1000 timesteps; more steps cannot be distinct
CFG_MAX = 100.0
FRAMES_MAX = 1024
SIZE_MAX = 8192  # pixels per side
BATCH_MAX = 256  # --max-batch of an engine profile
PROMPTS_MAX = 4096
GPUS_MAX = 64  # --gpus: processes on one host (GPUs, or gloo processes with --device cpu)


def check_int(value: Any, what: str, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi] (bools and non-integral numbers refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise UserError(f"{what} must be an integer in {lo}..{hi}, got {value!r}.")
    if not lo <= value <= hi:
        raise UserError(f"{what} must be in {lo}..{hi}, got {value}.")
    return value


def check_float(value: Any, what: str, lo: float, hi: float) -> float:
    """``value`` as a finite float in [lo, hi] (NaN and infinities refused)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in [{lo:g}, {hi:g}], got {value!r}.") from None
    if isinstance(value, bool) or not math.isfinite(f) or not lo <= f <= hi:
        raise UserError(f"{what} must be a finite number in [{lo:g}, {hi:g}], got {value!r}.")
    return f


def check_seed(value: Any, what: str = "--seed") -> int:
    return check_int(value, what, 0, SEED_MAX)


def check_steps(value: Any, what: str = "--steps") -> int:
    return check_int(value, what, 1, STEPS_MAX)


def check_cfg(value: Any, what: str = "--cfg") -> float:
    return check_float(value, what, 0.0, CFG_MAX)


def check_video_size(frames: Any, height: Any, width: Any) -> tuple[int, int, int]:
    return (check_int(frames, "--frames", 1, FRAMES_MAX), check_int(height, "--height", 1, SIZE_MAX),
            check_int(width, "--width", 1, SIZE_MAX))


# ------------------------------------------------------------------------------------------------ tensors
class NonFiniteError(UserError):
    """A tensor that must be finite holds NaN or Inf (weights, a latent during sampling, a unit's output)."""


def count_nonfinite(t) -> int:
    import torch

    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() or t.is_complex() else 0


def check_finite(tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` when ``tensor`` holds NaN or Inf (one reduction)."""
    bad = count_nonfinite(tensor)
    if bad:
        raise NonFiniteError(f"{what} holds {bad} non-finite value(s) (NaN or Inf) of {tensor.numel()}.")


def check_weights(tensors: dict, source: str) -> None:
    """Every weight must be a floating-point tensor with finite values; names the first offending tensor."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise UserError(f"{source}: tensor {name!r} has dtype {str(t.dtype).replace('torch.', '')}; model "
                            "weights must be floating point (float32, float16 or bfloat16). The file was written "
                            "by another tool or is damaged.")
        bad = count_nonfinite(t)
        if bad:
            raise NonFiniteError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or Inf); a model "
                                 "with such weights produces garbage. Use a checkpoint with finite weights.")


# ------------------------------------------------------------------------------------------------ click types
class BoundedInt(click.ParamType):
    """An integer option with bounds, e.g. ``--steps`` (click reports a bad value naming the option, exit 2)."""

    name = "integer"

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not an integer (expected {self.lo}..{self.hi}).", param, ctx)
        if not self.lo <= v <= self.hi:
            self.fail(f"{v} is out of range; expected {self.lo}..{self.hi}.", param, ctx)
        return v

    def get_metavar(self, param, ctx=None) -> str:  # click 8.1 / 8.2 signatures
        return f"INTEGER {self.lo}..{self.hi}"


class FiniteFloat(click.ParamType):
    """A finite float option in [lo, hi] (click's FloatRange lets NaN through)."""

    name = "number"

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number (expected {self.lo:g}..{self.hi:g}).", param, ctx)
        if not math.isfinite(v) or not self.lo <= v <= self.hi:
            self.fail(f"{value!r} is not a finite number in [{self.lo:g}, {self.hi:g}].", param, ctx)
        return v

    def get_metavar(self, param, ctx=None) -> str:
        return f"FLOAT {self.lo:g}..{self.hi:g}"


SEED = BoundedInt(0, SEED_MAX)
STEPS = BoundedInt(1, STEPS_MAX)
CFG = FiniteFloat(0.0, CFG_MAX)
FRAMES = BoundedInt(1, FRAMES_MAX)
SIZE = BoundedInt(1, SIZE_MAX)
PORT = BoundedInt(1, 65535)  # a TCP port (socket.bind raises OverflowError beyond 65535)
