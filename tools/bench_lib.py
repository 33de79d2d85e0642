"""Pieces the speed benchmarks share (tools/bench_e2e.py, bench_units.py, bench_request.py): the XL model and inputs,
the baselines as the sampler's executors, decision-grid replay, timing/memory meters and kernel classes.

The baselines are built to carry no work our path skips (DESIGN.md §7): :class:`PlainExecutor` runs the model's own
``STDiT3.forward`` (packed captions, as Open-Sora runs it) and hands the sampler a constant all-NaN statistics
tensor made once, so it writes no statistics and adds no per-unit Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

XL_FRAMES, XL_HEIGHT, XL_WIDTH = 51, 480, 853  # 480p 9:16 -> latent 15 x 60 x 106 -> 15 x 30 x 53 tokens
BLOCK_PREFIXES = ("spatial_blocks.", "temporal_blocks.")


# ------------------------------------------------------------------------------------------------ provenance
def commit(given: str | None = None) -> str:
    """``given``, else QC_COMMIT (the GPU machine's copy has no .git), else git HEAD of this checkout."""
    if given:
        return given
    if os.environ.get("QC_COMMIT"):
        return os.environ["QC_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env(given_commit: str | None = None) -> dict:
    """device, torch, triton, commit, date (+ python, cuda, torchao where present)."""
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    d = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu"),
         "torch": torch.__version__, "triton": triton_v, "commit": commit(given_commit),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "python": platform.python_version()}
    if torch.cuda.is_available():
        d["cuda"] = torch.version.cuda
    try:
        import importlib.metadata as md

        d["torchao"] = md.version("torchao")
    except Exception:  # noqa: BLE001  (not installed)
        d["torchao"] = None
    return d


_env = env  # the name tools/bench_units.py imports


# ------------------------------------------------------------------------------------------------ model, inputs
def xl_model(depth: int | None = None, *, config=None, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """STDiT3-XL/2 (or ``config``) with random weights in Open-Sora's init; the temporal blocks' output projections
    are re-drawn so every block does real work (Open-Sora starts them at zero: identity blocks)."""
    from qc_compile.models.config import OPENSORA_V12
    from qc_compile.models.stdit3 import STDiT3

    cfg = config or OPENSORA_V12
    if depth is not None:
        cfg = dataclasses.replace(cfg, depth=depth)
    torch.manual_seed(0)
    with torch.device(device):
        m = STDiT3(cfg)
        m.initialize_weights()
        for b in m.temporal_blocks:
            for lin in (b.attn.proj, b.cross_attn.proj, b.mlp.fc2):
                torch.nn.init.xavier_uniform_(lin.weight)
    return m.to(dtype).eval()


def xl_inputs(cfg, n: int = 1, valid: int = 120, seed: int = 0, *, size=(XL_FRAMES, XL_HEIGHT, XL_WIDTH),
              device: str = "cuda"):
    """(geometry, noise (n, C, T, H, W), caption features (n, 1, L, Cy) with ``valid`` tokens, mask (n, L)); drawn on
    the CPU from ``seed`` so every device starts from the same tensors."""
    from qc_compile.models.stdit3 import Geometry

    g = Geometry.for_model(cfg, *size)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cfg.in_channels, g.frames, g.height, g.width, generator=gen)
    y = torch.randn(n, 1, cfg.model_max_length, cfg.caption_channels, generator=gen) * 0.2
    mask = torch.zeros(n, cfg.model_max_length, dtype=torch.bool)
    mask[:, :valid] = True
    return g, z.to(device), y.to(device), mask.to(device)


# ------------------------------------------------------------------------------------------------ baselines
class PlainExecutor:
    """The model's own whole ``forward`` as the sampler's executor: what a user of Open-Sora runs.

    Every block runs every step (decisions other than compute are refused, so the row cannot skip work); the
    statistics tensor is one constant all-NaN tensor made at ``reset`` (no statistics computed)."""

    def __init__(self, model, geometry) -> None:
        from qc_compile.runtime.policy import STAT_NAMES

        self.model = model
        self.g = geometry
        self.unit_names = tuple(model.unit_names())
        self._n_stats = len(STAT_NAMES)
        self._stats: torch.Tensor | None = None
        # the pixel size sets the position-embedding scale; host tensors, so reading them does not synchronise
        self._hw = (torch.tensor([geometry.height_px]), torch.tensor([geometry.width_px]))

    def reset(self) -> None:
        self._stats = None

    def describe(self) -> dict:
        return {"executor": "plain", "forward": f"{type(self.model).__name__}.forward (packed captions)"}

    @torch.no_grad()
    def step(self, z, timestep, cond, decisions: Mapping[str, Any]):
        from qc_compile.runtime.policy import Action

        skipped = sorted(u for u, d in decisions.items() if d.action is not Action.COMPUTE)
        if skipped:
            raise RuntimeError(f"the plain forward computes every unit; decisions skip {skipped[:4]}")
        if self._stats is None or self._stats.device != z.device:
            self._stats = torch.full((len(self.unit_names), self._n_stats), float("nan"), device=z.device)
        # a new iteration for inductor's CUDA-graph trees (mode="reduce-overhead" rows): one step's block outputs
        # may be overwritten by the next step's replays (a host-side counter; nothing else changes)
        torch.compiler.cudagraph_mark_step_begin()
        v = self.model(z, timestep, cond.y, mask=cond.mask, fps=cond.fps, height=self._hw[0], width=self._hw[1])
        return v, self._stats


def model_blocks(model) -> list:
    return list(model.spatial_blocks) + list(model.temporal_blocks)


@contextlib.contextmanager
def regional_compile(model, *, backend: str = "inductor", mode: str | None = None) -> Iterator[None]:
    """Every block ``torch.compile``d (regional compilation: the one line ``for b in blocks: b.compile()`` a user
    writes), undone on exit. The dynamo cache limit is raised so no block silently falls back to eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    old_limit = cfg.cache_size_limit
    cfg.cache_size_limit = max(old_limit, 256)
    if hasattr(cfg, "accumulated_cache_size_limit"):
        cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 1024)
    for b in model_blocks(model):
        b.compile(backend=backend, mode=mode)
    try:
        yield
    finally:
        for b in model_blocks(model):
            b._compiled_call_impl = None  # what nn.Module.compile set: back to the eager __call__
        cfg.cache_size_limit = old_limit


def is_block_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and fqn.startswith(BLOCK_PREFIXES)


def torchao_fp8(model) -> str | None:
    """torchao's FP8 dynamic activation + FP8 weight, per row, on the block linears (the ones our plan quantizes),
    in place. Returns None, or why it cannot run here (not installed, no FP8 hardware)."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as err:
        return f"torchao is not installed ({err})"
    try:
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=is_block_linear)
    except (AssertionError, RuntimeError, NotImplementedError, ValueError) as err:
        return f"torchao FP8 is unavailable here: {type(err).__name__}: {err}"[:500]
    return None


