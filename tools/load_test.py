"""Load test of `qc-compile serve` on loopback: throughput, latency percentiles, batching gain, lost/corrupted videos.

Starts the server itself (127.0.0.1, free ports), twice: one-at-a-time (``--max-batch 1``) and batched
(``--max-batch B``). For each, and each concurrency N in ``--concurrency``, N client threads send the same M requests
(request i: seed i, prompt i mod 3) and time every one. The reference is the one-at-a-time server at concurrency 1:
single-request runs of each seed. Every other response is compared with it: ``bit_identical`` counts exact uint8
matches; batched GEMMs round differently (~1e-5), so batched videos may differ by one level in a few pixels, which
``max_abs_diff``/``frac_pixels_diff`` show. ``lost`` counts requests without a 200 answer. Bounded: M requests per
level and ``--max-seconds`` overall (clients stop at the deadline); the servers are stopped with SIGTERM at the end.

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
                    results[i] = {"latency": time.perf_counter() - t0, "frames": r.frames, "trace": r.trace}
                except Exception as e:  # noqa: BLE001 - counted as lost
                    results[i] = {"latency": time.perf_counter() - t0, "error": str(e)[:300]}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - t0, "results": results}


def summarize(level: dict, reference: list[dict | None]) -> dict:
    res = level["results"]
    ok = [r for r in res if r is not None and "frames" in r]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    ident, maxdiff, frac = 0, 0, 0.0
    for r, ref in zip(res, reference):
        if r is None or "frames" not in r or ref is None or "frames" not in ref:
            continue
        if r["frames"].shape != ref["frames"].shape:
            maxdiff = 255
            continue
        d = np.abs(r["frames"].astype(np.int16) - ref["frames"].astype(np.int16))
        ident += int(d.max() == 0)
        maxdiff = max(maxdiff, int(d.max()))
        frac = max(frac, float((d > 0).mean()))
    batches = [r["trace"]["run_batch"] for r in ok]
    return {"requests": len(res), "ok": len(ok), "lost": len(res) - len(ok),
            "errors": sorted({r["error"] for r in res if r is not None and "error" in r})[:3],
            "wall_s": round(level["wall"], 3), "throughput_rps": round(len(ok) / level["wall"], 4),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
            "p99_s": round(float(np.percentile(lat, 99)), 3), "mean_run_batch": round(float(np.mean(batches)), 2)
            if batches else None, "bit_identical": ident, "max_abs_diff": maxdiff, "frac_pixels_diff": frac}


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
           "max_batch": args.max_batch, "commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "modes": {}}
    reference: list[dict | None] | None = None
    logdir = args.out.parent
    logdir.mkdir(parents=True, exist_ok=True)
    for mode, mb in (("one-at-a-time", 1), (f"batched (max {args.max_batch})", args.max_batch)):
        server = Server(args, mb, logdir / f"{args.out.stem}_server_batch{mb}.log")
        rows = []
        try:
            server.wait_ready(min(600.0, max(1.0, deadline - time.time())))
            for n in args.concurrency:
                if time.time() >= deadline:
                    print(f"deadline reached; skipping {mode} at concurrency {n}", file=sys.stderr)
                    break
                level = run_level(server.http, n, requests, args, deadline)
                if reference is None:  # one-at-a-time, first (lowest) concurrency: single-request runs
                    reference = level["results"]
                row = {"concurrency": n, **summarize(level, reference)}
                rows.append(row)
                print(f"{mode:>22} N={n:<3} ok {row['ok']}/{row['requests']}  {row['throughput_rps']:.3f} videos/s  "
                      f"p50 {row['p50_s']:.2f}s p95 {row['p95_s']:.2f}s p99 {row['p99_s']:.2f}s  "
                      f"batch {row['mean_run_batch']}  bit-identical {row['bit_identical']}/{row['requests']} "
                      f"(max diff {row['max_abs_diff']})", flush=True)
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
    out["one_at_a_time_bit_identical"] = all(r["bit_identical"] == r["requests"] for r in out["modes"]["one-at-a-time"])
    out["max_abs_diff_batched"] = max((r["max_abs_diff"] for r in batched), default=None)
    out["ok"] = (out["lost"] == 0 and out["one_at_a_time_bit_identical"] and (out["max_abs_diff_batched"] or 0) <= 1
                 and all(s["clean_stop"] and not s["traceback_in_log"] and s["exit_code"] == 0
                         for s in out["servers"].values()))
    args.out.write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, args.plot)
    print(f"batching gain (throughput batched / one-at-a-time) by concurrency: {out['batching_gain']}; "
          f"lost {out['lost']}; ok {out['ok']}; wrote {args.out}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
