"""One video over several GPUs (or gloo processes on the CPU): CFG parallel x Open-Sora-style dynamic sequence
parallel, with the step executor's statistics combined over ranks so that every rank takes the same decisions.

* :class:`ParallelConfig` — ``cfg_parallel`` (the [cond; null] halves on two groups) and ``sp_size`` (STDiT3 tokens
  split over that many ranks); ``ParallelConfig.for_gpus(N, mode)`` is ``--gpus N --parallel MODE``.
* :func:`launch` — run a function on every rank of a config on this host (spawn; torchrun works too).
* :func:`current_mesh` — the process groups of this process (None: single process).
* :func:`shard_runner` — a unit runner wrapped for the current mesh (:class:`ShardedRunner`); the step executor picks
  up its ``reducer``. :class:`~qc_compile.runtime.pipeline.Pipeline` and ``generate`` do this for you.

Serving: one server process group per GPU group (a later ``qc-compile serve --gpus N`` launches its workers with
:func:`launch`; rank 0 takes requests and every rank runs the same ``Pipeline`` call).
"""

from qc_compile.runtime.parallel.config import MODES, ParallelConfig
from qc_compile.runtime.parallel.launch import check_devices, launch
from qc_compile.runtime.parallel.mesh import CommTimer, Mesh, close_mesh, current_mesh, init_mesh
from qc_compile.runtime.parallel.runner import GroupReducer, ShardedRunner, shard_runner

__all__ = ["MODES", "ParallelConfig", "launch", "check_devices", "current_mesh", "init_mesh", "close_mesh", "Mesh",
           "CommTimer", "GroupReducer", "ShardedRunner", "shard_runner", "is_rank0"]


def is_rank0() -> bool:
    """True in a single-process run and on rank 0 of a parallel one (the rank that writes outputs)."""
    m = current_mesh()
    return m is None or m.rank == 0
