"""``--gpus N`` / ``--parallel MODE`` for the commands that make videos (generate, run, sweep; serve can take the same
two options and :func:`on_gpus`): one video split over N processes on this host (GPUs with --device cuda, gloo
processes with --device cpu), rank 0 writing the outputs."""

from __future__ import annotations

from typing import Any, Callable

import click

from qc_compile.runtime.parallel.config import MODES


def gpu_options(fn: Callable) -> Callable:
    fn = click.option("--parallel", "parallel_mode", type=click.Choice(MODES), default="auto", show_default=True,
                      help="How --gpus splits a video: cfg (the two CFG branches, exactly 2 GPUs), sequence "
                           "(STDiT3 tokens over all N), auto (CFG when N is even, tokens over the rest).")(fn)
    return click.option("--gpus", type=int, default=1, show_default=True,
                        help="Processes one video is split over, on this host: GPUs 0..N-1 with --device cuda, "
                             "gloo processes with --device cpu. Rank 0 writes the outputs.")(fn)


def on_gpus(body: Callable[..., Any], kwargs: dict, gpus: int, mode: str, device: str) -> Any:
    """``body(**kwargs)`` in this process (``--gpus 1``) or on every rank of the parallel run."""
    from qc_compile.runtime.generation import resolve_device
    from qc_compile.runtime.parallel import ParallelConfig, launch

    config = ParallelConfig.for_gpus(gpus, mode)
    if config.world_size == 1:
        return body(**kwargs)
    device = resolve_device(device)
    return launch(_call, (body, kwargs), config=config, device=device)


def _call(body: Callable[..., Any], kwargs: dict) -> Any:
    return body(**kwargs)
