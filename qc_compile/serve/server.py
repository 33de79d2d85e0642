"""Triton Inference Server (through PyTriton) around a :class:`~qc_compile.serve.engine.ServeEngine`.

Order of events: load + verify (the pipelines check the model digest, plan and graph/engine sha256 records as they
load) -> one warm-up generation per plan choice -> Triton starts, so its ``/v2/health/ready`` only answers once the
model is verified -> serve -> on SIGTERM/SIGINT drain (finish every request that reaches the model until it has been
idle for a moment, bounded by ``drain_timeout_s``) -> stop Triton.
"""

from __future__ import annotations

import logging
import os
import signal
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qc_compile.errors import UserError
from qc_compile.serve.engine import ServeEngine
from qc_compile.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS

LOG = logging.getLogger("qc_compile.serve")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 4
    max_queue_delay_ms: float = 50.0
    max_queue: int = 64
    timeout_s: float = 600.0  # a request waiting in the queue longer than this is rejected (clients may override)
    drain_timeout_s: float = 120.0
    log_verbose: int = 0


def python_backend_env() -> None:
    """Point Triton's Python backend stub at this interpreter's libpython.

    PyTriton's stub links ``libpython3.X.so``; the dynamic linker finds the system one first (e.g. Debian's
    /lib/x86_64-linux-gnu) when this Python is another build (pyenv, conda), and the stub then fails with
    ``ModuleNotFoundError: No module named 'numpy'``. Putting this interpreter's LIBDIR first fixes it.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        if libdir not in parts:
            os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *parts])


def triton_tensors():
    from pytriton.model_config import Tensor

    inputs = [Tensor(name=n, dtype=dt, shape=sh, optional=opt) for n, (dt, sh, opt) in INPUTS.items()]
    outputs = [Tensor(name=n, dtype=dt, shape=sh) for n, (dt, sh) in OUTPUTS.items()]
    return inputs, outputs


def model_config(cfg: ServerConfig):
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, TimeoutAction

    queue = QueuePolicy(timeout_action=TimeoutAction.REJECT, default_timeout_microseconds=int(cfg.timeout_s * 1e6),
                        allow_timeout_override=True, max_queue_size=cfg.max_queue)
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(cfg.max_queue_delay_ms * 1000),
                             default_queue_policy=queue)
    return ModelConfig(batching=True, max_batch_size=cfg.max_batch, batcher=batcher)


def check_ports(cfg: ServerConfig) -> None:
    import socket

    ports = {"--http-port": cfg.http_port, "--grpc-port": cfg.grpc_port, "--metrics-port": cfg.metrics_port}
    if len(set(ports.values())) != 3:
        raise UserError(f"the HTTP, gRPC and metrics ports must differ, got {ports}.")
    for opt, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((cfg.host, port))
            except OSError as e:
                raise UserError(f"{opt} {port}: cannot listen on {cfg.host}:{port} ({e.strerror}); pick a free port "
                                "or stop what is using it.") from None


def serve(engine: ServeEngine, cfg: ServerConfig, *, on_ready: Callable[[], None] | None = None,
          stop_event: threading.Event | None = None) -> dict[str, Any]:
    """Run Triton until SIGTERM/SIGINT (or ``stop_event``), then drain and stop. Returns the engine statistics."""
    python_backend_env()
    check_ports(cfg)
    from pytriton.triton import Triton, TritonConfig

    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: (LOG.info("signal %d: draining", signum), stop.set()))

    def infer(requests):
        return engine.infer([dict(r.items()) for r in requests])

    tcfg = TritonConfig(http_address=cfg.host, http_port=cfg.http_port, grpc_address=cfg.host,
                        grpc_port=cfg.grpc_port, metrics_port=cfg.metrics_port, metrics_address=cfg.host,
                        allow_metrics=True, allow_gpu_metrics=False, log_verbose=cfg.log_verbose,
                        exit_timeout_secs=int(cfg.drain_timeout_s))
    inputs, outputs = triton_tensors()
    triton = Triton(config=tcfg)
    try:
        triton.bind(model_name=MODEL_NAME, infer_func=infer, inputs=inputs, outputs=outputs,
                    config=model_config(cfg), strict=False)
        triton.run()
        LOG.info("ready: model %s on http://%s:%d, grpc %s:%d, metrics http://%s:%d/metrics", MODEL_NAME, cfg.host,
                 cfg.http_port, cfg.host, cfg.grpc_port, cfg.host, cfg.metrics_port)
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            if not triton.is_alive():
                raise UserError("Triton Inference Server stopped unexpectedly; see its log above.")
        drain(engine, cfg)
    finally:
        triton.stop()
    s = engine.stats
    LOG.info("stopped cleanly: %d request(s) in %d batch(es): %d ok, %d bad, %d internal errors; batch sizes %s",
             s.requests, s.batches, s.ok, s.bad, s.internal, dict(sorted(s.batch_sizes.items())))
    return {"requests": s.requests, "batches": s.batches, "ok": s.ok, "bad": s.bad, "internal": s.internal,
            "forwards": s.forwards, "batch_sizes": s.batch_sizes}


def drain(engine: ServeEngine, cfg: ServerConfig) -> None:
    """Finish what is running and what is queued: wait until the model has been idle for longer than the batcher's
    delay (plus a margin), at most ``drain_timeout_s``; after that, answer 503 to anything still arriving."""
    quiet = cfg.max_queue_delay_ms / 1000 + 1.0
    deadline = time.monotonic() + cfg.drain_timeout_s
    while time.monotonic() < deadline:
        if engine.in_flight() == 0 and engine.idle_for() >= quiet:
            break
        time.sleep(0.1)
    else:
        LOG.warning("drain: still busy after %.0f s; rejecting what is left", cfg.drain_timeout_s)
    engine.draining = True
    LOG.info("drained: no request in flight")


def verify_and_warm(engine: ServeEngine, prompt: str, steps: int = 1) -> dict[str, Any]:
    """One generation per plan choice before the server starts: loads (and so verifies) every executor the requests
    will use. Raises UserError if any fails."""
    out: dict[str, Any] = {}
    for plan in engine.pipelines:
        req = {"prompt": np.array([prompt.encode()], dtype=np.object_), "steps": np.array([steps], dtype=np.int32),
               "plan": np.array([plan.encode()], dtype=np.object_)}
        t0 = time.perf_counter()
        resp = engine.infer([req])[0]
        if int(resp["status"][0]) != 200:
            raise UserError(f"warm-up generation with plan {plan!r} failed: {resp['error'][0].decode()} (set "
                            "--warmup-prompt to a prompt this model accepts).")
        out[plan] = round(time.perf_counter() - t0, 3)
    engine.stats.__init__()  # the warm-up is not a served request
    return out