# ------------------------------------------------------------------------------------------------ grid replay
def map_grid(grid: list[dict[str, dict]], src_depth: int, dst_depth: int) -> list[dict[str, dict]]:
    """Decisions of a ``src_depth``-block model mapped to ``dst_depth`` blocks by relative depth: block ``j`` takes
    the decision of source block ``floor(j * src_depth / dst_depth)`` of the same kind."""
    out = []
    for step in grid:
        row = {}
        for kind in ("spatial", "temporal"):
            for j in range(dst_depth):
                d = step.get(f"{kind}_{j * src_depth // dst_depth}")
                if d is not None:
                    row[f"{kind}_{j}"] = d
        out.append(row)
    return out


def full_grid(steps: int, units) -> list[dict[str, dict]]:
    """Every block unit computed at every step (the full-compute rows)."""
    from qc_compile.models.units import block_units

    return [{u: {"action": "compute", "variant": "default"} for u in block_units(units)} for _ in range(steps)]


class ReplayPolicy:
    """Replays recorded decisions (action + variant per unit and step); observes nothing."""

    name = "replay"

    def __init__(self, grid: list[dict[str, dict]], extrapolation: float = 0.0) -> None:
        self.grid = grid
        self.extrapolation = extrapolation  # the recorded policy's reuse extrapolation: the executor applies it
        # what the executor must measure: nothing for an all-compute grid (policy none's level), else everything
        # (the cached rows keep the statistics cost a live caching policy pays)
        self.reads_stats = "none" if all(d["action"] == "compute" for g in grid for d in g.values()) else "full"

    def reset(self, unit_names, num_steps: int) -> None:
        if num_steps > len(self.grid):
            raise ValueError(f"grid has {len(self.grid)} steps, the run {num_steps}")

    def decide(self, step):
        from qc_compile.runtime.policy import Action, UnitDecision

        return {u: UnitDecision(Action(d["action"]), d.get("variant", "default"))
                for u, d in self.grid[step.index].items()}

    def observe(self, step, stats) -> None:
        pass


# ------------------------------------------------------------------------------------------------ meters
class Meter:
    """Seconds (CUDA events on the GPU, perf_counter on the CPU) and peak memory of one measured region."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        """Called once per row before its timed run: the peak then belongs to that row alone."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / 2 ** 30 if self.cuda else None

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, fn()) — synchronised before and after."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------------ kernel classes
KERNEL_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "efficient", "sdpa", "_attn_fwd", "quant_per_block")),  # the last two: SageAttention's
    ("quantization", ("_producer", "_quant", "rotate", "amax", "float8", "fp8_quant", "scaled_fp8")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "_scaled_mm", "wgmma")),
    ("statistics", ("_cache_kernel",)),
)
"""Name fragments per class (first match wins; anything else is elementwise/copy, inductor's fused kernels
included). ``quantization`` is our qc:: producers (and kernels named for FP8 conversion); quantization that inductor
fuses into an unnamed ``triton_*`` kernel (torchao's path) counts as elementwise."""


def kernel_class(name: str) -> str:
    low = name.lower()
    if "gemm" in low and "fp8" in low:  # our FP8 GEMM (its name says fp8 but it is a GEMM)
        return "gemm"
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "elementwise"


def kernel_ms_by_class(fn: Callable[[], Any]) -> tuple[dict[str, float], dict[str, float]]:
    """GPU kernel milliseconds of ``fn()`` by :func:`kernel_class`, and the 12 largest kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by: dict[str, float] = {}
    top: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type.name != "CUDA":
            continue
        t = getattr(evt, "device_time_total", None)
        if t is None:
            t = getattr(evt, "cuda_time_total", 0.0)
        if not t:
            continue
        by[kernel_class(evt.key)] = by.get(kernel_class(evt.key), 0.0) + t / 1e3
        top[evt.key[:100]] = top.get(evt.key[:100], 0.0) + t / 1e3
    return by, dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])
