"""From a dynamic batch of requests to pipeline runs: grouping, per-sample decisions, responses.

Triton's dynamic batcher hands :meth:`ServeEngine.infer` up to ``max_batch_size`` requests at once. They are grouped
by :meth:`ServeRequest.group_key` (same steps, policy, thresholds, plan; the geometry is the model's or the work dir's,
so it is the same for all). Decisions are **per sample**: the runtime makes one decision per unit and step for the
whole batch it runs, from statistics over that batch, so

* a group whose policy is *static* (its decisions depend only on the step, never on the data: ``none``, ``interval``,
  ``fora``, ``pab``, ``schedule``, ``vc``) runs as one batched forward — every sample gets the decisions it would get
  alone (tests/test_serve.py checks the traces);
* a group with an adaptive policy (``hlc``, ``teacache``, ``quantcache``, ...) runs one sample at a time, so each
  request's decisions come from its own statistics, exactly as in a single-request run.

``decisions="per-batch"`` (``qc-compile serve --decisions per-batch``) runs every group as one batch instead: faster
under load, but an adaptive policy then decides once for the whole batch (the trace says so; tools/load_test.py
measures the difference).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qc_compile.errors import UserError
from qc_compile.serve.protocol import (TRACE_SCHEMA_VERSION, BadRequest, Limits, ServeRequest, error_response,
                                       parse_request)

LOG = logging.getLogger("qc_compile.serve")

STATIC_POLICIES = frozenset({"none", "interval", "fora", "pab", "schedule", "vc"})
"""Policies whose decisions depend only on the step index (and plan), never on run statistics, and whose per-step
hooks act per sample: batching them cannot change any sample's decisions."""

DECISION_MODES = ("per-sample", "per-batch")
_ACTION_CHARS = {"compute": "C", "reuse": "R", "prune": "P"}


def is_static(policy: str) -> bool:
    from qc_compile.runtime.policies import expand

    return all(n in STATIC_POLICIES for n in expand(policy)[1])


def actions_string(step_decisions: Mapping[str, dict], unit_names: Sequence[str]) -> str:
    """One character per block unit for one step: C computed, R reused, P pruned (``+variant`` not shown)."""
    return "".join(_ACTION_CHARS.get(step_decisions.get(u, {}).get("action", "compute"), "?")
                   for u in unit_names if u not in ("embed", "final"))


@dataclass
class EngineStats:
    batches: int = 0
    requests: int = 0
    ok: int = 0
    bad: int = 0
    internal: int = 0
    forwards: int = 0  # pipeline calls (a batched group is one)
    batch_sizes: dict[int, int] = field(default_factory=dict)


