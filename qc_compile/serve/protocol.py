"""The served model's interface: input/output tensors and the validation of one request.

Every check that can fail on user input lives here, so a bad request becomes one ``status``/``error`` pair in its own
response and never an exception in the server. Types and shapes are enforced earlier by Triton itself (a request
whose ``seed`` is FP32, say, is rejected with Triton's own 400 before it reaches Python).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

MODEL_NAME = "qc_video"
TRACE_SCHEMA_VERSION = 1

# name -> (numpy dtype, shape without the batch dimension, optional)
INPUTS: dict[str, tuple[Any, tuple[int, ...], bool]] = {
    "prompt": (np.bytes_, (1,), False),
    "seed": (np.int64, (1,), True),
    "steps": (np.int32, (1,), True),
    "policy": (np.bytes_, (1,), True),
    "thresholds": (np.bytes_, (1,), True),  # JSON object of --set style overrides, e.g. {"hlc.tau": 0.1}
    "plan": (np.bytes_, (1,), True),        # "plan" (the work dir's plan, quantized) or "fp" (the FP model)
    "mp4": (np.bool_, (1,), True),          # also return the video as mp4 bytes
}
OUTPUTS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "status": (np.int32, (1,)),             # 200 ok, 400 bad request, 503 draining, 500 internal error
    "error": (np.bytes_, (1,)),             # one paragraph when status != 200
    "frames": (np.uint8, (-1, -1, -1, 3)),  # (T, H, W, 3)
    "mp4": (np.bytes_, (1,)),
    "trace": (np.bytes_, (1,)),             # JSON trace summary (compute fraction, timings, decisions)
}
PLAN_CHOICES = ("plan", "fp")


class BadRequest(ValueError):
    """A request that cannot be served as sent; its message goes back to the client (status 400)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (configurable with ``qc-compile serve`` options)."""

    max_steps: int = 100
    max_prompt_chars: int = 1000
    max_thresholds_chars: int = 4000
    default_steps: int | None = None  # None: the model's default


@dataclass(frozen=True)
class ServeRequest:
    prompt: str
    seed: int
    steps: int | None
    policy: str | None
    overrides: tuple[tuple[str, Any], ...]  # sorted (key, value) pairs: hashable, canonical
    plan: str | None
    mp4: bool

    def group_key(self) -> tuple:
        """Requests with equal keys may run as one batch: same steps, policy, thresholds and plan."""
        return (self.steps, self.policy, self.overrides, self.plan)


def _scalar(inputs: Mapping[str, np.ndarray], name: str) -> Any:
    a = inputs.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise BadRequest(f"input {name!r}: expected one value, got shape {tuple(a.shape)}.")
    return a.reshape(-1)[0]


def _text(inputs: Mapping[str, np.ndarray], name: str, limit: int) -> str | None:
    v = _scalar(inputs, name)
    if v is None:
        return None
    if isinstance(v, (bytes, np.bytes_)):
        if len(v) > 4 * limit:
            raise BadRequest(f"input {name!r}: {len(v)} bytes; at most {limit} characters are accepted.")
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"input {name!r}: not valid UTF-8 ({e.reason} at byte {e.start}).") from None
    if not isinstance(v, str):
        raise BadRequest(f"input {name!r}: expected a string (BYTES), got {type(v).__name__}.")
    if len(v) > limit:
        raise BadRequest(f"input {name!r}: {len(v)} characters; at most {limit} are accepted.")
    return v


def _overrides(text: str | None, limit: int) -> tuple[tuple[str, Any], ...]:
    if text is None or not text.strip():
        return ()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"input 'thresholds': not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         'expected an object such as {"hlc.tau": 0.1}.') from None
    if not isinstance(obj, dict):
        raise BadRequest(f"input 'thresholds': expected a JSON object of policy overrides such as "
                         f'{{"hlc.tau": 0.1}}, got {type(obj).__name__}.')
    out = []
    for k, v in obj.items():
        if not k or not isinstance(v, (int, float, bool, str)) and v is not None:
            raise BadRequest(f"input 'thresholds': {k!r} must map to a number, boolean, string or null "
                             f"(as `--set {k}=VALUE` takes), got {type(v).__name__}.")
        if isinstance(v, float) and not math.isfinite(v):
            raise BadRequest(f"input 'thresholds': {k!r} must be finite, got {v}.")
        out.append((k, v))
    return tuple(sorted(out))


def parse_request(inputs: Mapping[str, np.ndarray], limits: Limits) -> ServeRequest:
    """One request's tensors -> a checked :class:`ServeRequest`; raises :class:`BadRequest` with a clear message."""
    unknown = set(inputs) - set(INPUTS)
    if unknown:
        raise BadRequest(f"unknown inputs {sorted(unknown)}; known: {sorted(INPUTS)}.")
    prompt = _text(inputs, "prompt", limits.max_prompt_chars)
    if prompt is None or not prompt.strip():
        raise BadRequest("input 'prompt': give a non-empty prompt.")
    from qc_compile.errors import UserError
    from qc_compile.prompts import check_prompt

    try:  # the CLI's prompt rules (no control characters; errors quote a short excerpt)
        prompt = check_prompt(prompt, "input 'prompt'")
    except UserError as e:
        raise BadRequest(str(e)) from None
    seed = _scalar(inputs, "seed")
    seed = 0 if seed is None else int(seed)
    if seed < 0:
        raise BadRequest(f"input 'seed': must be >= 0, got {seed}.")
    steps = _scalar(inputs, "steps")
    steps = limits.default_steps if steps is None else int(steps)
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise BadRequest(f"input 'steps': must be between 1 and {limits.max_steps} on this server, got {steps}.")
    policy = _text(inputs, "policy", 200)
    policy = policy.strip() if policy and policy.strip() else None
    if policy is not None:
        from qc_compile.errors import UserError
        from qc_compile.runtime.policies import expand

        try:
            policy = expand(policy)[0]
        except UserError as e:
            raise BadRequest(f"input 'policy': {e}") from None
    overrides = _overrides(_text(inputs, "thresholds", limits.max_thresholds_chars), limits.max_thresholds_chars)
    plan = _text(inputs, "plan", 20)
    plan = plan.strip() if plan and plan.strip() else None
    if plan is not None and plan not in PLAN_CHOICES:
        raise BadRequest(f"input 'plan': expected one of {', '.join(PLAN_CHOICES)}, got {plan!r}.")
    mp4 = _scalar(inputs, "mp4")
    return ServeRequest(prompt=prompt.strip(), seed=seed, steps=steps, policy=policy, overrides=overrides,
                        plan=plan, mp4=bool(mp4) if mp4 is not None else False)


def error_response(status: int, message: str) -> dict[str, np.ndarray]:
    return {"status": np.array([status], dtype=np.int32),
            "error": np.array([message.encode("utf-8")], dtype=np.object_)}
