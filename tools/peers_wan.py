"""The peers' own code beside qc-compile's policies on the same trained Wan-architecture model (qc-ref-wan).

Every row samples the same held-out captions with the same noise through ``QCRefWan.sample`` (WanPipeline's
calling convention) with one method installed on the transformer, and is compared with the uncached run of the
same model, dtype and device:

* **diffusers' own cache hooks**, unmodified, through ``transformer.enable_cache(config)``: First-Block Cache,
  TaylorSeer, MagCache (ratios calibrated first with ``MagCacheConfig(calibrate=True)`` on *tuning* captions, as
  its docs prescribe), FasterCache (needs the batched [uncond; cond] call, so its baseline is the batched run),
  Pyramid Attention Broadcast, SeaCache (``raw_vision_callback`` returns the RGB part of the input: the frame
  channel is a hint, not output);
* **cache-dit's DBCache** (``cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...))``, its Wan
  adapter) when ``cache_dit`` is importable;
* **quantization peers** (CUDA only): torchao FP8 (dynamic activation + weight, per row) and NVIDIA ModelOpt's
  ``FP8_DEFAULT_CFG`` PTQ (calibrated on tuning captions), on a copy of the transformer;
* **qc-compile's policies** through ``qc_compile.enable(transformer, policy=...)``.

Per row: wall time (CUDA-synchronised, the hooks' own run, no counters attached), its ratio to the baseline's,
the fraction of block linear multiply-adds actually executed (counted by forward hooks on every ``nn.Linear`` of
the blocks in a separate pass — the one compute measure that every method, hook or policy, can be read with),
PSNR mean/min and SSIM against the baseline videos, and the caption checker (colour/shape/direction/all).

Rows run in the order ours, cache-dit, quantization, diffusers. A peer whose library is missing or fails to import
(or a diffusers without one of the hook classes) gives skipped rows with the reason; ``--budget-s`` records rows
that would end past the budget as skipped; the JSON is rewritten after every row (``complete`` false until the end)
so a run that is killed keeps its finished rows (``--from-json`` re-renders its table and plot).

    bash tools/gpu_issue16.sh OUTDIR COMMIT                                        # the GPU run (one H200)
    python tools/peers_wan.py --device cuda --n 32 --budget-s 170 --json OUT.json --plot OUT.png
    python tools/peers_wan.py --checkpoint FOLDER --n 2 --steps 6 --device cpu     # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_reference import EVAL_SEED  # noqa: E402

TUNING_SEED = 7  # MagCache calibration / ModelOpt calibration captions: never the held-out ones


# ------------------------------------------------------------------------------------------------------------ rows
@dataclass
class Method:
    label: str
    family: str  # "baseline" | "diffusers" | "cache-dit" | "quant" | "qc-compile"
    apply: Callable[[Any], Any]  # loaded -> handle (installs the method on loaded.transformer or swaps it)
    remove: Callable[[Any, Any], None]  # (loaded, handle)
    config: dict = field(default_factory=dict)
    cfg_batched: bool = False
    needs_cuda: bool = False
    before_generation: Callable[[Any], None] | None = None  # e.g. cache-dit's refresh_context


def _linear_counter(transformer: torch.nn.Module):
    """Context manager counting multiply-adds of every nn.Linear inside the transformer's blocks."""
    total = [0]
    handles = []

    def hook(mod, inp, _out):
        total[0] += inp[0].shape[:-1].numel() * mod.in_features * mod.out_features

    from qc_compile.runtime.fast_linear import FastLinear  # qc-compile's own FP8 linears count as the linears they replace

    for name, mod in transformer.named_modules():
        if isinstance(mod, (torch.nn.Linear, FastLinear)) and re.match(r"^(blocks|transformer_blocks)\.", name):
            handles.append(mod.register_forward_hook(hook))

    @contextlib.contextmanager
    def ctx():
        try:
            yield total
        finally:
            for h in handles:
                h.remove()
    return ctx()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(loaded, captions: list[str], args, cfg_batched: bool, videos: torch.Tensor,
           before=None) -> tuple[float, float]:
    """(median wall time of ``args.repeats`` generations, their largest deviation from ``videos``): a method whose
    state leaks from one generation into the next shows a deviation > 0."""
    times, dev = [], 0.0
    for _ in range(max(1, args.repeats)):
        v, t = _generate(loaded, captions, args, cfg_batched, before)
        times.append(t)
        dev = max(dev, float((v - videos).abs().max()))
    times.sort()
    return times[len(times) // 2], dev


def _generate(loaded, captions: list[str], args, cfg_batched: bool, before=None) -> tuple[torch.Tensor, float]:
    _sync(loaded.device)
    start = time.perf_counter()
    out = []
    for i in range(0, len(captions), args.batch):
        if before is not None:
            before(loaded)
        out.append(loaded.sample(captions[i:i + args.batch], seed=args.seed + i, steps=args.steps,
                                 cfg_batched=cfg_batched))
    videos = torch.cat(out)
    _sync(loaded.device)
    return videos, time.perf_counter() - start


def _fidelity(videos: torch.Tensor, ref: torch.Tensor) -> dict:
    from qc_compile.metrics.fidelity import compare_videos

    per = [compare_videos(v, r) for v, r in zip(videos, ref)]
    p = [c["psnr_db"] for c in per]
    return {"psnr_db": sum(p) / len(p), "psnr_db_min": min(p), "ssim": sum(c["ssim"] for c in per) / len(per)}


def _checker(videos: torch.Tensor, captions: list[str]) -> dict:
    from qc_compile.metrics.caption_checker import score_videos

    s = score_videos(list(videos), captions)
    return {k: s[k] for k in ("color", "shape", "direction", "background", "all")}


# ------------------------------------------------------------------------------------------------- the methods
def _diffusers_hook(label: str, make_config: Callable[[Any], Any], config: dict, cfg_batched: bool = False) -> Method:
    def apply(loaded):
        loaded.transformer.enable_cache(make_config(loaded))
        return None

    def remove(loaded, _):
        loaded.transformer.disable_cache()
    return Method(label, "diffusers", apply, remove, config, cfg_batched)


def calibrate_magcache(loaded, args) -> list[float]:
    """MagCache's documented calibration: run once with ``calibrate=True`` and take the printed ratios (of the
    ``cond`` context, the first printed; ``uncond`` prints its own)."""
    from diffusers import MagCacheConfig

    from qc_compile.data.shapes import sample_captions

    caps = [c.text() for c in sample_captions(min(4, args.n), seed=TUNING_SEED)]
    loaded.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=args.steps))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            loaded.sample(caps, seed=1000, steps=args.steps)
    finally:
        loaded.transformer.disable_cache()
    found = re.findall(r"\[([0-9eE.,\s+-]+)\]", buf.getvalue())
    if not found:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()[:500]!r}")
    return [float(x) for x in found[0].split(",")]