class ServeEngine:
    """Runs requests on ``pipelines`` ({"plan": Pipeline, "fp": Pipeline}; "plan" absent without a plan).

    Thread-safe: one batch runs at a time (the pipelines' executors keep per-run caches)."""

    def __init__(self, pipelines: Mapping[str, Any], *, limits: Limits = Limits(), decisions: str = "per-sample",
                 default_policy: str | None = None, fps: int | None = None) -> None:
        if decisions not in DECISION_MODES:
            raise UserError(f"--decisions must be one of {', '.join(DECISION_MODES)}, got {decisions!r}.")
        if "fp" not in pipelines:
            raise ValueError("pipelines must include 'fp'")
        self.pipelines = dict(pipelines)
        self.default_plan = "plan" if "plan" in self.pipelines else "fp"
        self.limits = limits
        self.decisions = decisions
        self.default_policy = default_policy
        self.fps = fps
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._state = threading.Condition()
        self._in_flight = 0
        self._last_activity = time.monotonic()
        self.draining = False

    # --------------------------------------------------------------------------------------------- lifecycle
    def idle_for(self) -> float:
        """Seconds since the last request arrived or finished; 0 while one is running."""
        with self._state:
            return 0.0 if self._in_flight else time.monotonic() - self._last_activity

    def in_flight(self) -> int:
        with self._state:
            return self._in_flight

    # --------------------------------------------------------------------------------------------- inference
    def infer(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One response per request, in order; never raises for a bad request."""
        with self._state:
            self._in_flight += 1
            self._last_activity = time.monotonic()
        try:
            with self._lock:
                return self._infer(requests)
        finally:
            with self._state:
                self._in_flight -= 1
                self._last_activity = time.monotonic()

    def _infer(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        t_batch = time.perf_counter()
        responses: list[dict | None] = [None] * len(requests)
        parsed: dict[int, ServeRequest] = {}
        for i, inputs in enumerate(requests):
            if self.draining:
                responses[i] = error_response(503, "the server is shutting down; retry on another instance.")
                continue
            try:
                parsed[i] = self._resolve(parse_request(inputs, self.limits))
            except (BadRequest, UserError) as e:
                responses[i] = self._bad(str(e))
        groups: dict[tuple, list[int]] = {}
        for i, r in parsed.items():
            groups.setdefault(r.group_key(), []).append(i)
        for idx in groups.values():
            for i, resp in zip(idx, self._run_group([parsed[i] for i in idx], len(requests))):
                responses[i] = resp
        self.stats.batches += 1
        self.stats.requests += len(requests)
        self.stats.batch_sizes[len(requests)] = self.stats.batch_sizes.get(len(requests), 0) + 1
        LOG.info("batch of %d request(s): %d group(s), %.2f s", len(requests), len(groups),
                 time.perf_counter() - t_batch)
        return responses  # type: ignore[return-value]

    def _bad(self, message: str) -> dict[str, np.ndarray]:
        self.stats.bad += 1
        LOG.warning("400 bad request: %s", " ".join(message.split()))
        return error_response(400, message)

    def _resolve(self, r: ServeRequest) -> ServeRequest:
        """Fill in the server defaults (plan, policy) so equal requests group together."""
        plan = r.plan or self.default_plan
        if plan not in self.pipelines:
            raise BadRequest(f"input 'plan': {plan!r} is not available: this server runs a model without a "
                             "calibrated plan (serve a work dir that has plan.json); use plan 'fp'.")
        policy = r.policy or (self.default_policy if plan == "plan" else None) or "none"
        return ServeRequest(r.prompt, r.seed, r.steps, policy, r.overrides, plan, r.mp4)

    def _run_group(self, group: list[ServeRequest], batch_size: int) -> list[dict[str, np.ndarray]]:
        first = group[0]
        together = len(group) > 1 and (self.decisions == "per-batch" or is_static(first.policy))
        if together:
            try:
                return self._run(group, batch_size)
            except UserError:
                pass  # some request in the group is bad (e.g. an unknown word): run each alone to find which
        return [self._run([r], batch_size)[0] for r in group]

    def _run(self, group: list[ServeRequest], batch_size: int) -> list[dict[str, np.ndarray]]:
        first = group[0]
        pipe = self.pipelines[first.plan]
        t0 = time.perf_counter()
        try:
            res = pipe([r.prompt for r in group], policy=first.policy, overrides=dict(first.overrides) or None,
                       seed=first.seed, seeds=[r.seed for r in group], steps=first.steps)
        except UserError as e:
            if len(group) > 1:
                raise
            return [self._bad(str(e))]
        except Exception as e:  # a bug, not a bad request: keep serving, log it in full
            self.stats.internal += len(group)
            LOG.exception("500 internal error while running %d request(s)", len(group))
            return [error_response(500, f"internal error: {type(e).__name__}: {e}")] * len(group)
        finally:
            pipe.clear_cache()  # FP reference runs are cached per prompt list; a server needs none kept
        seconds = time.perf_counter() - t0
        self.stats.forwards += 1
        self.stats.ok += len(group)
        return [self._response(r, res, k, len(group), batch_size, seconds) for k, r in enumerate(group)]

    def _response(self, r: ServeRequest, res: Any, k: int, run_batch: int, batch_size: int,
                  seconds: float) -> dict[str, np.ndarray]:
        from qc_compile.video_io import to_uint8_frames

        video = res.videos[k]
        units = [u for u in res.unit_names]
        trace = {
            "schema_version": TRACE_SCHEMA_VERSION,
            "model": res.settings.get("model"), "plan": r.plan, "quantized": res.settings.get("quantized"),
            "executor": res.executor, "device": res.settings.get("device"),
            "policy": res.policy, "overrides": dict(r.overrides), "seed": r.seed, "steps": res.settings.get("steps"),
            "frames": res.settings.get("frames"), "height": res.settings.get("height"),
            "width": res.settings.get("width"),
            "compute_fraction": res.compute_fraction, "flop_fraction": res.flop_fraction,
            "run_seconds": round(seconds, 4), "run_batch": run_batch, "triton_batch": batch_size,
            "decisions": "per-sample" if run_batch == 1 or is_static(res.policy) else "per-batch",
            "actions": [actions_string(s.decisions, units) for s in res.steps],
        }
        out = {"status": np.array([200], dtype=np.int32), "error": np.array([b""], dtype=np.object_),
               "frames": to_uint8_frames(video)[None],
               "trace": np.array([json.dumps(trace).encode()], dtype=np.object_)}
        if r.mp4:
            out["mp4"] = np.array([mp4_bytes(video, int(res.settings.get("fps") or 8))], dtype=np.object_)
        return out


def mp4_bytes(video: Any, fps: int) -> bytes:
    from qc_compile.video_io import write_mp4

    with tempfile.TemporaryDirectory(prefix="qc-serve-") as d:
        return Path(write_mp4(Path(d) / "video.mp4", video, fps=fps)).read_bytes()


def make_pipelines(work_or_model: str, *, device: str = "cpu", executor: str = "torch",
                   checkpoint: str | None = None, loader: Callable | None = None) -> dict[str, Any]:
    """{"plan": the work dir's pipeline (if it has a plan), "fp": the FP model on the same weights}."""
    from qc_compile.runtime import Pipeline

    if Path(work_or_model).is_dir():
        pipe = Pipeline(work_or_model, device=device, executor=executor)
        fp = Pipeline(None, device=device, loaded=pipe.loaded)
        return {"plan": pipe, "fp": fp} if pipe.quantized else {"fp": pipe}
    if executor != "torch":
        raise UserError(f"--executor {executor} runs a work dir's graphs; give WORK (a directory), not the model "
                        f"name {work_or_model!r}.")
    if Path(work_or_model).suffix or "/" in work_or_model:
        raise UserError(f"{work_or_model}: not a directory; give a work dir or a model name such as qc-ref.")
    return {"fp": Pipeline.from_pretrained(work_or_model, checkpoint, device=device)}
