"""`qc-compile serve`: a model or work dir behind Triton Inference Server (HTTP, gRPC, metrics), see docs/SERVE.md."""

from __future__ import annotations

import json
import logging
import sys

import click

import qc_compile.validate as V
from qc_compile.errors import UserError
from qc_compile.prompts import MAX_PROMPT_CHARS

DEFAULT_WARMUP = "a red circle moving left on a black background"


def _need_serve_extra() -> None:
    from importlib.util import find_spec

    missing = [m for m in ("pytriton", "tritonclient") if find_spec(m) is None]
    if missing:
        raise UserError(f"qc-compile serve needs the `serve` extra ({', '.join(missing)} not installed): "
                        'pip install -e ".[serve]" (Triton runs on Linux with glibc >= 2.35).')


@click.command("serve")
@click.argument("work_or_model")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--executor", default="torch", show_default=True,
              help="torch, onnxruntime or tensorrt (the latter two run a work dir's graphs/engines).")
@click.option("--checkpoint", default=None, help="Weights for a model name (default: the packaged ones).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--http-port", default=8000, show_default=True, type=V.PORT)
@click.option("--grpc-port", default=8001, show_default=True, type=V.PORT)
@click.option("--metrics-port", default=8002, show_default=True, type=V.PORT, help="Prometheus metrics (/metrics).")
@click.option("--max-batch", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Dynamic batching: most requests per batch (1 = one at a time).")
@click.option("--max-queue-delay-ms", default=50.0, show_default=True, type=V.FiniteFloat(0, 60000),
              help="How long the batcher waits to fill a batch.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="Bounded queue: requests beyond this are rejected at once.")
@click.option("--timeout-s", default=600.0, show_default=True, type=V.FiniteFloat(0.001, 86400),
              help="Requests waiting in the queue longer than this are rejected (clients may set their own).")
@click.option("--drain-timeout-s", default=120.0, show_default=True, type=V.FiniteFloat(0, 3600),
              help="On SIGTERM/SIGINT, how long to keep finishing queued and running requests.")
@click.option("--decisions", type=click.Choice(["per-sample", "per-batch"]), default="per-sample", show_default=True,
              help="per-sample: adaptive policies run each request alone (static ones batch); per-batch: batch all, "
                   "one decision per unit and step for the whole batch.")
@click.option("--steps", type=V.STEPS, default=None, help="Default steps for requests that give none.")
@click.option("--max-steps", default=100, show_default=True, type=V.STEPS, help="Largest steps accepted.")
@click.option("--max-prompt-chars", default=1000, show_default=True, type=V.BoundedInt(1, MAX_PROMPT_CHARS))
@click.option("--warmup-prompt", default=DEFAULT_WARMUP, show_default=True,
              help="Prompt of the warm-up generation that verifies the model before the server reports ready.")
@click.option("--log-verbose", default=0, show_default=True, type=click.IntRange(0, 3), help="Triton's log level.")
def serve(work_or_model: str, device: str, executor: str, checkpoint: str | None, host: str, http_port: int,
          grpc_port: int, metrics_port: int, max_batch: int, max_queue_delay_ms: float, max_queue: int,
          timeout_s: float, drain_timeout_s: float, decisions: str, steps: int | None, max_steps: int,
          max_prompt_chars: int, warmup_prompt: str, log_verbose: int) -> None:
    """Serve WORK_OR_MODEL (a work dir, or a model name such as qc-ref) as Triton model `qc_video`.

    Inputs: prompt, seed, steps, policy, thresholds (JSON of --set overrides), plan (plan|fp), mp4. Outputs: status,
    error, frames (T,H,W,3 uint8), mp4, trace (JSON). Ready once the model is verified and warmed up.
    """
    from qc_compile.prompts import check_prompt

    if steps is not None and steps > max_steps:
        raise UserError(f"--steps {steps} is larger than --max-steps {max_steps}.")
    warmup_prompt = check_prompt(warmup_prompt, "--warmup-prompt")
    _need_serve_extra()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    from qc_compile.serve.engine import ServeEngine, make_pipelines
    from qc_compile.serve.protocol import Limits
    from qc_compile.serve.server import ServerConfig, check_ports, serve as run_server, verify_and_warm

    cfg = ServerConfig(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                       max_batch=max_batch, max_queue_delay_ms=max_queue_delay_ms, max_queue=max_queue,
                       timeout_s=timeout_s, drain_timeout_s=drain_timeout_s, log_verbose=log_verbose)
    check_ports(cfg)  # before the (slow) model load
    pipes = make_pipelines(work_or_model, device=device, executor=executor, checkpoint=checkpoint)
    from qc_compile.runtime.policies import plan_policy_name

    default_policy = plan_policy_name(pipes["plan"].plan) if "plan" in pipes else None
    engine = ServeEngine(pipes, limits=Limits(max_steps=max_steps, max_prompt_chars=max_prompt_chars,
                                              default_steps=steps),
                         decisions=decisions, default_policy=default_policy)
    warm = verify_and_warm(engine, warmup_prompt)
    logging.getLogger("qc_compile.serve").info(
        "verified %s: plans %s, executor %s, device %s, warm-up seconds %s", work_or_model, sorted(pipes), executor,
        device, json.dumps(warm))
    run_server(engine, cfg)