def diffusers_methods(loaded, args) -> tuple[list[Method], list[dict]]:
    """The diffusers hook rows, and a skipped row (with its reason) for each hook this diffusers lacks or that
    cannot be prepared (MagCache's calibration)."""
    import diffusers

    ts = lambda: loaded.current_timestep  # noqa: E731  (the pipelines' current_timestep)
    out: list[Method] = []
    skipped: list[dict] = []
    have = {n: getattr(diffusers, n, None) for n in ("FirstBlockCacheConfig", "TaylorSeerCacheConfig",
                                                     "MagCacheConfig", "PyramidAttentionBroadcastConfig",
                                                     "FasterCacheConfig", "SeaCacheConfig")}

    def missing(cls: str, label: str) -> bool:
        if have[cls] is None:
            skipped.append(_skipped(label, "diffusers", f"diffusers {diffusers.__version__} has no {cls}"))
        return have[cls] is None
    FirstBlockCacheConfig, TaylorSeerCacheConfig = have["FirstBlockCacheConfig"], have["TaylorSeerCacheConfig"]
    MagCacheConfig, PyramidAttentionBroadcastConfig = have["MagCacheConfig"], have["PyramidAttentionBroadcastConfig"]
    FasterCacheConfig = have["FasterCacheConfig"]
    for thr in ([] if missing("FirstBlockCacheConfig", "diffusers FBCache") else (0.05, 0.1, 0.2)):  # 0.05 is the config default
        out.append(_diffusers_hook(f"diffusers FBCache thr={thr}", lambda _, t=thr: FirstBlockCacheConfig(threshold=t),
                                   {"threshold": thr}))
    # TaylorSeer's default module patterns ("^blocks.*attn" under re.fullmatch) match no module of Wan (attn1/attn2
    # end in a digit), so the documented default hooks nothing here: kept as a row (it shows that), plus the same
    # config with cache_identifiers naming Wan's attention and FFN modules, and the documented lite mode.
    wan_modules = [r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn"]
    ts_variants = (("default patterns", {}), ("Wan attn+ffn", {"cache_identifiers": wan_modules}),
                   ("lite", {"use_lite_mode": True}))
    for label, extra in ([] if missing("TaylorSeerCacheConfig", "diffusers TaylorSeer") else ts_variants):
        for interval in (5, 3):  # 5 is the default
            if label == "default patterns" and interval != 5:
                continue
            out.append(_diffusers_hook(
                f"diffusers TaylorSeer {label} interval={interval}",
                lambda _, k=interval, e=extra: TaylorSeerCacheConfig(cache_interval=k, disable_cache_before_step=3,
                                                                      max_order=1, taylor_factors_dtype=torch.float32,
                                                                      **e),
                {"cache_interval": interval, "disable_cache_before_step": 3, "max_order": 1,
                 "taylor_factors_dtype": "float32", **extra}))
    ratios = None
    if not missing("MagCacheConfig", "diffusers MagCache"):
        try:
            ratios = calibrate_magcache(loaded, args)
        except Exception as e:  # noqa: BLE001  (a peer that cannot be prepared is a result: said, not fatal)
            skipped.append(_skipped("diffusers MagCache", "diffusers",
                                    f"calibration failed: {type(e).__name__}: {e}"))
    for thr in (0.06, 0.12, 0.24) if ratios is not None else ():  # 0.06 is the default
        out.append(_diffusers_hook(
            f"diffusers MagCache thr={thr}",
            lambda _, t=thr: MagCacheConfig(threshold=t, num_inference_steps=args.steps, mag_ratios=ratios),
            {"threshold": thr, "max_skip_steps": 3, "retention_ratio": 0.2, "mag_ratios": ratios}))
    for rng in [] if missing("PyramidAttentionBroadcastConfig", "diffusers PAB") else (2, 3):  # docs' CogVideoX: 2
        out.append(_diffusers_hook(
            f"diffusers PAB spatial={rng}",
            lambda _, r=rng: PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=r,
                                                             spatial_attention_timestep_skip_range=(100, 800),
                                                             current_timestep_callback=ts),
            {"spatial_attention_block_skip_range": rng, "spatial_attention_timestep_skip_range": [100, 800]}))
    if not missing("FasterCacheConfig", "diffusers FasterCache"):
        out.append(_diffusers_hook(
            "diffusers FasterCache",  # the docs' example values
            lambda _: FasterCacheConfig(spatial_attention_block_skip_range=2,
                                        spatial_attention_timestep_skip_range=(-1, 681),
                                        current_timestep_callback=ts, attention_weight_callback=lambda _: 0.3,
                                        low_frequency_weight_update_timestep_range=(99, 901),
                                        high_frequency_weight_update_timestep_range=(-1, 301),
                                        is_guidance_distilled=False),
            {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": [-1, 681],
             "attention_weight": 0.3, "note": "batched [uncond; cond] calls; compared with the batched baseline"},
            cfg_batched=True))
    if not missing("SeaCacheConfig", "diffusers SeaCache"):
        SeaCacheConfig = have["SeaCacheConfig"]

        def rgb(module, args_, kwargs):
            h = kwargs.get("hidden_states", args_[0] if args_ else None)
            return list(h[:, :3].unbind(0))  # the generated channels; the frame channel is a hint
        for thr in (0.25, 0.5):  # 0.25 is the default
            out.append(_diffusers_hook(f"diffusers SeaCache thr={thr}",
                                       lambda _, t=thr: SeaCacheConfig(threshold=t, raw_vision_callback=rgb),
                                       {"threshold": thr}))
    return out, skipped


