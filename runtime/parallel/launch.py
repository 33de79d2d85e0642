"""Start one parallel run on this host: ``launch(fn, args, config, device)`` runs ``fn(*args)`` in
``config.world_size`` processes (torch.multiprocessing, spawn), each in its mesh (:func:`~.mesh.init_mesh`).

Under torchrun (``WORLD_SIZE`` set in the environment) the processes exist already: this process joins the mesh
and runs ``fn`` itself. A :class:`~qc_compile.errors.UserError` in any rank ends the run with that message (exit
code 2 from the CLI), not a traceback per process. ``fn`` must be a module-level function (spawn imports it);
rank 0 writes the outputs, the other ranks return quietly.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from qc_compile.errors import UserError
from qc_compile.runtime.parallel.config import ParallelConfig
from qc_compile.runtime.parallel.mesh import close_mesh, init_mesh


def check_devices(config: ParallelConfig, device: str) -> None:
    """UserError unless this host can hold ``config`` on ``device``."""
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {config.world_size} --device {device}: this machine has no CUDA GPU visible to "
                            f"torch (torch {torch.__version__}); use --device cpu for a gloo run of the same code.")
        if device not in ("cuda", "cuda:0"):
            raise UserError(f"--gpus {config.world_size} uses GPUs 0..{config.world_size - 1} (set "
                            "CUDA_VISIBLE_DEVICES to choose them); give --device cuda, not {device!r}.")
        have = torch.cuda.device_count()
        if have < config.world_size:
            raise UserError(f"--gpus {config.world_size}: only {have} CUDA GPU(s) visible on this host.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, args: tuple, config: ParallelConfig, device: str, errdir: str) -> None:
    if not str(device).startswith("cuda"):  # gloo ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
    try:
        init_mesh(config, rank, device=device)
        fn(*args)
    except UserError as e:
        Path(errdir, f"{rank}.txt").write_text(str(e))
        sys.exit(2)
    finally:
        close_mesh()


def launch(fn: Callable, args: tuple = (), *, config: ParallelConfig, device: str = "cpu") -> Any:
    """Run ``fn(*args)`` on every rank of ``config`` (``fn(*args)`` here when the world is one process)."""
    if config.world_size == 1:
        return fn(*args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        if int(os.environ["WORLD_SIZE"]) != config.world_size:
            raise UserError(f"--gpus {config.world_size} under torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']}; "
                            "give torchrun --nproc-per-node equal to --gpus.")
        try:
            init_mesh(config, int(os.environ["RANK"]), device=device)
            return fn(*args)
        finally:
            close_mesh()
    check_devices(config, device)
    import torch.multiprocessing as mp

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="qc-parallel-") as errdir:
        try:
            mp.start_processes(_entry, args=(fn, args, config, device, errdir), nprocs=config.world_size,
                               join=True, start_method="spawn")
        except mp.ProcessExitedException as e:
            msgs = sorted(Path(errdir).glob("*.txt"))
            if msgs:
                raise UserError(msgs[0].read_text()) from None
            raise RuntimeError(f"parallel run failed: rank {e.error_index} exited with code {e.exit_code}") from None
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"parallel run failed on a rank:\n{e}") from None
    return None
