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
    ({"prompt": "a red circle\x1b[31m moving"}, "control character"),  # the CLI's prompt rules (prompts.py)
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


# ------------------------------------------------------------------------------------------------ the server itself
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _load_test_tool():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import load_test

    return load_test


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


@pytest.mark.slow
def test_server_serves_survives_bad_requests_and_shuts_down_cleanly(tmp_path: Path) -> None:
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    from qc_compile.serve.client import VideoClient

    load_test = _load_test_tool()

    http, grpc, metrics = _free_ports(3)
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "qc_compile.cli", "serve", "qc-ref", "--steps", "2", "--max-steps", "50",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--max-batch", "2", "--max-queue", "2", "--max-queue-delay-ms", "20", "--drain-timeout-s", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.time()
        while _get(f"http://127.0.0.1:{http}/v2/models/qc_video/ready")[0] != 200:  # what a load balancer checks
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 120, "server not ready after 120 s:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        assert _get(f"http://127.0.0.1:{http}/v2/health/live")[0] == 200
        assert _get(f"http://127.0.0.1:{http}/v2/health/ready")[0] == 200
        assert "verified qc-ref" in log.read_text()

        c = VideoClient(f"127.0.0.1:{http}", timeout_s=120)
        first = c.generate(PROMPTS[0], seed=5, mp4=True)
        assert first.frames.shape == (16, 32, 32, 3) and first.frames.dtype == np.uint8 and first.frames.std() > 1
        assert first.mp4[4:8] == b"ftyp" and first.trace["steps"] == 2 and first.trace["compute_fraction"] == 1.0

        # every bad request (tools/load_test.py's battery, also run on the GPU), clients that hang up mid-request, then
        # a good request: the same video as before. (Bad and good requests in one batch: test_load_test_tool_on_the_cpu;
        # this server's queue of 2 is too small for that part of the battery.)
        b = load_test.bad_request_battery(http, 50, timeout_s=120, good=(PROMPTS[0], 5))
        assert b["cases"] and not {k: c for k, c in b["cases"].items() if not c["ok"]}
        assert b["cases"]["steps <= 0"]["status"] == 400 and "between 1 and 50" in b["cases"]["steps <= 0"]["message"]
        assert np.array_equal(b["good"], first.frames)

        # bounded queue: a burst beyond batch (2) + queue (2) is turned away at once; the rest is served
        results: list = [None] * 8

        def one(k: int) -> None:
            try:
                with VideoClient(f"127.0.0.1:{http}", timeout_s=120) as ck:
                    results[k] = ck.generate(PROMPTS[k % 3], seed=k, steps=1).frames.shape
            except Exception as e:  # noqa: BLE001 - recorded and checked below
                results[k] = str(e)
        threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        rejected = [r for r in results if isinstance(r, str)]
        assert rejected and all("queue" in r.lower() for r in rejected), results
        assert results.count((16, 32, 32, 3)) == 8 - len(rejected)

        m = _get(f"http://127.0.0.1:{metrics}/metrics")
        assert m[0] == 200 and 'nv_inference_request_success{model="qc_video"' in m[1]

        again = VideoClient(f"grpc://127.0.0.1:{grpc}", timeout_s=120).generate(PROMPTS[0], seed=5)
        assert np.array_equal(again.frames, first.frames)  # after all of the above, the same video, over gRPC

        # graceful shutdown: a request in flight when SIGTERM arrives still gets its video
        late: dict = {}
        c.close()

        def in_flight() -> None:
            with VideoClient(f"127.0.0.1:{http}", timeout_s=120) as cl:  # tritonclient.http: one client per thread
                late["r"] = cl.generate(PROMPTS[2], seed=9, steps=3)
        t = threading.Thread(target=in_flight)
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert "r" in late and late["r"].frames.shape == (16, 32, 32, 3)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "stopped cleanly" in text and "Traceback" not in text, text[-4000:]
    assert re.search(r"\d+ bad", text)


@pytest.mark.slow
def test_load_test_tool_on_the_cpu(tmp_path: Path) -> None:
    """tools/load_test.py with small N and M: nothing lost, one-at-a-time bit-identical, servers stop cleanly."""
    pytest.importorskip("pytriton")
    load_test = _load_test_tool()

    out = tmp_path / "lt.json"
    rc = load_test.main(["qc-ref", "--steps", "1", "--concurrency", "1,2", "--requests", "2", "--max-batch", "2",
                         "--max-queue-delay-ms", "300", "--bad-requests", "--md", str(tmp_path / "lt.md"),
                         "--max-seconds", "300", "--out", str(out), "--plot", str(tmp_path / "lt.png")])
    r = json.loads(out.read_text())
    assert rc == 0 and r["ok"] and r["lost"] == 0 and r["one_at_a_time_bit_identical"], r
    assert set(r["batching_gain"]) == {"1", "2"} and (tmp_path / "lt.png").stat().st_size > 0
    assert r["bad_requests_ok"] and r["corrupted"] == 0
    assert "| batched (max 2) | 2 | 2/2 | 2 | 0 | 0 |" in (tmp_path / "lt.md").read_text()
    assert all(s["clean_stop"] and not s["traceback_in_log"] for s in r["servers"].values())
    batched = next(rows for mode, rows in r["modes"].items() if mode.startswith("batched"))
    assert max(row["mean_run_batch"] for row in batched) > 1  # two clients did get batched together