def _skipped(label: str, family: str, reason: str) -> dict:
    """A row that did not run, and why (a missing library, the time budget): kept in the table, never silent."""
    return {"label": label, "family": family, "skipped": reason, "config": {}}


def _optional_import(module: str):
    """``(module, None)`` or ``(None, reason)``: any failure to import a peer's library (missing, or broken against
    this torch/CUDA) skips its rows with the reason instead of ending the sweep."""
    import importlib

    try:
        return importlib.import_module(module), None
    except Exception as e:  # noqa: BLE001
        return None, f"{module} not importable here ({type(e).__name__}: {str(e)[:300]})"


def cache_dit_methods(loaded, args) -> tuple[list[Method], str | None]:
    cache_dit, why = _optional_import("cache_dit")
    if cache_dit is None:
        return [], f"cache-dit: {why}; pip install cache-dit"

    out = []
    for fn, bn, thr in ((1, 0, 0.08), (2, 0, 0.08), (1, 0, 0.16)):
        def apply(loaded, fn=fn, bn=bn, thr=thr):
            cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=fn, Bn_compute_blocks=bn, residual_diff_threshold=thr,
                                          num_inference_steps=args.steps)
            cache_dit.enable_cache(loaded.transformer, cache_config=cfg)

        def remove(loaded, _):
            cache_dit.disable_cache(loaded.transformer)

        def refresh(loaded):  # transformer-only use: a new generation must refresh cache-dit's context
            cache_dit.refresh_context(loaded.transformer, num_inference_steps=args.steps)
        out.append(Method(f"cache-dit DBCache F{fn}B{bn} thr={thr}", "cache-dit", apply, remove,
                          {"Fn_compute_blocks": fn, "Bn_compute_blocks": bn, "residual_diff_threshold": thr,
                           "max_warmup_steps": 8, "version": getattr(cache_dit, "__version__", "?")},
                          before_generation=refresh))
    return out, None


