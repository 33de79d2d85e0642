"""The process groups of one parallel run (world, CFG pairs, sequence groups), set up once per process.

``init_mesh(config)`` joins the default process group (NCCL on CUDA, gloo on the CPU; rendezvous from the usual
``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` / ``WORLD_SIZE``, as torchrun or :func:`..launch.launch` set them) and
makes the subgroups; :func:`current_mesh` is what the runtime asks (None: a single-process run). NVLink multicast
(NVLS) stays off: ``NCCL_NVLS_ENABLE=0`` unless the environment says otherwise.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from qc_compile.runtime.parallel.config import ParallelConfig


class CommTimer:
    """Time spent in collectives: CUDA events around each one on CUDA (read once, after a synchronise), wall clock
    on the CPU. Disabled, it costs nothing."""

    def __init__(self) -> None:
        self.enabled = False
        self._events: list[tuple[Any, Any]] = []
        self._cpu = 0.0

    @contextmanager
    def span(self):
        if not self.enabled:
            yield
            return
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self._events.append((a, b))
        else:
            t = time.perf_counter()
            yield
            self._cpu += time.perf_counter() - t

    def reset(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._events.clear()
        self._cpu = 0.0

    def seconds(self) -> float:
        """Total seconds in collectives since :meth:`reset` (synchronises the device)."""
        if self._events:
            torch.cuda.synchronize()
        return self._cpu + sum(a.elapsed_time(b) for a, b in self._events) / 1000.0


@dataclass
class Mesh:
    config: ParallelConfig
    rank: int
    world: Any  # the default group
    cfg_group: Any
    sp_group: Any
    device: torch.device
    timer: CommTimer = field(default_factory=CommTimer)

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.config.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.config.sp_size

    def describe(self) -> dict:
        return dict(self.config.describe(), backend=dist.get_backend(), device=str(self.device))

    def agree(self, digest: bytes) -> bool:
        """Whether every rank holds the same ``digest`` (e.g. a hash of all its decisions): one all_gather."""
        t = torch.tensor(list(digest), dtype=torch.uint8, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return all(bool(torch.equal(o, out[0])) for o in out)


_CURRENT: Mesh | None = None


def current_mesh() -> Mesh | None:
    """The mesh of this process, or None for a single-process run."""
    return _CURRENT


def init_mesh(config: ParallelConfig, rank: int, *, device: str = "cpu") -> Mesh:
    """Join the default group as ``rank`` of ``config.world_size`` and build the CFG / sequence subgroups (every
    rank creates every group, in the same order, as torch.distributed requires)."""
    global _CURRENT
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kw = {"device_id": dev} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=config.world_size, **kw)
    sp, cfg = config.sp_size, config.cfg_size
    sp_groups = [dist.new_group([c * sp + s for s in range(sp)]) for c in range(cfg)]
    cfg_groups = [dist.new_group([c * sp + s for c in range(cfg)]) for s in range(sp)]
    _CURRENT = Mesh(config, rank, dist.group.WORLD, cfg_groups[rank % sp], sp_groups[rank // sp], dev)
    return _CURRENT


def close_mesh() -> None:
    global _CURRENT
    _CURRENT = None
    if dist.is_initialized():
        dist.destroy_process_group()
