"""DiT sampling loop at Open-Sora 1.2 scale: our rows against the baselines a user already has, all in one process.

STDiT3-XL/2 (``opensora-v1.2``, random weights), 480p 9:16 (latent 15 x 60 x 106), 51 frames, CFG (batch 2),
RFLOW, 30 steps (and a 100-step pair). **Only the DiT sampling loop is timed**: T5 text encoding and VAE decoding
are excluded (``tools/bench_request.py`` times the whole request). Rows (``ROWS``), all on the same inputs:

* ``plain_bf16_eager`` / ``plain_bf16_compile`` (/ ``_100``): the model's own ``STDiT3.forward`` (packed captions,
  as Open-Sora runs it), bf16; ``compile`` = every block ``torch.compile``d (regional compile, one line);
* ``torchao_fp8_compile``: torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` on the same block
  linears our plan quantizes, then the same regional compile (skipped, with the reason, where unavailable);
* ``ours_fp8`` (full compute), ``ours_cached`` (bf16 + quantcache grid), ``ours_both`` (FP8 + quantcache grid),
  ``ours_both_100``: the step executor over the ``torch-fast`` runner, compiled (``--cuda-graphs``: per-unit graphs).

The quantcache decisions are replayed from qc-ref runs (``--make-grids``, committed in ``bench/results/e2e_grids.json``):
random XL weights make adaptive statistics meaningless. The full-compute rows (``ours_fp8``) run at the statistics
level a user without caching gets by default (policy none reads nothing: ``stats="none"``, no statistics kernels, no
residual cache); the cached rows still compute every statistic a live caching policy would read (``stats="full"``),
so they carry that cost. ``--stats`` forces one level on every our row. The baselines carry nothing our path skips.
The JSON (and .md) is rewritten atomically after every row, so an interrupted run keeps the rows it finished
(``"complete": false``); the overheads are measured right after our rows, before torchao's row (which runs last). Per row: seconds of the loop (CUDA
events, after a separate warm-up that compiles/autotunes/captures: 2 steps, or the whole grid for rows replaying a
decision grid so no CUDA graph is captured inside the timed loop), median step, warm-up seconds, peak GPU memory
(counter reset per row), compute fraction, the qc-ref fidelity of the same configuration (``--fidelity``), plus the
overheads a user pays and a per-block kernel profile of ``plain_bf16_compile`` and ``ours_fp8``.

    python tools/bench_e2e.py --make-grids                  # CPU: qc-ref decision grids -> bench/results/e2e_grids.json
    python tools/bench_e2e.py --fidelity --device cuda      # qc-ref fidelity per configuration (32 held-out captions)
    python tools/bench_e2e.py --fidelity --plan WORK/plan.json   # ... with a calibrated qc-ref plan (+ ours_fp8_schedule)
    python tools/bench_e2e.py --make-grids --plan WORK/plan.json --grids G.json  # grids decided under that plan
    python tools/bench_e2e.py --make-grids --set-long hlc.tau_max=7 hlc.tau_mid=7 --grids G.json  # 100-step thresholds
    python tools/bench_e2e.py --out DIR                     # GPU: the timed rows -> DIR/e2e_<gpu>.{json,md}
    python tools/bench_e2e.py --quick --device cpu --out D  # tiny CPU smoke run of the same code
    python tools/bench_e2e.py --render DIR/e2e_h100.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lib as B  # noqa: E402

from qc_compile.commands.run import parse_sets  # noqa: E402  (--set's parser; the policies convert the values)
from bench_lib import (XL_FRAMES, XL_HEIGHT, XL_WIDTH, ReplayPolicy, _env, full_grid,  # noqa: E402,F401
                       kernel_class, map_grid, xl_inputs, xl_model)

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
GRIDS_JSON = RESULTS / "e2e_grids.json"
EVAL_CAPTION_SEED = 20261122  # the held-out captions: never tuned on
GRID_PROMPT_SEED = 7  # the tuning captions' seed (tools/tune_policies.py): grids are decided on these
WHAT = "DiT sampling loop"
EXCLUDED = "T5 text encoding and VAE decoding (tools/bench_request.py times the whole request)"


@dataclasses.dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    path: str  # plain | plain_compile | torchao_compile | ours
    long: bool = False  # the 100-step pair
    fp8: bool = False  # ours: the FP8 plan
    grid: str | None = None  # ours: the replayed grid in e2e_grids.json (None: every unit computed)
    fidelity: str = ""  # the configuration's key in the --fidelity JSON
    fused: bool | None = None  # ours: FP8 quantization fused by inductor (None: the runner's default)
    compile_mode: str | None = None  # plain_compile: torch.compile mode (reduce-overhead: inductor's CUDA graphs)
    attention: str = "sdpa"  # ours: self-attention backend (runtime/attention.py; "sage" = 8-bit, extra `sage`)


ROWS: tuple[RowSpec, ...] = (  # run order: the torchao row mutates the model's linears, so it runs last
    RowSpec("plain_bf16_eager", "plain STDiT3.forward, bf16, eager", "plain", fidelity="plain_bf16"),
    RowSpec("plain_bf16_compile", "plain STDiT3.forward, bf16, every block torch.compile'd", "plain_compile",
            fidelity="plain_bf16"),
    RowSpec("plain_bf16_compile_cudagraphs", "plain STDiT3.forward, bf16, every block torch.compile'd with "
            "mode='reduce-overhead' (inductor's CUDA graphs: like with like for our CUDA-graphed rows)", "plain_compile",
            fidelity="plain_bf16", compile_mode="reduce-overhead"),
    RowSpec("plain_bf16_compile_100", "plain STDiT3.forward, bf16, every block torch.compile'd, 100 steps",
            "plain_compile", long=True, fidelity="plain_bf16_100"),
    RowSpec("ours_fp8", "ours: FP8 W8A8 plan, torch-fast runner, compiled, every unit computed, statistics as "
            "a user without caching gets them by default (policy none: none)", "ours", fp8=True, fidelity="ours_fp8"),
    RowSpec("ours_fp8_fused", "ours: FP8 W8A8 plan, compiled, quantization as torch ops fused by inductor (instead "
            "of the qc:: producer kernels), every unit computed", "ours", fp8=True, fidelity="ours_fp8", fused=True),
    RowSpec("ours_fp8_sage", "ours: FP8 W8A8 plan as ours_fp8, spatial self-attention in 8 bits (SageAttention "
            "1.0.6 INT8 Q.K, FP16 P.V; extra `sage`), every unit computed", "ours", fp8=True,
            fidelity="ours_fp8_sage", attention="sage"),
    RowSpec("ours_cached", "ours: bf16 torch-fast, quantcache decisions (replayed grid)", "ours", grid="cached_30",
            fidelity="ours_cached"),
    RowSpec("ours_both", "ours: FP8 + quantcache decisions (replayed grid)", "ours", fp8=True, grid="both_30",
            fidelity="ours_both"),
    RowSpec("ours_both_100", "ours: FP8 + quantcache, 100 steps (replayed 100-step grid)", "ours", long=True,
            fp8=True, grid="both_100", fidelity="ours_both_100"),
    RowSpec("torchao_fp8_compile", "torchao FP8 (dynamic activation + weight, per row) on the block linears, "
            "every block torch.compile'd", "torchao_compile", fidelity="torchao_fp8"),
)
ROW_KEYS = tuple(r.key for r in ROWS)
# ratios are to the fastest measured of these (same step count): the strongest plain model a user already has
BASELINE = {False: ("plain_bf16_compile", "plain_bf16_compile_cudagraphs"), True: ("plain_bf16_compile_100",)}
PROFILE_ROWS = ("plain_bf16_compile", "ours_fp8", "ours_fp8_fused", "ours_fp8_sage")


# ------------------------------------------------------------------------------------------------ JSON schema
_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
ROW_SCHEMA = {
    "type": "object",
    "required": ["key", "label", "steps"],
    "properties": {
        "key": {"enum": list(ROW_KEYS)},
        "label": {"type": "string"},
        "steps": {"type": "integer", "minimum": 1},
        "seconds": _NUM, "median_step_ms": _NUM, "warmup_s": _NUM, "peak_gib": _NUM_OR_NULL,
        "compute_fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "fidelity": {"type": ["object", "null"]},
        "speedup_vs_plain_bf16_compile": _NUM_OR_NULL, "ratio_baseline": {"type": ["string", "null"]},
        "skipped": {"type": "string"}, "error": {"type": "string"},
        "profile_per_block": {"type": "object"}, "warmup_steps": {"type": "integer", "minimum": 1},
    },
    "oneOf": [  # a measured row has every number; a row that did not run says why
        {"required": ["seconds", "median_step_ms", "warmup_s", "peak_gib", "compute_fraction", "fidelity"],
         "not": {"anyOf": [{"required": ["skipped"]}, {"required": ["error"]}]}},
        {"required": ["skipped"], "not": {"required": ["seconds"]}},
        {"required": ["error"], "not": {"required": ["seconds"]}},
    ],
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["what", "excluded", "rows", "env", "overheads"],
    "properties": {
        "what": {"type": "string"}, "excluded": {"type": "string"},
        "rows": {"type": "array", "items": ROW_SCHEMA, "minItems": 1},
        "env": {"type": "object", "required": ["device", "torch", "triton", "commit", "date"]},
        "overheads": {"type": "array", "items": {
            "type": "object", "required": ["key", "what"],
            "properties": {"key": {"type": "string"}, "value": _NUM_OR_NULL, "unit": {"type": "string"},
                           "what": {"type": "string"}, "skipped": {"type": "string"}},
            "oneOf": [{"required": ["value", "unit"]}, {"required": ["skipped"]}]}},
    },
}


def validate_doc(doc: dict) -> None:
    import jsonschema

    jsonschema.validate(doc, SCHEMA)


# ------------------------------------------------------------------------------------------------ sampling
@dataclasses.dataclass
class Setup:
    """The one set of inputs every row samples from."""

    model: Any
    g: Any
    z: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    y_null: torch.Tensor
    size: tuple[int, int, int]
    steps: int
    long_steps: int
    depth: int


def sample(setup: Setup, executor, grid: list[dict], steps: int, extrapolation: float = 0.0):
    """``extrapolation``: the recorded policy's (HLC's first-order reuse), so a replay pays what the policy pays."""
    from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig

    s = RFlowSampler(SamplerConfig(num_steps=steps, cfg_scale=7.0))
    return s.sample(executor, setup.z, setup.y, setup.mask, setup.y_null, setup.model.config.default_fps,
                    video_size=setup.size, policy=ReplayPolicy(grid[:steps], extrapolation), progress=False)


def measure(setup: Setup, executor, grid: list[dict], steps: int, meter: B.Meter, warmup_steps: int = 2,
            whole_grid_warmup: bool = False, extrapolation: float = 0.0) -> dict:
    """Warm-up run (compile, autotune, graph capture) then the timed run, its peak memory alone.

    ``whole_grid_warmup``: the warm-up runs every step of a replayed grid, so every decision pattern (which unit
    reads which graph's output, which precision variant) has its CUDA graph captured before the timed run: a
    serving process pays capture once, on its first video, not per video (measured at 5510883: replaying only two
    warm-up steps left the captures in the timed loop, ours_both 4.56 s instead of the steady state)."""
    from qc_compile.runtime.trace import compute_fractions

    n_warm = steps if whole_grid_warmup else min(warmup_steps, steps)
    warm_s, _ = meter.timed(lambda: sample(setup, executor, grid, n_warm, extrapolation))
    meter.reset_peak()
    secs, res = meter.timed(lambda: sample(setup, executor, grid, steps, extrapolation))
    return {"seconds": secs, "median_step_ms": 1e3 * statistics.median(r.seconds for r in res.steps),
            "warmup_s": warm_s, "peak_gib": meter.peak_gib(), "steps": len(res.steps),
            "compute_fraction": compute_fractions(res.steps, executor.unit_names)[0],
            "latent_finite": bool(torch.isfinite(res.z).all()), "_latent": res.z}


def profile_per_block(setup: Setup, executor, grid: list[dict], median_step_ms: float, steps: int = 2) -> dict:
    """Kernel milliseconds per computed block by class, and launch gaps = the timed run's median step minus its
    kernel time, per block (embed/final kernels, <0.2% of the FLOPs, are spread over the blocks)."""
    by, top = B.kernel_ms_by_class(lambda: sample(setup, executor, grid, steps))
    blocks = 2 * setup.depth * steps
    per = {k: v / blocks for k, v in sorted(by.items(), key=lambda kv: -kv[1])}
    kernel = sum(per.values())
    wall = median_step_ms / (2 * setup.depth)
    return {"wall_ms": wall, "kernel_ms": kernel, "launch_gaps_ms": wall - kernel, "ms_by_class": per,
            "top_kernels_ms_per_step": {k: v / steps for k, v in top.items()}, "profiled_steps": steps}


# ------------------------------------------------------------------------------------------------ overheads
def overhead(key: str, value: float | None, unit: str, what: str) -> dict:
    return {"key": key, "value": value, "unit": unit, "what": what}


def skipped_overhead(key: str, why: str, what: str) -> dict:
    return {"key": key, "skipped": why, "what": what}


def load_fp8_plan(setup: Setup, meter: B.Meter, overheads: list[dict], keep_bf16: tuple[str, ...] = ()):
    """The FP8 plan as a user gets it: ranges from one calibration step, saved, then loaded and verified."""
    from qc_compile.calib.ranges import RangeCollector
    from qc_compile.plan import load_plan, save_plan
    from qc_compile.runtime.fast_blocks import fp8_block_plan

    with RangeCollector(setup.model) as rc:
        cal_s, _ = meter.timed(lambda: sample(setup, B.PlainExecutor(setup.model, setup.g),
                                              full_grid(1, setup.model.unit_names()), 1))
    plan = fp8_block_plan(setup.model, rc.reduce(), high_variant=True, keep_bf16=keep_bf16)
    plan.model = {**plan.model, "weights_sha256": None}  # random weights: no exported digest to bind to
    plan.provenance = {**plan.provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "command": "tools/bench_e2e.py (ranges of one sampling step)",
                       "tool_versions": {"torch": torch.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        save_plan(plan, Path(tmp) / "plan.json")
        t0 = time.perf_counter()
        plan = load_plan(Path(tmp) / "plan.json")
        load_s = time.perf_counter() - t0
    overheads += [overhead("plan_load_s", load_s, "s", "read + schema-validate + verify plan.json (W8A8 FP8 on "
                           f"{sum(1 for e in plan.linears.values() if e.weight != 'bf16')} block linears)"),
                  overhead("range_calibration_s", cal_s, "s", "collecting activation ranges over one sampling step "
                           "(only to write a valid plan here; a user's plan comes from `qc-compile calibrate`)")]
    return plan


def build_fast_runner(setup: Setup, plan, args, meter: B.Meter, overheads: list[dict] | None,
                      fused: bool | None = None, attention: str = "sdpa"):
    from qc_compile.runtime.runners.fast import FastRunner

    before = meter.allocated_gib()
    secs, runner = meter.timed(lambda: FastRunner(setup.model, setup.g, plan, compile=not args.no_compile,
                                                  cuda_graphs=args.cuda_graphs, fused=fused,
                                                  attention=attention))
    if overheads is not None and plan is not None:
        after = meter.allocated_gib()
        overheads.append(overhead("weight_quantization_s", secs, "s", "building the torch-fast runner from the "
                                  "loaded plan: every block weight quantized to FP8 per output channel"))
        if before is not None:
            overheads.append(overhead("fp8_weights_gib", after - before, "GiB", "device memory the FP8 weights add "
                                      "(the bf16 model stays resident for embed/final and the bf16 rows)"))
    return runner


def graph_pool_overhead(setup: Setup, plan, args, meter: B.Meter) -> list[dict]:
    """Device memory and capture time of per-unit CUDA graphs for the FP8 runner (one step captures every unit)."""
    what_mem = "device memory held by the CUDA graphs of every FP8 block unit (shared pool + static inputs)"
    what_s = "first step with CUDA graphs on: compile (cached by then), 2 eager calls and capture per unit"
    if not meter.cuda:
        return [skipped_overhead("cuda_graph_pool_gib", "no CUDA device", what_mem),
                skipped_overhead("cuda_graph_capture_s", "no CUDA device", what_s)]
    from qc_compile.runtime.runners.fast import FastRunner
    from qc_compile.runtime.step_executor import StepExecutor

    runner = FastRunner(setup.model, setup.g, plan, compile=not args.no_compile, cuda_graphs=True)
    ex = StepExecutor(runner, setup.g, stats=args.stats)  # None: the full grid's level, as in ours_fp8
    torch.cuda.empty_cache()
    before = meter.allocated_gib()
    secs, _ = meter.timed(lambda: sample(setup, ex, full_grid(1, ex.unit_names), 1))
    ex.reset()  # drop the step's residual caches: what stays is the graphs' memory
    pool = meter.allocated_gib() - before
    del ex, runner
    torch.cuda.empty_cache()
    return [overhead("cuda_graph_pool_gib", pool, "GiB", what_mem), overhead("cuda_graph_capture_s", secs, "s", what_s)]


def cache_overhead(executor) -> list[dict]:
    """Residual-cache memory per cached unit after a cached run (what reusing a unit costs in memory)."""
    res = getattr(executor, "residuals", {})
    if not res:
        return []
    older = [t for _, t in getattr(executor, "_older", {}).values()]  # extrapolating reuse: the residual before
    sizes = [t.numel() * t.element_size() / 2 ** 30 for t in [*res.values(), *older]]
    shape = list(next(iter(res.values())).shape)
    dtype = str(next(iter(res.values())).dtype).replace("torch.", "")
    per = "two cached residuals" if older else "one cached residual"
    return [overhead("cache_gib_per_unit", sum(sizes) / len(res), "GiB", f"{per} {shape} {dtype} per block unit "
                     "(the step executor's cache; two when the policy extrapolates its reuse)"),
            overhead("cache_gib_total", sum(sizes), "GiB", f"residual cache of all {len(res)} block units")]


# ------------------------------------------------------------------------------------------------ the rows
def load_grids(path: Path, depth: int) -> dict[str, dict]:
    """Grids of e2e_grids.json mapped to ``depth`` blocks by relative depth."""
    doc = json.loads(Path(path).read_text())
    return {k: {**v, "grid": map_grid(v["grid"], doc["depth"], depth)} for k, v in doc["grids"].items()}


def run_rows(setup: Setup, specs: list[RowSpec], grids: dict[str, dict], args, meter: B.Meter,
             keep_latents: bool = False, checkpoint=None) -> tuple[list[dict], list[dict]]:
    """Every row in order on the same inputs; one failing row is recorded and the others go on. ``checkpoint(rows,
    overheads)`` is called after every row and after the overheads are measured (the caller writes the JSON)."""
    from qc_compile.runtime.step_executor import StepExecutor

    model, units = setup.model, setup.model.unit_names()
    rows: list[dict] = []
    overheads: list[dict] = []
    runners: dict[tuple, Any] = {}
    plan = None
    compiled = None  # the regional-compile context while plain_compile rows run
    compiled_mode: str | None = None  # its torch.compile mode

    def runner_for(fp8: bool, fused: bool | None = None, attention: str = "sdpa"):
        nonlocal plan
        if (fp8, fused, attention) not in runners:
            if fp8 and plan is None:
                plan = load_fp8_plan(setup, meter, overheads, tuple(args.fp8_keep))
            first = not any(k[0] == fp8 for k in runners)  # the overheads are those of the first such runner
            runners[(fp8, fused, attention)] = build_fast_runner(setup, plan if fp8 else None, args, meter,
                                                                 overheads if first else None, fused, attention)
        return runners[(fp8, fused, attention)]

    graphs_measured = False

    def save() -> None:
        if checkpoint is not None and rows:
            checkpoint(rows, overheads)

    def measure_graphs() -> None:  # before torchao rewrites the block linears the runner would quantize
        nonlocal graphs_measured
        if plan is None or graphs_measured or args.no_graph_overhead:
            return
        graphs_measured = True
        try:
            overheads.extend(graph_pool_overhead(setup, plan, args, meter))
        except Exception as err:  # noqa: BLE001
            overheads.append(skipped_overhead("cuda_graph_pool_gib", f"failed: {type(err).__name__}: {err}"[:500],
                                              "device memory held by per-unit CUDA graphs"))
        save()

    for spec in specs:
        steps = setup.long_steps if spec.long else setup.steps
        if spec.path == "torchao_compile":
            measure_graphs()
        row: dict[str, Any] = {"key": spec.key, "label": spec.label, "steps": steps}
        if compiled is not None and (spec.path != "plain_compile" or spec.compile_mode != compiled_mode):
            compiled.__exit__(None, None, None)
            compiled = None
        try:
            if spec.path == "torchao_compile":
                why = B.torchao_fp8(model)
                if why is not None:
                    rows.append({**row, "skipped": why})
                    continue
            if spec.attention != "sdpa":  # an optional backend that cannot run here is a skipped row, not an error
                from qc_compile.errors import UserError
                from qc_compile.runtime.attention import check_attention_backend

                try:
                    check_attention_backend(spec.attention, args.device)
                except UserError as why:
                    rows.append({**row, "skipped": str(why)})
                    continue
            if spec.path == "plain_compile" and compiled is None:
                compiled = B.regional_compile(model, backend=args.compile_backend, mode=spec.compile_mode)
                compiled.__enter__()
                compiled_mode = spec.compile_mode
            if spec.path == "torchao_compile":
                compiled = B.regional_compile(model, backend=args.compile_backend)
                compiled.__enter__()
                compiled_mode = None
            if spec.path == "ours":  # full compute: the level follows the policy (none); cached rows: full
                level = args.stats if args.stats or spec.grid is None else "full"
                ex = StepExecutor(runner_for(spec.fp8, spec.fused, spec.attention), setup.g, stats=level)
            else:
                ex = B.PlainExecutor(model, setup.g)
            extrapolation = 0.0
            if spec.grid is None:
                grid = full_grid(steps, units)
            else:
                if spec.grid not in grids:
                    rows.append({**row, "skipped": f"grid {spec.grid!r} is not in the grids file"})
                    continue
                grid = grids[spec.grid]["grid"]
                extrapolation = float(grids[spec.grid].get("extrapolation", 0.0))
                if len(grid) < steps:
                    rows.append({**row, "skipped": f"grid {spec.grid!r} has {len(grid)} steps, the row {steps}"})
                    continue
            row.update(measure(setup, ex, grid, steps, meter, args.warmup_steps,
                               whole_grid_warmup=spec.grid is not None, extrapolation=extrapolation))
            if spec.grid is not None:
                row["warmup_steps"] = steps  # the whole grid: every decision pattern captured before timing
            if hasattr(ex, "describe"):
                row["executor"] = ex.describe()
            if spec.key == "ours_cached":
                overheads += cache_overhead(ex)
            if spec.key in PROFILE_ROWS and args.profile_steps and meter.cuda:
                row["profile_per_block"] = profile_per_block(setup, ex, grid, row["median_step_ms"],
                                                             args.profile_steps)
        except Exception as err:  # noqa: BLE001  (one broken row must not lose the others)
            import traceback

            traceback.print_exc()
            row = {"key": spec.key, "label": spec.label, "steps": steps, "error": f"{type(err).__name__}: {err}"[:2000]}
        latent = row.pop("_latent", None)
        if keep_latents and latent is not None:
            row["_latent"] = latent
        if row.get("warmup_s") is not None and spec.key in ("plain_bf16_compile", "plain_bf16_compile_cudagraphs",
                                                             "ours_fp8", "torchao_fp8_compile"):
            overheads.append(overhead(f"compile_warmup_s.{spec.key}", row["warmup_s"], "s",  # the first compile
                                      f"first {args.warmup_steps}-step run of {spec.key}: compile, autotune"
                                      + (", graph capture" if args.cuda_graphs and spec.key == "ours_fp8" else "")))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("_") and k != "executor"}), flush=True)
        save()
        ex = None
        if meter.cuda:
            torch.cuda.empty_cache()
    if compiled is not None:
        compiled.__exit__(None, None, None)
    measure_graphs()
    return rows, overheads


def add_ratios_and_fidelity(rows: list[dict], fidelity: dict | None) -> None:
    spec = {s.key: s for s in ROWS}
    secs = {r["key"]: r.get("seconds") for r in rows}
    for r in rows:
        if "seconds" not in r:
            continue
        have = [(secs[k], k) for k in BASELINE[spec[r["key"]].long] if secs.get(k)]
        base, r["ratio_baseline"] = min(have) if have else (None, None)
        r["speedup_vs_plain_bf16_compile"] = None if not base else base / r["seconds"]
        conf = (fidelity or {}).get("configs", {}).get(spec[r["key"]].fidelity)
        r["fidelity"] = None if conf is None else {**conf, "config": spec[r["key"]].fidelity}


def attach_fidelity(path: Path, fid_path: Path) -> None:
    """Put a --fidelity JSON beside the rows of an existing result (the runs may come in either order)."""
    doc = json.loads(path.read_text())
    fidelity = json.loads(fid_path.read_text())
    add_ratios_and_fidelity(doc["rows"], fidelity)
    doc["fidelity_source"] = {"file": str(fid_path), "env": fidelity.get("env"), "reference": fidelity.get("reference")}
    validate_doc(doc)
    path.write_text(json.dumps(doc, indent=1))


def quick_config():
    """A tiny STDiT3 (2+2 blocks, hidden 64) for CPU smoke runs and tests."""
    from qc_compile.models.config import OPENSORA_V12

    return dataclasses.replace(OPENSORA_V12, name="opensora-v1.2-tiny", hidden_size=64, depth=2, num_heads=4,
                               caption_channels=32, model_max_length=16)


def make_setup(args) -> Setup:
    dev = args.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.quick:
        cfg, size, valid = quick_config(), (17, 64, 64), 8
    else:
        cfg, size, valid = None, (XL_FRAMES, XL_HEIGHT, XL_WIDTH), 120
    model = xl_model(args.depth, config=cfg, device=dev, dtype=dtype)
    g, z, y, mask = xl_inputs(model.config, valid=valid, size=size, device=dev)
    y_null = model.y_embedder.y_embedding[None, None].float()
    return Setup(model, g, z, y, mask, y_null, size, args.steps, args.long_steps, model.config.depth)


def gpu_stem() -> str:
    if not torch.cuda.is_available():
        return "e2e_cpu"
    name = torch.cuda.get_device_name().lower()
    for k in ("h200", "h100", "a100", "l40s", "b200"):
        if k in name:
            return f"e2e_{k}"
    return "e2e_" + "".join(c if c.isalnum() else "_" for c in name)[:24]


def run_bench(args, keep_latents: bool = False) -> dict:
    """The timed rows -> OUT/<stem>.json and .md; ``keep_latents`` (tests) adds ``_latents`` after writing."""
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = True
    meter = B.Meter(args.device)
    setup = make_setup(args)
    grids = load_grids(args.grids, setup.depth)
    specs = [s for s in ROWS if not args.rows or s.key in args.rows]
    fid_path = Path(args.fidelity_json) if args.fidelity_json else None
    fidelity = json.loads(fid_path.read_text()) if fid_path and fid_path.is_file() else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.stem or gpu_stem()}.json"

    def write(rows: list[dict], overheads: list[dict], complete: bool) -> dict:
        kept = [{k: v for k, v in r.items() if k != "_latent"} for r in rows]
        add_ratios_and_fidelity(kept, fidelity)
        doc = bench_doc(setup, args, grids, fidelity, fid_path, kept, overheads, complete, [s.key for s in specs])
        validate_doc(doc)
        write_doc(path, doc)
        return doc

    rows, overheads = run_rows(setup, specs, grids, args, meter, keep_latents,
                               checkpoint=lambda r, o: write(r, o, False))
    latents = {r["key"]: r.pop("_latent") for r in rows if "_latent" in r}
    doc = write(rows, overheads, True)
    print(f"wrote {path} and .md")
    if keep_latents:
        doc["_latents"] = latents
    return doc


def write_doc(path: Path, doc: dict) -> None:
    """The JSON and its .md, each written atomically (a reader never sees half a file)."""
    from qc_compile.artifacts import write_bytes_atomic

    write_bytes_atomic(path, json.dumps(doc, indent=1).encode())
    render(path)


def bench_doc(setup: Setup, args, grids: dict, fidelity: dict | None, fid_path: Path | None, rows: list[dict],
              overheads: list[dict], complete: bool, planned: list[str]) -> dict:
    g = setup.g
    return {"what": WHAT, "excluded": EXCLUDED, "complete": complete, "rows_planned": planned,
           "setting": f"{setup.model.config.name} random weights, {setup.size[1]}x{setup.size[2]} px, {setup.size[0]} "
                      f"frames (latent {g.frames}x{g.height}x{g.width}, {g.N} tokens), CFG batch 2, RFLOW, "
                      f"{setup.steps} steps (100-step pair: {setup.long_steps}), {args.dtype}",
           "geometry": {"T": g.T, "S": g.S, "N": g.N}, "depth": setup.depth,
           "options": {"cuda_graphs": args.cuda_graphs, "compile": not args.no_compile, "stats": args.stats or "per row: ours_fp8 follows its "
                       "policy (none), the cached rows full",
                       "compile_backend": args.compile_backend, "warmup_steps": args.warmup_steps, "quick": args.quick,
                       "fp8_plan_variants": ["high"], "fp8_keep_bf16": list(args.fp8_keep)},
           "grids": {"file": str(args.grids), "mapping": "XL block j <- qc-ref block floor(j * 4 / depth) of the "
                     "same kind", **{k: {kk: vv for kk, vv in v.items() if kk != "grid"} for k, v in grids.items()}},
           "fidelity_source": None if fidelity is None else {"file": str(fid_path), "env": fidelity.get("env"),
                                                              "reference": fidelity.get("reference")},
           "rows": rows, "overheads": overheads, "env": _env(args.commit)}


# ------------------------------------------------------------------------------------------------ qc-ref: grids
def run_grids(args) -> None:
    """quantcache decision grids on qc-ref (tuning captions, one batch): bf16-less dense path (``cached_30``), FP8
    fast path (``both_30``), FP8 at the long step count (``both_100``), replayed by the XL rows."""
    from qc_compile.calib.ranges import default_prompts
    from qc_compile.models import load_model
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.models.units import block_units
    from qc_compile.runtime.fast_blocks import fp8_block_plan
    from qc_compile.runtime.generation import GenerationSettings, generate
    from qc_compile.runtime.policies import get_policy
    from qc_compile.runtime.runners.fast import FastRunner
    from qc_compile.runtime.step_executor import StepExecutor
    from qc_compile.runtime.trace import compute_fractions

    torch.set_grad_enabled(False)
    loaded = load_model("qc-ref", device=args.device)
    model = loaded.model
    user_plan, plan_info = load_user_plan(args.plan, model)  # before any sampling: a bad file costs nothing
    if user_plan is None:
        plan_info = {**plan_info, "keep_bf16": list(args.fp8_keep)}
    prompts = default_prompts("qc-ref", args.grid_prompts, seed=GRID_PROMPT_SEED)
    plan = user_plan if user_plan is not None else fp8_block_plan(model, high_variant=True,
                                                                  keep_bf16=tuple(args.fp8_keep))
    sets, sets30 = parse_sets(args.set_long), parse_sets(args.set)
    out = {}
    for name, fp8, steps, over in (("cached_30", False, args.steps, {}), ("both_30", True, args.steps, sets30),
                                   ("both_100", True, args.long_steps, sets)):
        settings = GenerationSettings.defaults(loaded, seed=0, steps=steps)
        g = Geometry.for_model(loaded.config, settings.frames, settings.height, settings.width)
        ex = StepExecutor(FastRunner(model, g, plan if fp8 else None), g)
        t0 = time.perf_counter()
        # a calibrated plan's policy parameters and per-step schedule decide the FP8 grids (not the bf16 one)
        policy = get_policy("quantcache", over, user_plan if fp8 else None, seed=0)
        _, res = generate(loaded, prompts, settings, executor=ex, progress=False, policy=policy)
        units = block_units(ex.unit_names)
        grid = [{u: {"action": s.decisions.get(u, {}).get("action", "compute"),
                     "variant": s.decisions.get(u, {}).get("variant", "default")} for u in units} for s in res.steps]
        out[name] = {"steps": steps, "fp8": fp8, "policy": "quantcache", "overrides": over,
                     "extrapolation": policy.extrapolation,
                     "compute_fraction": compute_fractions(res.steps, units)[0], "grid": grid}
        print(f"{name}: {out[name]['compute_fraction']:.3f} computed, {time.perf_counter() - t0:.0f} s", flush=True)
    doc = {"model": "qc-ref", "depth": loaded.config.depth, "plan": plan_info, "prompts": prompts,
           "prompt_seed": GRID_PROMPT_SEED,
           "noise_seed": 0, "cfg": loaded.config.default_cfg, "device": args.device,
           "precision": f"{next(model.parameters()).dtype} model; FP8 rows: the plan's block linears W8A8 with "
                        "dynamic per-token scales (qc:: reference kernels on the CPU)",
           "note": "one batch of the tuning captions decides one grid (the policy decides once per batch); the XL "
                   "rows replay it by relative depth", "grids": out, "env": _env(args.commit)}
    Path(args.grids).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.grids}")


# ------------------------------------------------------------------------------------------------ qc-ref: fidelity
def run_fidelity(args) -> None:
    """qc-ref fidelity of each row's configuration on the 32 held-out captions: PSNR/SSIM against the fp32 FP video
    of the same caption, seed and step count, caption-checker accuracy and its drop, compute fraction."""
    from qc_compile.data.shapes import sample_captions
    from qc_compile.metrics.caption_checker import score_videos
    from qc_compile.metrics.fidelity import compare_videos
    from qc_compile.models import load_model
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.fast_blocks import fp8_block_plan
    from qc_compile.runtime.generation import GenerationSettings, generate, torch_executor
    from qc_compile.runtime.policies import get_policy
    from qc_compile.runtime.runners.fast import FastRunner
    from qc_compile.runtime.step_executor import StepExecutor
    from qc_compile.models.units import block_units

    torch.set_grad_enabled(False)
    dev = args.device
    loaded = load_model("qc-ref", device=dev)  # fp32: the reference
    captions = [c.text() for c in sample_captions(args.captions, seed=args.caption_seed)]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    user_plan, plan_info = load_user_plan(args.plan, loaded.model)  # before any sampling: a bad file costs nothing
    if user_plan is None:
        plan_info = {**plan_info, "keep_bf16": list(args.fp8_keep)}
    low = copy.deepcopy(loaded)
    low.model = low.model.to(dtype)
    plan = user_plan if user_plan is not None else fp8_block_plan(low.model, high_variant=True,
                                                                  keep_bf16=tuple(args.fp8_keep))
    sets, sets30 = parse_sets(args.set_long), parse_sets(args.set)
    seeds = [int(x) for x in args.noise_seeds.split(",")]
    jobs = [(seed, i) for seed in seeds for i in range(0, len(captions), args.batch)]
    all_captions = [c for seed in seeds for c in captions]  # the checker's captions, in the videos' order

    def videos(lm, executor_for, steps: int, policy: str | None = None, over=None, policy_plan=None):
        out, cf, used = [], [], collections.Counter()
        for seed, i in jobs:
            caps = captions[i:i + args.batch]
            s = GenerationSettings.defaults(lm, seed=seed + i, steps=steps)  # caption k: noise seed seed + k
            g = Geometry.for_model(lm.config, s.frames, s.height, s.width)
            ex = executor_for(lm.model, g)
            pol = get_policy(policy, over, policy_plan, seed=0) if policy else None
            v, res = generate(lm, caps, s, executor=ex, policy=pol, progress=False)
            out += list(v)
            cf.append(res.compute_fraction(ex.unit_names))
            if pol is not None:  # a unit a step did not decide on was computed at the default
                used.update((st.decisions.get(u) or {}).get("variant") or "default" for st in res.steps
                            for u in block_units(ex.unit_names)
                            if (st.decisions.get(u) or {}).get("action", "compute") == "compute")
        # how often each variant ran on the computed block units (empty without a policy: the runner's default)
        return out, sum(cf) / len(cf), dict(sorted(used.items()))

    def fast(p):
        return lambda m, g: StepExecutor(FastRunner(m, g, p), g)

    refs: dict[int, list] = {}
    ref_checker: dict[int, float] = {}
    ref_ok: dict[int, list[bool]] = {}
    # the noise seed of each video, in the videos' order (caption k of a batch starting at i: seed + i + j)
    jobs_seed = [seed + k for seed in seeds for k in range(len(captions))]
    configs: dict[str, dict] = {}
    def sage(p):
        return lambda m, g: StepExecutor(FastRunner(m, g, p, attention="sage"), g)

    table = [("plain_bf16", "plain", args.steps, None, None), ("ours_fp8", fast(plan), args.steps, None, None),
             ("ours_fp8_sage", sage(plan), args.steps, None, None),
             ("ours_cached", fast(None), args.steps, "quantcache", None),
             ("ours_both", fast(plan), args.steps, "quantcache", sets30 or None),
             ("torchao_fp8", "torchao", args.steps, None, None),
             ("plain_bf16_100", "plain", args.long_steps, None, None),
             ("ours_both_100", fast(plan), args.long_steps, "quantcache", sets)]
    if user_plan is not None:  # policy none ignores a plan's schedule; `schedule` runs it without caching
        table.insert(2, ("ours_fp8_schedule", fast(plan), args.steps, "schedule", None))
    for vname, *kvs in args.variant:  # ours_both with other overrides, against the same reference videos
        table.append((f"ours_both~{vname}", fast(plan), args.steps, "quantcache", {**sets30, **parse_sets(kvs)}))
    for name, how, steps, policy, over in table:
        if args.configs and name not in args.configs and "~" not in name:
            continue
        if steps not in refs:
            t0 = time.perf_counter()
            refs[steps], _, _ = videos(loaded, torch_executor, steps)
            ref_scores = score_videos(refs[steps], all_captions)
            ref_checker[steps] = ref_scores["all"]
            ref_ok[steps] = [r.all_ok for r in ref_scores["results"]]
            print(f"reference {steps} steps: {time.perf_counter() - t0:.0f} s, checker {ref_checker[steps]:.3f}",
                  flush=True)
        lm = low
        if how == "torchao":
            lm = copy.deepcopy(low)
            why = B.torchao_fp8(lm.model)
            if why is not None:
                configs[name] = {"skipped": why}
                continue
        if name.endswith("_sage"):  # the optional 8-bit attention: skipped with the reason where it cannot run
            from qc_compile.errors import UserError
            from qc_compile.runtime.attention import check_attention_backend

            try:
                check_attention_backend("sage", dev)
            except UserError as why:
                configs[name] = {"skipped": str(why)}
                continue
        t0 = time.perf_counter()
        if how in ("plain", "torchao"):
            vids, cf, used = videos(lm, B.PlainExecutor, steps)
        else:
            # the plan's parameters and schedule go to the policies of the rows that run the plan, not to ours_cached
            # (the bf16 model: a quantized plan's HLC thresholds and schedule are not its own)
            vids, cf, used = videos(lm, how, steps, policy, over,
                                    user_plan if name.startswith(("ours_fp8", "ours_both")) else None)
        per = [compare_videos(a.float(), b) for a, b in zip(vids, refs[steps])]
        scores = score_videos(vids, all_captions)
        checker = scores["all"]
        # the videos whose checker verdict differs from the fp32 reference's: which ones a drop is made of
        changed = [{"caption": all_captions[k], "noise_seed": jobs_seed[k], "psnr_db": per[k]["psnr_db"],
                    "reference_ok": ref_ok[steps][k], "ok": r.all_ok, "read": r.summary()}
                   for k, r in enumerate(scores["results"]) if r.all_ok != ref_ok[steps][k]]
        configs[name] = {"steps": steps, "psnr_db": sum(p["psnr_db"] for p in per) / len(per),
                         "psnr_db_min": min(p["psnr_db"] for p in per),
                         "ssim": sum(p["ssim"] for p in per) / len(per), "checker": checker,
                         "checker_reference": ref_checker[steps],
                         "checker_drop_points": 100.0 * (ref_checker[steps] - checker), "compute_fraction": cf,
                         "videos": len(vids), "policy": policy or "none", "overrides": over or {},
                         "variants": sorted(used), "variant_counts": used, "checker_changed": changed}
        print(name, json.dumps(configs[name]), f"{time.perf_counter() - t0:.0f} s", flush=True)
        write_fidelity(args, captions, configs, complete=False, plan=plan_info)  # an interrupted run keeps it
    write_fidelity(args, captions, configs, complete=True, plan=plan_info)
    print(f"wrote {args.out_fidelity}")


def load_user_plan(path: Path | None, model=None):
    """(plan, {"path", "sha256", "note"}) of ``--plan``, or (None, the FP8 block plan's description). A file that is
    missing, not a valid plan, or made for another model than qc-ref is a UserError naming it."""
    import hashlib

    from qc_compile.errors import UserError
    from qc_compile.linears import config_sha256, model_linears
    from qc_compile.plan import load_plan, validate

    if path is None:
        return None, {"path": None, "note": "the uncalibrated FP8 block plan (fp8_block_plan: block linears W8A8, "
                                            "dynamic per-token scales, a bf16 `high` variant, no schedule)"}
    if not path.is_file():
        raise UserError(f"--plan {path}: no such file; expected a plan.json written by `qc-compile calibrate` on "
                        "qc-ref.")
    plan = load_plan(path)  # schema checked; ArtifactError names the file and the field
    name = (plan.model or {}).get("name")
    if name != "qc-ref":
        raise UserError(f"--plan {path}: the plan is for model {name!r}; the fidelity runs use qc-ref, so the plan "
                        "must come from `qc-compile calibrate` on a qc-ref export.")
    if model is not None:  # every linear named, shaped and formatted as this model allows
        lins = {li.name: {"unit": li.unit, "in_features": li.in_features, "out_features": li.out_features}
                for li in model_linears(model)}
        validate(plan, linears=lins, model_name="qc-ref", config_sha256=config_sha256(model.config), where=str(path))
    return plan, {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                  "note": "the fast path quantizes activations per token at run time (the plan's static act scales "
                          "are not read); its formats, variants, schedule and policy parameters are"}


def write_fidelity(args, captions: list[str], configs: dict, complete: bool, plan: dict | None = None) -> None:
    """The --fidelity JSON, atomically; rewritten after every configuration."""
    from qc_compile.artifacts import write_bytes_atomic

    doc = {"model": "qc-ref", "captions": captions, "caption_seed": args.caption_seed,
           "noise_seeds": [int(x) for x in args.noise_seeds.split(",")], "batch": args.batch,
           "dtype": args.dtype, "device": args.device, "complete": complete, "plan": plan,
           "reference": "the fp32 model, policy none, same caption, noise seed and step count (torch executor)",
           "note": "compile does not change the math: plain_bf16 stands for the eager and compiled rows; policies "
                   "decide once per batch of `batch` captions; our executors' statistics level follows the policy "
                   "(none: none, quantcache: full)", "configs": configs, "env": _env(args.commit)}
    Path(args.out_fidelity).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out_fidelity, json.dumps(doc, indent=1).encode())


# ------------------------------------------------------------------------------------------------ render
def _fid(f: dict | None) -> str:
    if not f:
        return "not measured"
    if "skipped" in f:
        return f"skipped: {f['skipped'][:80]}"
    cf = "" if f.get("compute_fraction", 1.0) == 1.0 else f", {100 * f['compute_fraction']:.0f}% computed"
    return (f"{f['psnr_db']:.2f} dB / {f['ssim']:.3f} / checker {100 * f['checker']:.0f}% "
            f"(drop {f['checker_drop_points']:.1f} pt{cf})")


def render(path: Path) -> None:
    """The .md next to the JSON: rows with ratios to plain_bf16_compile, overheads, per-block profile."""
    doc = json.loads(Path(path).read_text())
    env = doc["env"]
    L = [f"# {doc['what']}: {doc.get('setting', '')}", "",
         f"Excluded: {doc['excluded']}. Device {env['device']}, commit {env['commit']}, torch {env['torch']}, "
         f"triton {env['triton']}, {env['date']}. "
         + (doc["processes"] if doc.get("processes") else "All rows in one process on the same inputs.")
         + " Seconds = the whole "
         "sampling loop (CUDA events), after a separate warm-up run (2 steps; rows replaying a decision grid: the "
         "whole grid, so every CUDA graph is captured before timing, as in a serving process after its first "
         "video); peak memory reset per row. Ratios are to "
         "the fastest measured plain compiled row at the same step count (`plain_bf16_compile` or, where "
         "measured, `plain_bf16_compile_cudagraphs`; each row's `ratio_baseline` names it). Fidelity: qc-ref, the same configuration, 32 held-out "
         "captions, PSNR / SSIM vs its fp32 video / caption-checker accuracy (change vs fp32).", "",
         "| row | seconds | × strongest plain compiled | median step (ms) | warm-up (s) | peak (GiB) | computed | "
         "fidelity (qc-ref) |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "seconds" not in r:
            L.append(f"| `{r['key']}` | {'skipped' if 'skipped' in r else 'failed'}: "
                     f"{(r.get('skipped') or r.get('error'))[:160]} | | | | | | |")
            continue
        sp = r.get("speedup_vs_plain_bf16_compile")
        peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        L.append(f"| `{r['key']}` ({r['steps']} steps) | {r['seconds']:.2f} | {'—' if sp is None else f'{sp:.2f}x'} "
                 f"| {r['median_step_ms']:.0f} | {r['warmup_s']:.1f} | {peak} | {100 * r['compute_fraction']:.1f}% "
                 f"| {_fid(r['fidelity'])} |")
    L += ["", "Rows: " + "; ".join(f"`{r['key']}` = {r['label']}" for r in doc["rows"]) + ".", "",
          f"Options: {json.dumps(doc.get('options', {}))}. Grids: {doc['grids'].get('mapping', '')}; replayed "
          "from qc-ref `quantcache` runs (random weights make adaptive statistics meaningless); AIGQ's precision "
          "requests in them (`high`) " + ("run the FP8 plan's `high` variant (every linear bf16, as in "
          "`calibrate --uniform` plans)" if doc.get("options", {}).get("fp8_plan_variants") else
          "run the one FP8 plan (the plan has no variants)") + ", as in the fidelity runs.", ""]
    if doc.get("notes"):
        L += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    L += ["## Overheads a user pays", "", "| what | value |", "|---|---|"]
    for o in doc["overheads"]:
        val = f"skipped: {o['skipped']}" if "skipped" in o else f"{o['value']:.3g} {o['unit']}"
        L.append(f"| `{o['key']}`: {o['what']} | {val} |")
    prof = {r["key"]: r["profile_per_block"] for r in doc["rows"] if "profile_per_block" in r}
    if prof:
        classes = sorted({c for p in prof.values() for c in p["ms_by_class"]},
                         key=lambda c: -max(p["ms_by_class"].get(c, 0.0) for p in prof.values()))
        L += ["", "## Where the time goes per computed block (ms)", "",
              "Kernel time by class (torch.profiler over a short run, divided by the computed blocks); launch gaps = "
              "the timed run's median step / blocks minus kernel time.", "",
              "| class | " + " | ".join(f"`{k}`" for k in prof) + " |", "|---|" + "---|" * len(prof)]
        for c in classes + ["launch_gaps", "wall"]:
            vals = [p["ms_by_class"].get(c, 0.0) if c in classes else p["launch_gaps_ms" if c == "launch_gaps"
                                                                            else "wall_ms"] for p in prof.values()]
            L.append(f"| {c.replace('_', ' ')} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    from qc_compile.artifacts import write_bytes_atomic

    write_bytes_atomic(Path(path).with_suffix(".md"), ("\n".join(L) + "\n").encode())


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--make-grids", dest="mode_grids", action="store_true",
                      help="compute the qc-ref decision grids (CPU) into --grids")
    mode.add_argument("--fidelity", action="store_true", help="qc-ref fidelity of each configuration")
    mode.add_argument("--render", default=None, metavar="JSON", help="re-render the .md of a result JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results", help="timing: output folder (e2e_<gpu>.json/.md)")
    ap.add_argument("--stem", default=None, help="output name without suffix (default e2e_<gpu>)")
    ap.add_argument("--grids", default=str(GRIDS_JSON), help="the decision grids (read; --make-grids writes it)")
    ap.add_argument("--fidelity-json", default=None, help="the --fidelity output to put beside the rows")
    ap.add_argument("--out-fidelity", default=None, help="--fidelity: output (default bench/results/"
                                                         "e2e_fidelity_<device>.json)")
    ap.add_argument("--rows", nargs="*", default=None, choices=ROW_KEYS)
    ap.add_argument("--configs", nargs="*", default=None, help="--fidelity: only these configurations")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--long-steps", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="tiny model and size (CPU smoke run of the same code)")
    ap.add_argument("--depth", type=int, default=None, help="blocks per kind (default: the model's)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--no-compile", action="store_true", help="our rows without torch.compile")
    ap.add_argument("--compile-backend", default=None, help="regional compile backend (default inductor; "
                                                             "--quick: eager)")
    ap.add_argument("--cuda-graphs", action="store_true", help="our rows with per-unit CUDA graphs")
    ap.add_argument("--stats", default=None, choices=("full", "cache", "none"),
                    help="statistics level of every our row (default: ours_fp8 follows its policy, none; the "
                         "cached rows full)")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=2, help="0: no per-block profile")
    ap.add_argument("--no-graph-overhead", action="store_true", help="skip the CUDA-graph memory measurement")
    ap.add_argument("--grid-prompts", type=int, default=2, help="--make-grids: tuning captions in the batch")
    ap.add_argument("--set-long", nargs="*", default=[], metavar="KEY=VALUE",
                    help="quantcache overrides for the 100-step grid/fidelity (e.g. hlc.tau_max=10)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="quantcache overrides for the 30-step FP8 grid (both_30) and its fidelity (ours_both), as "
                         "`run --set`: e.g. aigq.post_skip=null aigq.schedule=high,high,default,...")
    ap.add_argument("--variant", action="append", nargs="+", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="--fidelity: one more ours_both configuration, `ours_both~NAME`, with these quantcache "
                         "overrides on top of --set (repeatable; all share the reference videos)")
    ap.add_argument("--fp8-keep", nargs="*", default=[], metavar="ROLE",
                    help="block linear roles (fnmatch) the FP8 block plan keeps bf16, in every row and the fidelity "
                         "runs, e.g. cross_attn.kv_linear (the caption-token linear)")
    ap.add_argument("--captions", type=int, default=32, help="--fidelity: held-out captions")
    ap.add_argument("--caption-seed", type=int, default=EVAL_CAPTION_SEED,
                    help=f"--fidelity: caption set (default {EVAL_CAPTION_SEED}, the held-out one; "
                         f"{GRID_PROMPT_SEED}: the tuning captions, for choosing settings)")
    ap.add_argument("--noise-seeds", default="0", metavar="S[,S...]",
                    help="--fidelity: noise seeds; caption k starts from seed + k (issue 12's sweep: 0,1000)")
    ap.add_argument("--batch", type=int, default=1, help="--fidelity: captions per generate call")
    ap.add_argument("--plan", type=Path, default=None,
                    help="--fidelity: a calibrated qc-ref plan.json (what `calibrate` wrote) instead of the "
                         "uncalibrated FP8 block plan; the policies read its parameters and per-step schedule")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    if args.plan is not None and not (args.fidelity or args.mode_grids):
        ap.error("--plan is for --fidelity and --make-grids (the XL timing rows replay grids; their FP8 weights are "
                 "the FP8 block plan's, the grids carry a calibrated plan's decisions and per-step variants)")
    try:
        if not [int(x) for x in args.noise_seeds.split(",")]:
            raise ValueError
    except ValueError:
        ap.error(f"--noise-seeds {args.noise_seeds!r}: expected integers separated by commas, e.g. 0,1000")
    if args.quick:
        args.steps, args.long_steps = min(args.steps, 3), min(args.long_steps, 5)
        args.profile_steps = min(args.profile_steps, 1)
        args.no_compile = args.no_compile or not args.device.startswith("cuda")
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.quick and not args.device.startswith("cuda") else "inductor"
    if args.out_fidelity is None:
        args.out_fidelity = str(RESULTS / f"e2e_fidelity_{'gpu' if args.device.startswith('cuda') else 'cpu'}.json")
    return args


def main(argv: list[str] | None = None) -> int:
    from qc_compile.errors import UserError

    args = parse_args(argv)
    try:
        return _main(args)
    except UserError as e:  # ArtifactError is one: a bad --plan, a bad grids file
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    if args.render:
        if args.fidelity_json:
            attach_fidelity(Path(args.render), Path(args.fidelity_json))
        render(Path(args.render))
    elif args.mode_grids:
        run_grids(args)
    elif args.fidelity:
        run_fidelity(args)
    else:
        run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