def _swap(loaded, new):
    old = loaded.transformer
    loaded.transformer = new
    return old


OURS_FP8_LABEL = "qc-compile FP8 W8A8 (per-token, qc:: kernels)"
AO_LABEL = "torchao FP8 dyn-act+weight (per row)"
MO_LABEL = "ModelOpt FP8 PTQ (FP8_DEFAULT_CFG)"


def _unswap(loaded, old) -> None:
    """Put the original transformer back (``old`` is None when the quantized copy was never installed)."""
    if old is not None:
        _swap(loaded, old)


def quant_methods(loaded, args) -> tuple[list[Method], list[str], list[dict]]:
    from qc_compile.diffusers_quant import quantize_blocks, restore

    notes: list[str] = []
    skipped: list[dict] = []
    # ours first, as torchao's row: every block linear swapped in place (no step executor), the same scope
    out: list[Method] = [Method(OURS_FP8_LABEL, "quant",
                                lambda loaded: quantize_blocks(loaded.transformer.blocks, "fp8"),
                                lambda loaded, swaps: restore(swaps),
                                {"quantize": "fp8 (qc_compile.enable(..., quantize='fp8') without a policy)",
                                 "scope": "block linears"})]
    if loaded.device.type != "cuda":  # ours runs on the CPU too (the qc:: kernels' reference)
        return out, ["quantization peers (torchao FP8, ModelOpt FP8) run on CUDA only: skipped"], []
    aoq, why = _optional_import("torchao.quantization")
    if aoq is None:
        notes.append(f"torchao FP8: {why}")
        skipped.append(_skipped(AO_LABEL, "quant", why))
    else:
        Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_ = (
            aoq.Float8DynamicActivationFloat8WeightConfig, aoq.PerRow, aoq.quantize_)

        def apply_ao(loaded):
            q = copy.deepcopy(loaded.transformer).to(torch.bfloat16)
            quantize_(q, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name.startswith("blocks."))
            return _swap(loaded, q)
        out.append(Method(AO_LABEL, "quant", apply_ao, _unswap,
                          {"config": "Float8DynamicActivationFloat8WeightConfig(PerRow)", "scope": "block linears"},
                          needs_cuda=True))
    mtq, why = _optional_import("modelopt.torch.quantization")
    if mtq is None:
        notes.append(f"ModelOpt FP8: {why}")
        skipped.append(_skipped(MO_LABEL, "quant", why))
    else:
        from qc_compile.data.shapes import sample_captions

        def apply_mo(loaded):
            q = copy.deepcopy(loaded.transformer).to(torch.bfloat16)
            old = _swap(loaded, q)
            caps = [c.text() for c in sample_captions(4, seed=TUNING_SEED)]
            try:
                mtq.quantize(q, mtq.FP8_DEFAULT_CFG, forward_loop=lambda _: loaded.sample(caps, seed=2000,
                                                                                           steps=args.steps))
            except BaseException:
                _swap(loaded, old)  # the model the later rows run is the original one
                raise
            return old
        out.append(Method(MO_LABEL, "quant", apply_mo, _unswap,
                          {"config": "mtq.FP8_DEFAULT_CFG", "calibration": "4 tuning captions x all steps"},
                          needs_cuda=True))
    return out, notes, skipped


