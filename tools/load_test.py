"""Load test of `qc-compile serve` on loopback: throughput, latency percentiles, batching gain, lost/corrupted videos.

Starts the server itself (127.0.0.1, free ports), twice: one-at-a-time (``--max-batch 1``) and batched
(``--max-batch B``). For each, and each concurrency N in ``--concurrency``, N client threads send the same M requests
(request i: seed i, prompt i mod 3) and time every one. The reference is the one-at-a-time server at concurrency 1:
single-request runs of each seed. Every other response is compared with it: ``bit_identical`` counts exact uint8
matches; batched GEMMs round differently (~1e-5), so batched videos may differ by one level in a few pixels, which
``max_abs_diff``/``frac_pixels_diff`` show. ``lost`` counts requests without a 200 answer. Bounded: M requests per
level and ``--max-seconds`` overall, shared equally by the two servers (clients stop at the deadline, levels after it
are skipped); the servers are stopped with SIGTERM at the end.
With ``--bad-requests`` each server first gets the bad-request battery (:func:`bad_request_battery`: every kind of bad
request, clients that hang up mid-request, then a good request that must match the single-request video); each server
log is checked for a traceback. ``--md`` writes the results as a markdown table (with device and commit).

    python tools/load_test.py qc-ref --steps 2 --concurrency 1,2 --requests 4 --out /tmp/lt.json        # CPU, seconds
    python tools/load_test.py qc-ref --device cuda --steps 30 --concurrency 1,2,4,8,16 --requests 64 \\
        --max-batch 8 --out tools/results/load_test_h100.json --plot tools/results/load_test_h100.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

PROMPTS = ["a red circle moving left on a black background", "a blue square moving right on a navy background",
           "a green triangle moving up on a gray background"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def bad_requests(max_steps: int) -> dict[str, tuple[dict, str]]:
    """Requests the server itself must reject with status 400: name -> (fields for VideoClient.generate, words the
    error message must contain)."""
    return {
        "unknown policy word": ({"policy": "quantcache+turbo"}, "unknown policy 'turbo'"),
        "unknown prompt word": ({"prompt": "a red circle dancing left on a black background"}, "'dancing'"),
        "huge prompt": ({"prompt": "a red circle " * 100_000}, "at most 1000"),
        "steps <= 0": ({"steps": 0}, f"between 1 and {max_steps}"),
        "absurd steps": ({"steps": 2 ** 31 - 1}, f"between 1 and {max_steps}"),
        "malformed thresholds": ({"thresholds": '{"hlc.delta1": 0.5,'}, "not valid JSON"),
        "thresholds of unknown parameter": ({"policy": "hlc", "thresholds": '{"hlc.speed": 2}'}, "'speed'"),
        "plan without a plan": ({"plan": "plan"}, "not available"),
    }


def wrong_types() -> dict[str, dict[str, np.ndarray]]:
    """Requests Triton itself must reject (wrong datatype or shape) before Python sees them."""
    return {"seed as FP32": {"seed": np.array([[1.5]], dtype=np.float32)},
            "steps as BYTES": {"steps": np.array([[b"two"]], dtype=np.object_)},
            "two prompts in one request": {"prompt": np.array([[b"a", b"b"]], dtype=np.object_)}}


def raw_http(port: int, body: bytes, send: int | None = None) -> None:
    """A client that sends (part of) an infer request and hangs up without reading the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        head = (f"POST /v2/models/qc_video/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        s.sendall(head + body[:send])


def bad_request_battery(port: int, max_steps: int, *, timeout_s: float = 600.0, mixed_batch: bool = False,
                        good: tuple[str, int] = (PROMPTS[0], 0), policy: str | None = None) -> dict:
    """Send every bad request (and two clients that hang up mid-request), then the ``good`` one, which must succeed.

    Returns ``{"cases": {name: {"ok": bool, ...}}, "good": frames or None}``. With ``mixed_batch`` two bad and two
    good requests are also sent at once, so a batching server gets them in one batch: the bad ones must fail alone.
    """
    from tritonclient.utils import InferenceServerException

    from qc_compile.serve.client import ServeError, VideoClient, request_arrays

    cases: dict[str, dict] = {}
    with VideoClient(f"127.0.0.1:{port}", timeout_s=timeout_s) as c:
        for name, (fields, words) in bad_requests(max_steps).items():
            fields = dict(fields)
            try:
                c.generate(fields.pop("prompt", PROMPTS[0]), **fields)
                cases[name] = {"ok": False, "got": "status 200 and a video"}
            except ServeError as e:
                cases[name] = {"ok": e.status == 400 and words in e.message, "status": e.status,
                               "message": e.message[:300]}
            except Exception as e:  # noqa: BLE001 - recorded as a failed case
                cases[name] = {"ok": False, "got": f"{type(e).__name__}: {e}"[:300]}
        for name, over in wrong_types().items():
            try:
                c.infer_raw({**request_arrays(PROMPTS[0], seed=1), **over})
                cases[name] = {"ok": False, "got": "accepted"}
            except InferenceServerException as e:
                cases[name] = {"ok": True, "status": e.status(), "message": str(e.message())[:300]}
            except Exception as e:  # noqa: BLE001
                cases[name] = {"ok": False, "got": f"{type(e).__name__}: {e}"[:300]}
        body = json.dumps({"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": [PROMPTS[1]]},
                                      {"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [7]}]}).encode()
        for name, send in (("client hangs up after sending a request", None),
                           ("client hangs up halfway through sending", 40)):
            try:
                raw_http(port, body, send)
                cases[name] = {"ok": True, "note": "judged by the good request after it and the server log"}
            except OSError as e:
                cases[name] = {"ok": False, "got": f"{type(e).__name__}: {e}"}
    if mixed_batch:
        mixed = [(PROMPTS[1], {"seed": 1}, 200), ("a red circle dancing left on a black background", {}, 400),
                 (PROMPTS[2], {"seed": 2}, 200), (PROMPTS[0], {"policy": "hlc+warpdrive"}, 400)]
        got: list = [None] * len(mixed)

        def one(k: int) -> None:
            prompt, fields, _ = mixed[k]
            try:
                with VideoClient(f"127.0.0.1:{port}", timeout_s=timeout_s) as ck:  # one client per thread (http)
                    r = ck.generate(prompt, **fields)
                    got[k] = (200, r.trace.get("triton_batch"))
            except ServeError as e:
                got[k] = (e.status, None)
            except Exception as e:  # noqa: BLE001
                got[k] = (f"{type(e).__name__}: {e}"[:200], None)
        threads = [threading.Thread(target=one, args=(k,)) for k in range(len(mixed))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cases["bad and good requests sent at once"] = {
            "ok": [g[0] for g in got] == [m[2] for m in mixed], "statuses": [g[0] for g in got],
            "triton_batch_of_good": [g[1] for g in got if g[0] == 200]}
    frames = None
    try:
        with VideoClient(f"127.0.0.1:{port}", timeout_s=timeout_s) as c:
            frames = c.generate(good[0], seed=good[1], policy=policy).frames
        cases["good request after the bad ones"] = {"ok": True}
    except Exception as e:  # noqa: BLE001
        cases["good request after the bad ones"] = {"ok": False, "got": f"{type(e).__name__}: {e}"[:300]}
    return {"cases": cases, "good": frames}


class Server:
    """`qc-compile serve` in a subprocess on loopback; stopped with SIGTERM (drain) on exit."""

    def __init__(self, args: argparse.Namespace, max_batch: int, log: Path) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        cmd = [sys.executable, "-m", "qc_compile.cli", "serve", args.target, "--host", "127.0.0.1",
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               "--device", args.device, "--executor", args.executor, "--steps", str(args.steps),
               "--max-batch", str(max_batch), "--max-queue", str(max(64, 2 * max(args.concurrency))),
               "--max-queue-delay-ms", str(args.max_queue_delay_ms), "--decisions", args.decisions,
               "--max-steps", str(max(100, args.steps))]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; log:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/models/qc_video/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"server not ready after {timeout_s:.0f} s; log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


def run_level(port: int, n_clients: int, requests: list[tuple[str, int]], args, deadline: float) -> dict:
    """N threads share the request list; returns per-request latency, frames and trace."""
    from qc_compile.serve.client import VideoClient

    results: list[dict | None] = [None] * len(requests)
    nxt = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        with VideoClient(f"127.0.0.1:{port}", timeout_s=args.request_timeout_s) as c:
            while time.time() < deadline:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                prompt, seed = requests[i]
                t0 = time.perf_counter()
                try:
                    r = c.generate(prompt, seed=seed, policy=args.policy)
                    results[i] = {"latency": time.perf_counter() - t0, "frames": r.frames, "trace": r.trace,
                                  "seed": seed}
                except Exception as e:  # noqa: BLE001 - counted as lost
                    results[i] = {"latency": time.perf_counter() - t0, "error": str(e)[:300]}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - t0, "results": results}


def frame_diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(largest uint8 difference, fraction of values that differ); 255 and 1.0 when the shapes differ."""
    if a.shape != b.shape:
        return 255, 1.0
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float((d > 0).mean())


def summarize(level: dict, reference: list[dict | None], corrupt_levels: int = 8) -> dict:
    """One row of the table. ``corrupted``: answered with another seed than asked, or a video that differs from the
    single-request video of its seed by more than ``corrupt_levels`` uint8 levels somewhere (batched rounding moves a
    few pixels by about one level; a wrong or damaged video moves many by far more)."""
    res = level["results"]
    ok = [r for r in res if r is not None and "frames" in r]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    ident, maxdiff, frac, corrupted, unchecked = 0, 0, 0.0, 0, 0
    for r, ref in zip(res, reference):
        if r is None or "frames" not in r:
            continue
        if ref is None or "frames" not in ref:
            unchecked += 1
            continue
        dmax, dfrac = frame_diff(r["frames"], ref["frames"])
        ident += int(dmax == 0)
        maxdiff = max(maxdiff, dmax)
        frac = max(frac, dfrac)
        corrupted += int(dmax > corrupt_levels or r["trace"].get("seed") != r["seed"])
    batches = [r["trace"]["run_batch"] for r in ok]
    sent = sum(r is not None for r in res)  # clients stop sending at the deadline
    return {"requests": len(res), "sent": sent, "ok": len(ok), "lost": sent - len(ok),
            "errors": sorted({r["error"] for r in res if r is not None and "error" in r})[:3],
            "wall_s": round(level["wall"], 3), "throughput_rps": round(len(ok) / level["wall"], 4),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3), "mean_run_batch": round(float(np.mean(batches)), 2)
            if batches else None, "bit_identical": ident, "max_abs_diff": maxdiff, "frac_pixels_diff": frac,
            "corrupted": corrupted, "unchecked": unchecked}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in out["modes"].items():
        n = [r["concurrency"] for r in rows]
        a.plot(n, [r["p50_s"] for r in rows], "o-", label=f"{mode} p50")
        a.plot(n, [r["p95_s"] for r in rows], "s--", label=f"{mode} p95")
        b.plot(n, [r["throughput_rps"] for r in rows], "o-", label=mode)
    a.set(xlabel="concurrent clients", ylabel="latency (s)", xscale="log", title="latency vs concurrency")
    b.set(xlabel="concurrent clients", ylabel="videos / s", xscale="log", title="throughput")
    levels = sorted({r["concurrency"] for rows in out["modes"].values() for r in rows})
    for ax in (a, b):
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"qc-compile serve load test: {out['target']}, {out['steps']} steps, {out['device_name']}, "
                 f"commit {out['commit']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_md(out: dict, path: Path, plot_path: Path | None = None) -> None:
    """The results as markdown: header (device, commit), one table row per mode and concurrency, the battery."""
    lines = [f"# qc-compile serve load test: {out['target']} on {out['device_name']}", "",
             f"commit `{out['commit']}`, {out['date']}; device `{out['device']}`, executor {out['executor']}, "
             f"{out['steps']} steps, policy {out['policy'] or 'default'}, decisions {out['decisions']}; "
             f"{out['requests_per_level']} requests per level (request i: seed i), batched server max batch "
             f"{out['max_batch']}.", "",
             "| mode | clients | sent | ok | lost | corrupted | videos/s | p50 s | p95 s | p99 s | mean run batch | "
             "bit-identical to single | max diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, rows in out["modes"].items():
        for r in rows:
            lines.append(f"| {mode} | {r['concurrency']} | {r.get('sent', r['requests'])}/{r['requests']} | "
                         f"{r['ok']} | {r['lost']} | "
                         f"{r['corrupted']} | "
                         f"{r['throughput_rps']:.3f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['p99_s']:.3f} | "
                         f"{r['mean_run_batch']} | {r['bit_identical']}/{r['requests']} | {r['max_abs_diff']} |")
    gain = ", ".join(f"{n} clients {g:.2f}x" for n, g in out["batching_gain"].items())
    lines += ["", f"Batching gain (throughput batched / one-at-a-time): {gain or 'n/a'}.",
              f"Not sent (time bound) {out['not_sent']}, lost {out['lost']}, corrupted {out['corrupted']} (a wrong seed, or more than {out['corrupt_levels']} "
              f"levels from the single-request video), unchecked {out['unchecked']}; largest batched difference "
              f"{out['max_abs_diff_batched']} levels.", ""]
    for mode, s in out["servers"].items():
        lines.append(f"* server {mode}: exit code {s['exit_code']}, stopped cleanly {s['clean_stop']}, "
                     f"traceback in log {s['traceback_in_log']} (`{s['log']}`)")
    if "bad_requests" in out:
        lines += ["", "| bad-request case | " + " | ".join(out["bad_requests"]) + " |",
                  "|---|" + "---|" * len(out["bad_requests"])]
        names = list(dict.fromkeys(n for cases in out["bad_requests"].values() for n in cases))
        for n in names:
            cells = []
            for cases in out["bad_requests"].values():
                c = cases.get(n)
                cells.append("-" if c is None else ("ok" if c["ok"] else "FAILED") +
                             (f" ({c['status']})" if "status" in c else ""))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if plot_path:
        lines += ["", f"![latency vs concurrency]({plot_path.name})"]
    lines += ["", f"**ok: {out['ok']}**", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (unavailable)"
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", nargs="?", default="qc-ref", help="work dir or model name (default qc-ref)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--executor", default="torch")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--policy", default=None, help="default: the plan's policy, else none")
    ap.add_argument("--decisions", default="per-sample", choices=["per-sample", "per-batch"])
    ap.add_argument("--concurrency", default="1,2", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=4, help="requests per concurrency level (M)")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-queue-delay-ms", type=float, default=20.0)
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="overall bound; clients stop at the deadline")
    ap.add_argument("--request-timeout-s", type=float, default=600.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--bad-requests", action="store_true",
                    help="send the bad-request battery to each server before the load (see bad_request_battery)")
    ap.add_argument("--corrupt-levels", type=int, default=8,
                    help="a video differing from its single-request run by more than this many uint8 levels counts "
                         "as corrupted")
    ap.add_argument("--md", type=Path, default=None, help="also write the results as a markdown table here")
    args = ap.parse_args(argv)
    args.concurrency = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    if args.requests < 1 or args.requests > 10_000 or not args.concurrency or min(args.concurrency) < 1 \
            or max(args.concurrency) > 256:
        ap.error("need 1 <= --requests <= 10000 and concurrency levels in 1..256")
    deadline = time.time() + args.max_seconds
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent).stdout.strip() or "unknown"
    requests = [(PROMPTS[i % len(PROMPTS)], i) for i in range(args.requests)]
    out = {"what": "qc-compile serve load test on loopback", "target": args.target, "device": args.device,
           "device_name": device_name(args.device), "executor": args.executor, "steps": args.steps,
           "policy": args.policy, "decisions": args.decisions, "requests_per_level": args.requests,
           "max_batch": args.max_batch, "commit": commit, "corrupt_levels": args.corrupt_levels,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "modes": {}}
    reference: list[dict | None] | None = None
    battery_good: dict[str, np.ndarray | None] = {}
    logdir = args.out.parent
    logdir.mkdir(parents=True, exist_ok=True)
    modes = (("one-at-a-time", 1), (f"batched (max {args.max_batch})", args.max_batch))
    for k, (mode, mb) in enumerate(modes):
        # each mode gets an equal share of the time left, so a slow one-at-a-time server cannot starve the batched one
        mode_deadline = time.time() + max(0.0, deadline - time.time()) / (len(modes) - k)
        server = Server(args, mb, logdir / f"{args.out.stem}_server_batch{mb}.log")
        rows = []
        try:
            server.wait_ready(600.0)  # bounded on its own: a server that loads is ready in well under a minute
            if args.bad_requests:
                b = bad_request_battery(server.http, max(100, args.steps), timeout_s=args.request_timeout_s,
                                        mixed_batch=mb > 1, good=requests[0], policy=args.policy)
                battery_good[mode] = b["good"]
                out.setdefault("bad_requests", {})[mode] = b["cases"]
                failed = [k for k, v in b["cases"].items() if not v["ok"]]
                print(f"{mode:>22} bad-request battery: {len(b['cases']) - len(failed)}/{len(b['cases'])} as "
                      f"expected{'; FAILED: ' + ', '.join(failed) if failed else ''}", flush=True)
            for n in args.concurrency:
                if time.time() >= mode_deadline:
                    print(f"deadline reached; skipping {mode} at concurrency {n}", file=sys.stderr)
                    break
                level = run_level(server.http, n, requests, args, mode_deadline)
                if reference is None:  # one-at-a-time, first (lowest) concurrency: single-request runs
                    reference = level["results"]
                row = {"concurrency": n, **summarize(level, reference, args.corrupt_levels)}
                rows.append(row)
                print(f"{mode:>22} N={n:<3} ok {row['ok']}/{row['requests']}  {row['throughput_rps']:.3f} videos/s  "
                      f"p50 {row['p50_s']:.2f}s p95 {row['p95_s']:.2f}s p99 {row['p99_s']:.2f}s  "
                      f"batch {row['mean_run_batch']}  bit-identical {row['bit_identical']}/{row['requests']} "
                      f"(max diff {row['max_abs_diff']}) corrupted {row['corrupted']}", flush=True)
        finally:
            rc = server.stop()
        log = server.log.read_text(errors="replace")
        out["modes"][mode] = rows
        out.setdefault("servers", {})[mode] = {"exit_code": rc, "clean_stop": "stopped cleanly" in log,
                                               "traceback_in_log": "Traceback" in log, "log": server.log.name}
    base = {r["concurrency"]: r for r in out["modes"]["one-at-a-time"]}
    batched = out["modes"][f"batched (max {args.max_batch})"]
    out["batching_gain"] = {str(r["concurrency"]): round(r["throughput_rps"] / base[r["concurrency"]]["throughput_rps"], 3)
                            for r in batched if r["concurrency"] in base and base[r["concurrency"]]["throughput_rps"]}
    all_rows = [r for rows in out["modes"].values() for r in rows]
    out["lost"] = sum(r["lost"] for r in all_rows)
    out["corrupted"] = sum(r["corrupted"] for r in all_rows)
    out["not_sent"] = sum(r["requests"] - r["sent"] for r in all_rows)  # cut by --max-seconds
    out["unchecked"] = sum(r["unchecked"] for r in all_rows)
    if args.bad_requests:  # the good request after each battery: the single-request video of seed 0
        ref0 = reference[0] if reference else None
        for mode, frames in battery_good.items():
            case = out["bad_requests"][mode]["good request after the bad ones"]
            if frames is not None and ref0 is not None and "frames" in ref0:
                case["max_abs_diff_vs_single"] = frame_diff(frames, ref0["frames"])[0]
                case["ok"] = case["ok"] and case["max_abs_diff_vs_single"] == 0
        out["bad_requests_ok"] = all(c["ok"] for cases in out["bad_requests"].values() for c in cases.values())
    out["one_at_a_time_bit_identical"] = all(r["bit_identical"] == r["requests"] for r in out["modes"]["one-at-a-time"])
    out["max_abs_diff_batched"] = max((r["max_abs_diff"] for r in batched), default=None)
    out["ok"] = (out["lost"] == 0 and out["corrupted"] == 0 and out["unchecked"] == 0 and out["not_sent"] == 0
                 and out["one_at_a_time_bit_identical"] and (out["max_abs_diff_batched"] or 0) <= 1
                 and out.get("bad_requests_ok", True)
                 and all(s["clean_stop"] and not s["traceback_in_log"] and s["exit_code"] == 0
                         for s in out["servers"].values()))
    args.out.write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, args.plot)
    if args.md:
        write_md(out, args.md, args.plot)
    print(f"batching gain (throughput batched / one-at-a-time) by concurrency: {out['batching_gain']}; "
          f"lost {out['lost']}; ok {out['ok']}; wrote {args.out}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
