"""Time one whole Open-Sora 1.2 text-to-video request: T5 encode, the DiT sampling loop, VAE decode (GPU).

Random weights of the real architectures (T5 v1.1 XXL encoder, STDiT3-XL/2, OpenSora-VAE-v1.2), built on the device
in bf16, all resident at once as a server would hold them; 480p 9:16 (480 x 854 -> latent 4 x 15 x 60 x 106),
51 frames, CFG, 30 RFLOW steps, one prompt. Per configuration (row) and phase: seconds (CUDA events around the phase;
wall clock on the CPU), and the peak memory allocated during the phase (counter reset per phase), plus the total.
Each phase runs once untimed first (T5 and VAE: the same call; DiT: a 2-step loop) so cuDNN/compile warm-up is
reported separately, not inside the numbers.

Rows (``--rows``): ``plain_bf16_eager`` and ``plain_bf16_compile`` (the model's own ``STDiT3.forward`` with packed
captions, as Open-Sora runs it; ``compile`` = every block ``torch.compile``d, the one line a user writes: the
strongest baseline a user has), ``ours_fp8`` (our fast runner with the FP8 W8A8 block plan, compiled, per-unit
CUDA graphs, every unit computed), ``ours_headline`` (the same runner under the quantcache decisions replayed from
the qc-ref run, ``bench/results/e2e_grids.json`` mapped by relative depth as ``tools/bench_e2e.py`` does: random
weights make adaptive statistics meaningless). Our rows compute the per-unit statistics policies read, so they
carry work the baselines do not. T5 and VAE are the same bf16 modules in every row.

    python tools/bench_request.py                                  # GPU, full size: JSON to bench/results/
    python tools/bench_request.py --tiny --device cpu --steps 2 --rows bf16_eager   # CPU smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

PROMPT = ("A drone shot of waves crashing against rugged cliffs at sunset, golden light on the wet rocks, the camera "
          "slowly moving along the coast.")
ROWS = ("plain_bf16_eager", "plain_bf16_compile", "ours_fp8", "ours_headline")
GRID_KEY = "both_30"  # the FP8 + quantcache grid of tools/bench_e2e.py


def _commit(given: str | None) -> str:
    if given:
        return given
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.check_output(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Timer:
    """Seconds and peak memory of one phase: CUDA events on the GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def phase(self, out: dict, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            end.record()
            torch.cuda.synchronize()
            out[f"{name}_s"] = start.elapsed_time(end) / 1000.0
            out[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            out[f"{name}_s"] = time.perf_counter() - t0


def build(args, device: torch.device):
    """(LoadedModel with a T5 prompt encoder, VAE, tokenizer dir) — random weights, bf16 (fp32 on the CPU)."""
    import tempfile

    from qc_compile.models import LoadedModel
    from qc_compile.models.config import OPENSORA_V12
    from qc_compile.models.opensora_random import (T5_TINY, T5_XXL, TINY_VAE, make_tokenizer, random_t5,
                                                   random_vae)
    from qc_compile.models.opensora_vae import OPENSORA_VAE_V12
    from qc_compile.models.prompt_encoder import PromptEncoder
    from qc_compile.models.stdit3 import STDiT3
    from qc_compile.models.t5 import T5TextEncoder

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = OPENSORA_V12 if not args.tiny else dataclasses.replace(OPENSORA_V12, hidden_size=64, depth=2, num_heads=2,
                                                                 caption_channels=T5_TINY["d_model"])
    torch.manual_seed(0)
    with torch.device(device):
        dit = STDiT3(cfg)
    dit = dit.to(dtype).eval()
    with tempfile.TemporaryDirectory(prefix="qc_bench_tok_") as tok_dir:
        tokenizer = make_tokenizer(tok_dir)  # a tiny vocabulary: T5 runs on all 300 padded tokens either way
    model = random_t5(T5_TINY if args.tiny else T5_XXL, device=device, dtype=dtype)
    t5 = T5TextEncoder.from_model(model, tokenizer, identity="random", max_length=cfg.model_max_length)
    loaded = LoadedModel(cfg, dit, None, None, prompt_encoder=PromptEncoder(t5))
    vae = random_vae(TINY_VAE if args.tiny else OPENSORA_VAE_V12, device=device, dtype=dtype)
    return loaded, vae


def _tools():
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench_lib

    return bench_lib


def headline_grid(depth: int, steps: int) -> list[dict]:
    """The quantcache decisions of ``tools/bench_e2e.py``'s FP8 + quantcache row, for ``depth`` blocks per kind."""
    B = _tools()
    doc = json.loads((Path(__file__).resolve().parent.parent / "bench" / "results" / "e2e_grids.json").read_text())
    grid = B.map_grid(doc["grids"][GRID_KEY]["grid"], doc["depth"], depth)
    if len(grid) < steps:
        raise SystemExit(f"the {GRID_KEY} grid has {len(grid)} steps; ours_headline needs --steps <= {len(grid)}")
    return grid


def executor_for(row: str, loaded, g, args):
    """(executor, policy or None, undo or None) of a row."""
    B = _tools()
    if row in ("plain_bf16_eager", "plain_bf16_compile"):
        if row == "plain_bf16_eager" or args.device == "cpu":
            return B.PlainExecutor(loaded.model, g), None, None
        ctx = B.regional_compile(loaded.model)
        ctx.__enter__()
        return B.PlainExecutor(loaded.model, g), None, lambda: ctx.__exit__(None, None, None)
    if row in ("ours_fp8", "ours_headline"):
        from qc_compile.runtime.fast_blocks import fp8_block_plan
        from qc_compile.runtime.runners.fast import FastRunner
        from qc_compile.runtime.step_executor import StepExecutor

        cuda = args.device != "cpu"
        ex = StepExecutor(FastRunner(loaded.model, g, fp8_block_plan(loaded.model), compile=cuda, cuda_graphs=cuda), g)
        policy = None
        if row == "ours_headline":
            policy = B.ReplayPolicy(headline_grid(loaded.config.depth, args.steps))
        return ex, policy, None
    raise SystemExit(f"unknown row {row!r}; known: {', '.join(ROWS)}")


def run_row(row: str, loaded, vae, args, device: torch.device) -> dict:
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig, noise

    c = loaded.config
    g = Geometry.for_model(c, args.frames, args.height, args.width)
    z0 = noise((c.in_channels, g.frames, g.height, g.width), 0)[None].to(device)
    timer = Timer(device)
    out: dict = {"row": row}
    warm: dict = {}
    executor, policy, undo = executor_for(row, loaded, g, args)

    def t5():
        y, mask = loaded.encode_prompts([PROMPT])
        return y, mask, loaded.null_captions(1).to(device)

    def dit(steps: int, y, mask, y_null):
        s = RFlowSampler(SamplerConfig(num_steps=steps, cfg_scale=c.default_cfg))
        res = s.sample(executor, z0, y, mask, y_null, c.default_fps, video_size=(args.frames, args.height,
                                                                                  args.width), policy=policy,
                       progress=False)
        out["compute_fraction"] = res.compute_fraction(executor.unit_names)
        return res.z

    try:
        with timer.phase(warm, "t5"):
            y, mask, y_null = t5()
        with timer.phase(warm, "dit"):
            dit(min(2, args.steps), y, mask, y_null)
        with timer.phase(warm, "vae"):
            vae.decode(z0[:, :, : vae.config.latent_size(17, 8, 8)[0]], num_frames=min(17, args.frames))
        with timer.phase(out, "t5"):
            y, mask, y_null = t5()
        with timer.phase(out, "dit"):
            z = dit(args.steps, y, mask, y_null)
        with timer.phase(out, "vae"):
            video = vae.decode(z, num_frames=args.frames)
    finally:
        if undo is not None:
            undo()
    out["total_s"] = out["t5_s"] + out["dit_s"] + out["vae_s"]
    out["warmup_s"] = {k[:-2]: v for k, v in warm.items() if k.endswith("_s")}
    out["video_shape"] = list(video.shape)
    out["finite"] = bool(torch.isfinite(video).all())
    if device.type == "cuda":
        out["resident_gib"] = torch.cuda.memory_allocated() / 2 ** 30
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--frames", type=int, default=None, help="default 51 (17 with --tiny)")
    ap.add_argument("--height", type=int, default=None, help="default 480 (32 with --tiny)")
    ap.add_argument("--width", type=int, default=None, help="default 854 (48 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny architectures (CPU smoke test of this script)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/request_<dev>.json)")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    args.frames = args.frames or (17 if args.tiny else 51)
    args.height = args.height or (32 if args.tiny else 480)
    args.width = args.width or (48 if args.tiny else 854)
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    loaded, vae = build(args, device)
    build_s = time.perf_counter() - t0
    rows = []
    for row in [r for r in args.rows.split(",") if r]:
        try:
            rows.append(run_row(row, loaded, vae, args, device))
        except Exception as err:  # noqa: BLE001 (record and go on: one broken row must not lose the others)
            import traceback

            traceback.print_exc()
            rows.append({"row": row, "error": f"{type(err).__name__}: {err}"[:2000]})
        print(json.dumps(rows[-1]), flush=True)
    env = {"commit": _commit(args.commit), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["total_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    g = vae.config.latent_size(args.frames, args.height, args.width)
    doc = {"what": f"Open-Sora 1.2 request, random weights ({'tiny' if args.tiny else 'real'} architectures): "
                   f"T5 encode + {args.steps}-step RFLOW CFG DiT loop + VAE decode, {args.frames} frames at "
                   f"{args.height}x{args.width}, latent 4x{g[0]}x{g[1]}x{g[2]}, batch 1",
           "env": env, "build_seconds": build_s, "rows": rows}
    out = args.out or Path("bench/results") / f"request_{'tiny_' if args.tiny else ''}{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    for r in rows:
        if "error" in r:
            print(f"{r['row']:>13}: ERROR {r['error'][:200]}")
        else:
            print(f"{r['row']:>13}: T5 {r['t5_s']:.3f} s | DiT {r['dit_s']:.2f} s | VAE {r['vae_s']:.2f} s | "
                  f"total {r['total_s']:.2f} s" + (f" | peak DiT {r['dit_peak_gib']:.1f} GiB, VAE "
                                                   f"{r['vae_peak_gib']:.1f} GiB" if "dit_peak_gib" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