def ours_methods(policies: list[str], overrides: dict[str, dict]) -> list[Method]:
    import qc_compile

    out = []
    for spec in policies:
        ov = overrides.get(spec, {})

        def apply(loaded, spec=spec, ov=ov):
            return qc_compile.enable(loaded.transformer, policy=spec, overrides=ov or None, num_steps=None)

        def remove(loaded, session):
            qc_compile.disable(loaded.transformer)
        label = "qc-compile " + spec + "".join(f" {k}={v}" for k, v in ov.items())
        out.append(Method(label, "qc-compile", apply, remove, {"policy": spec, "overrides": ov}))
    return out


# --------------------------------------------------------------------------------------------------- the sweep
def run(args, on_row: Callable[[dict], None] | None = None) -> dict:
    """The sweep. ``on_row(result)`` is called after the baseline and after every row with the result so far
    (``complete`` false until the end), so a run cut short still leaves its finished rows."""
    import diffusers

    from qc_compile.data.shapes import sample_captions
    from qc_compile.models import load_model

    start = time.perf_counter()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    loaded = load_model("qc-ref-wan", args.checkpoint, device=args.device, dtype=dtype)
    if args.steps is None:
        args.steps = loaded.defaults.steps
    captions = [c.text() for c in sample_captions(args.n, seed=EVAL_SEED)]
    if args.compile:
        loaded.transformer.compile_repeated_blocks(fullgraph=False)
    notes: list[str] = []
    # the baselines: warm-up, then timed; the separate-CFG run is the reference of every row but FasterCache
    base = {}
    for batched in (False, True):
        _generate(loaded, captions[: args.batch], args, batched)  # warm-up (and compilation)
        with _linear_counter(loaded.transformer) as macs:
            videos, _ = _generate(loaded, captions, args, batched)
        seconds, _ = _timed(loaded, captions, args, batched, videos)
        base[batched] = {"videos": videos, "seconds": seconds, "macs": macs[0]}
    scored = time.perf_counter()
    ckpt_caps = _checker(base[False]["videos"], captions)
    scoring_s = 2.5 * (time.perf_counter() - scored)  # a row's checker + PSNR/SSIM on the host, about
    rows: list[dict] = [{"label": "baseline (no cache)", "family": "baseline", "seconds": base[False]["seconds"],
                         "time_ratio": 1.0, "linear_mac_fraction": 1.0, "psnr_db": None, "psnr_db_min": None,
                         "ssim": None, "checker": ckpt_caps, "config": {}}]
    res = {"schema_version": 1, "complete": False, "model": "qc-ref-wan", "checkpoint": loaded.checkpoint,
           "device": str(loaded.device), "device_name": torch.cuda.get_device_name() if loaded.device.type == "cuda"
           else platform.processor() or "cpu", "dtype": args.dtype, "compiled_blocks": bool(args.compile),
           "commit": _commit(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "captions": {"n": args.n, "caption_seed": EVAL_SEED, "noise_seed": args.seed}, "steps": args.steps,
           "repeats": args.repeats, "budget_s": args.budget_s, "cache_dit": _version("cache_dit"),
           "torchao": _version("torchao"), "modelopt": _version("modelopt"),
           "baseline_batched_cfg_seconds": base[True]["seconds"], "rows": rows, "notes": notes,
           "measures": "seconds: median wall time of sampling all captions over the repeats (CUDA-synchronised, "
                       "no counters attached, stateful hooks reset between runs as pipelines do); "
                       "linear_mac_fraction: block nn.Linear multiply-adds executed / the baseline's (counted in "
                       "a separate pass); psnr/ssim vs the baseline videos of the same CFG mode"}
    if on_row:
        on_row(res)
    # ours first, then the families with few rows (cache-dit, quantization), diffusers' 16 hook rows last: a sweep
    # cut short by its budget keeps ours and every family
    methods: list[Method] = []
    skipped: list[dict] = []
    wanted = set(args.families.split(","))
    if "qc-compile" in wanted:
        ov: dict[str, dict] = {}
        for item in args.set:
            k, v = item.split("=", 1)
            pol, param = k.split(":", 1) if ":" in k else (args.ours.split(",")[0], k)
            ov.setdefault(pol, {})[param] = v
        methods += ours_methods([p for p in args.ours.split(",") if p], ov)
        from tune_policies import parse_config  # the same "POLICY key=value ..." syntax as its --config

        for text in args.ours_config:  # one more row of ours with its own overrides
            spec, ov = parse_config(text)
            methods += ours_methods([spec], {spec: ov})
    if "cache-dit" in wanted:
        m, note = cache_dit_methods(loaded, args)
        methods += m
        if note:
            notes.append(note)
            skipped.append(_skipped("cache-dit DBCache", "cache-dit", note))
    if "quant" in wanted:
        m, n, sk = quant_methods(loaded, args)
        methods += m
        notes += n
        skipped += sk
    if "diffusers" in wanted:
        m, sk = diffusers_methods(loaded, args)
        methods += m
        skipped += sk
    if args.only:
        methods = [m for m in methods if re.search(args.only, m.label)]  # skipped rows stay: they say why
    rows += skipped
    for r in skipped:
        print(_row_line(r), flush=True)
    # a row costs about (1 counted + 1 warm-up + repeats) generations and its scoring; one that would not finish
    # within the budget is not started but recorded as skipped
    row_cost = (args.repeats + 2) * max(base[False]["seconds"], base[True]["seconds"]) + scoring_s
    for m in methods:
        row: dict[str, Any] = {"label": m.label, "family": m.family, "config": m.config,
                               "cfg_batched": m.cfg_batched}
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed + row_cost > args.budget_s:
            row["skipped"] = (f"not run: the sweep's --budget-s {args.budget_s:g} s would be passed "
                              f"({elapsed:.0f} s spent, a row takes about {row_cost:.0f} s)")
            rows.append(row)
            print(_row_line(row), flush=True)
            continue
        ref = base[m.cfg_batched]
        handle = None
        try:
            handle = m.apply(loaded)
            with _linear_counter(loaded.transformer) as macs:
                videos, _ = _generate(loaded, captions, args, m.cfg_batched, m.before_generation)
            if args.compile or m.family == "quant":  # warm-up / compilation of the new code path
                _generate(loaded, captions[: args.batch], args, m.cfg_batched, m.before_generation)
            seconds, dev = _timed(loaded, captions, args, m.cfg_batched, videos, m.before_generation)
            row.update(seconds=seconds, repeat_max_abs_dev=dev, time_ratio=seconds / ref["seconds"],
                       linear_mac_fraction=macs[0] / ref["macs"], **_fidelity(videos, ref["videos"]),
                       checker=_checker(videos, captions))
            if m.family == "qc-compile":
                row["compute_fraction"] = handle.compute_fraction
        except Exception as e:  # a peer that fails on this model is a result too: recorded, the sweep goes on
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            try:
                m.remove(loaded, handle)
            except Exception as e:
                row.setdefault("error", f"remove failed: {type(e).__name__}: {e}")
        row["row_wall_s"] = time.perf_counter() - start - elapsed
        rows.append(row)
        print(_row_line(row), flush=True)
        if on_row:
            on_row(res)
    retime_baselines(loaded, captions, args, base, rows, res)
    res["complete"] = True
    res["wall_s"] = time.perf_counter() - start
    return res


def retime_baselines(loaded, captions: list[str], args, base: dict, rows: list[dict], res: dict) -> None:
    """Time both baselines again after every row and divide by the faster of the two timings: a baseline slowed by
    something else on the machine at the start (a background build, clocks) must not flatter the rows."""
    for batched in (False, True):
        again, _ = _timed(loaded, captions, args, batched, base[batched]["videos"])
        first = base[batched]["seconds"]
        base[batched].update(seconds_start=first, seconds_end=again, seconds=min(first, again))
    res["baseline_seconds"] = {("batched_cfg" if b else "separate_cfg"): {"start": base[b]["seconds_start"],
                                                                          "end": base[b]["seconds_end"]}
                               for b in (False, True)}
    res["baseline_batched_cfg_seconds"] = base[True]["seconds"]
    for r in rows:
        if r.get("family") == "baseline":
            r["seconds"] = base[False]["seconds"]
        elif r.get("seconds") is not None:
            r["time_ratio"] = r["seconds"] / base[bool(r.get("cfg_batched"))]["seconds"]


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "?")
    except ImportError:
        return None


