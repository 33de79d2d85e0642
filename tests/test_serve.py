"""`qc-compile serve`: request checks, per-sample decisions under batching, and the server itself (Triton on the
CPU with qc-ref: good and bad requests, a client that disconnects, health/metrics, graceful shutdown)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from qc_compile.serve.client import request_arrays
from qc_compile.serve.protocol import BadRequest, Limits, parse_request

PROMPTS = ["a red circle moving left on a black background", "a blue square moving right on a navy background",
           "a green triangle moving up on a gray background"]
# HLC settings that make it skip units within 4 steps (as tests/test_run_cli.py does): decisions depend on the data.
ADAPTIVE = {"hlc.delta1": 0.5, "hlc.delta2": 1, "hlc.tail": 0, "hlc.warmup": 2}


def _req(prompt=PROMPTS[0], **kw) -> dict[str, np.ndarray]:
    return request_arrays(prompt, **kw)


@pytest.mark.parametrize("fields, words", [
    ({"steps": 0}, "between 1 and 100"),
    ({"steps": -5}, "between 1 and 100"),
    ({"steps": 10 ** 9}, "between 1 and 100"),
    ({"seed": -1}, "must be >= 0"),
    ({"policy": "hlc+warpdrive"}, "unknown policy 'warpdrive'"),
    ({"thresholds": "{hlc.tau: 0.1"}, "not valid JSON"),
    ({"thresholds": "[1, 2]"}, "expected a JSON object"),
    ({"thresholds": '{"hlc.tau": [1]}'}, "must map to a number"),
    ({"thresholds": '{"hlc.tau": NaN}'}, "must be finite"),
    ({"plan": "int3"}, "expected one of plan, fp"),
    ({"prompt": "x" * 5000}, "at most 1000"),
    ({"prompt": "   "}, "non-empty prompt"),
    ({"prompt": b"\xff\xfe"}, "not valid UTF-8"),
    ({"colour": "red"}, "unknown inputs"),
])
def test_bad_requests_are_rejected_with_a_clear_message(fields, words) -> None:
    prompt = fields.pop("prompt", PROMPTS[0])
    arrays = _req(prompt, **{k: v for k, v in fields.items() if k != "colour"})
    if "colour" in fields:
        arrays["colour"] = np.array([[b"red"]], dtype=np.object_)
    with pytest.raises(BadRequest, match=re.escape(words)):
        parse_request(arrays, Limits())


def test_good_request_is_parsed_at_its_defaults() -> None:
    r = parse_request(_req(thresholds='{"hlc.delta1": 0.5, "hlc.tail": 0}'), Limits(default_steps=7))
    assert (r.prompt, r.seed, r.steps, r.policy, r.plan, r.mp4) == (PROMPTS[0], 0, 7, None, None, False)
    assert r.overrides == (("hlc.delta1", 0.5), ("hlc.tail", 0))
    assert parse_request(_req(policy=" QuantCache "), Limits()).policy == "quantcache"


@pytest.fixture(scope="module")
def engine_factory():
    import torch

    from qc_compile.serve.engine import ServeEngine, make_pipelines

    torch.set_num_threads(1)
    pipes = make_pipelines("qc-ref")
    return lambda decisions="per-sample": ServeEngine(pipes, limits=Limits(default_steps=3), decisions=decisions)


def _ok(resp: dict) -> dict:
    assert int(resp["status"][0]) == 200, resp["error"][0]
    return json.loads(resp["trace"][0])


@pytest.mark.slow
def test_decisions_are_per_sample_under_batching(engine_factory) -> None:
    """A batch of three with an adaptive policy gives each request exactly the video and decisions it gets alone;
    a static policy runs as one batched forward with every sample's decisions unchanged."""
    eng = engine_factory()
    reqs = [_req(p, seed=10 + k, steps=4, policy="quantcache", thresholds=json.dumps(ADAPTIVE)) for k, p in
            enumerate(PROMPTS[:2])]
    batch = eng.infer(reqs)
    alone = [eng.infer([r])[0] for r in reqs]
    traces = [_ok(b) for b in batch]
    assert [t["run_batch"] for t in traces] == [1, 1] and {t["decisions"] for t in traces} == {"per-sample"}
    assert any("R" in "".join(t["actions"]) or "P" in "".join(t["actions"]) for t in traces), "policy never skipped"
    for b, a in zip(batch, alone):
        assert np.array_equal(b["frames"], a["frames"])
        assert json.loads(b["trace"][0])["actions"] == json.loads(a["trace"][0])["actions"]

    static = [_req(p, seed=20 + k, policy="interval") for k, p in enumerate(PROMPTS[:2])]
    sb = eng.infer(static)
    sa = [eng.infer([r])[0] for r in static]
    assert [_ok(r)["run_batch"] for r in sb] == [2, 2]
    for b, a in zip(sb, sa):
        assert _ok(b)["actions"] == _ok(a)["actions"] and "R" in "".join(_ok(b)["actions"])
        # batched GEMMs round differently (~1e-5 in float): at most a few pixels move by one uint8 level
        d = np.abs(b["frames"].astype(int) - a["frames"].astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 1e-3


def test_per_batch_mode_shares_decisions_and_says_so(engine_factory) -> None:
    eng = engine_factory("per-batch")
    reqs = [_req(p, seed=10 + k, steps=2, policy="quantcache", thresholds=json.dumps(ADAPTIVE)) for k, p in
            enumerate(PROMPTS[:2])]
    traces = [_ok(r) for r in eng.infer(reqs)]
    assert [t["run_batch"] for t in traces] == [2, 2] and {t["decisions"] for t in traces} == {"per-batch"}
    assert len({json.dumps(t["actions"]) for t in traces}) == 1


def test_a_bad_request_in_a_batch_fails_alone(engine_factory) -> None:
    eng = engine_factory()
    out = eng.infer([_req(PROMPTS[0], steps=2), _req("a purple circle moving left on a black background", steps=2),
                     _req(PROMPTS[1], steps=2, thresholds='{"interval.every": "often"}', policy="interval")])
    assert [int(o["status"][0]) for o in out] == [200, 400, 400]
    assert "purple" in out[1]["error"][0].decode() and "'every'" in out[2]["error"][0].decode()
    assert out[0]["frames"].shape == (1, 16, 32, 32, 3)