def _commit() -> str:
    """The commit measured: QC_COMMIT where the tree is a copy without its .git (the GPU machine), else git HEAD."""
    from qc_compile.commands.sweep import _git_commit

    return _git_commit() or "unknown"


def _row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['label']:<44} ERROR {r['error']}"
    if "skipped" in r:
        return f"{r['label']:<44} SKIPPED {r['skipped']}"
    f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
    return (f"{r['label']:<44} {f(r.get('seconds'), '8.2f')} s  x{f(r.get('time_ratio'), '.3f')}  "
            f"MACs {f(r.get('linear_mac_fraction'), '.3f')}  PSNR {f(r.get('psnr_db'), '.2f')} "
            f"(min {f(r.get('psnr_db_min'), '.2f')})  SSIM {f(r.get('ssim'), '.4f')}  "
            f"checker {f(r['checker']['all'] if r.get('checker') else None, '.3f')}")


def to_markdown(res: dict) -> str:
    lines = [f"# Peers' own code vs qc-compile on qc-ref-wan ({res['device_name']}, {res['dtype']}, commit "
             f"{res['commit']})", ""]
    if not res.get("complete", True):
        lines += ["**Incomplete run**: the rows below are the ones that finished before the run was stopped.", ""]
    lines += [
             f"{res['captions']['n']} held-out captions (seed {res['captions']['caption_seed']}), {res['steps']} "
             f"steps, torch {res['torch']}, diffusers {res['diffusers']}. {res['measures']}.", "",
             "| method | family | time (s) | time / baseline | block MACs | PSNR dB (min) | SSIM | colour | shape | "
             "direction | all |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['family']} | error: {r['error']} | | | | | | | | |")
            continue
        if "skipped" in r:
            lines.append(f"| {r['label']} | {r['family']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        c = r["checker"]
        p = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.2f} ({r['psnr_db_min']:.2f})"
        s = "-" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['label']} | {r['family']} | {r['seconds']:.2f} | {r['time_ratio']:.3f} | "
                     f"{r['linear_mac_fraction']:.3f} | {p} | {s} | {c['color']:.3f} | {c['shape']:.3f} | "
                     f"{c['direction']:.3f} | {c['all']:.3f} |")
    lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qc_compile.runtime.sweep import pareto_front

    rows = [r for r in res["rows"] if r.get("psnr_db") is not None]  # measured rows (not errors / skipped)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colours = {"diffusers": "tab:blue", "cache-dit": "tab:orange", "quant": "tab:green", "qc-compile": "tab:red"}
    for ax, key, xlabel in ((axes[0], "linear_mac_fraction", "block linear MACs executed (fraction of baseline)"),
                            (axes[1], "time_ratio", f"wall time / baseline ({res['device_name']})")):
        pts = [(r[key], min(r["psnr_db"], 60.0)) for r in rows]
        for r, p in zip(rows, pts):
            ax.scatter(*p, s=26, color=colours.get(r["family"], "gray"))
            ax.annotate(r["label"], p, fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front(pts)
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="k", lw=0.8, alpha=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR vs baseline (dB, capped at 60)")
    for fam, col in colours.items():
        axes[0].scatter([], [], color=col, label=fam)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"qc-ref-wan: peers' own code vs qc-compile (commit {res['commit']}"
                 f"{'' if res.get('complete', True) else ', INCOMPLETE run'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="qc-ref-wan folder (default: the shipped one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--n", type=int, default=32, help="held-out captions")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per row (median)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the repeated blocks for every row")
    ap.add_argument("--families", default="diffusers,cache-dit,quant,qc-compile")
    ap.add_argument("--ours", default="quantcache,hlc,fbcache,dbcache,teacache,pab,fora,interval")
    ap.add_argument("--set", action="append", default=[], help="POLICY:policy.param=value for --ours rows")
    ap.add_argument("--ours-config", action="append", default=[], metavar="'POLICY k=v ...'",
                    help="one more row of ours: a policy and its overrides (repeatable; e.g. 'hlc hlc.delta1=0.2')")
    ap.add_argument("--only", default=None, help="regex: keep the methods whose label matches")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run: a row that would end past it is recorded as skipped")
    ap.add_argument("--from-json", default=None,
                    help="only re-render --md/--plot from a result JSON (e.g. a run stopped early)")
    args = ap.parse_args(argv)
    for text in args.ours_config:
        parts = text.split()
        if not parts or any("=" not in kv for kv in parts[1:]):
            ap.error(f"--ours-config {text!r}: expected a policy followed by key=value overrides, e.g. "
                     f"'hlc hlc.delta1=0.2 hlc.delta2=0.2'")
    from qc_compile.artifacts import write_json_atomic

    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        if args.dtype is None:
            args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"

        def save(r: dict) -> None:  # after every row: a run that is stopped keeps what it finished
            if args.json:
                write_json_atomic(args.json, json.loads(json.dumps(r, default=float)))
        res = run(args, on_row=save)
        save(res)
    if args.md or args.json:
        Path(args.md or Path(args.json or args.from_json).with_suffix(".md")).write_text(to_markdown(res))
    if args.plot:
        plot(res, args.plot)
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
