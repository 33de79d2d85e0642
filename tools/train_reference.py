"""Train `qc-ref` (small STDiT3 + caption encoder) on the procedural shapes videos.

Rectified-flow loss as Open-Sora trains it: x_t = (1 - τ)·x0 + τ·ε with τ logit-normal (loc 0, scale 1),
target v = x0 - ε; the caption is replaced by the null caption ``y_embedding`` with probability
``class_dropout_prob`` so classifier-free guidance works. An EMA of the weights is what ships.

Runs on a GPU (bf16 autocast); resumable from a state folder so that training can span several runs:

    python tools/train_reference.py --out OUT --minutes 8.5 [--resume STATE_DIR]

Writes OUT/qc_ref.safetensors (EMA, bf16), OUT/state_*.safetensors (resume state, fp32), OUT/train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qc_compile.data.shapes import sample_batch
from qc_compile.models import build_text_encoder
from qc_compile.models.caption_encoder import CaptionTokenizer
from qc_compile.models.checkpoint import save_checkpoint
from qc_compile.models.config import QC_REF
from qc_compile.models.stdit3 import STDiT3, Geometry


class Trainee(torch.nn.Module):
    """Model + caption encoder as one module so the optimizer, EMA and resume state see one parameter set."""

    def __init__(self) -> None:
        super().__init__()
        self.model = STDiT3(QC_REF)
        self.model.initialize_weights()
        self.text_encoder = build_text_encoder(QC_REF)


def git_commit() -> str:
    if os.environ.get("QC_COMMIT"):
        return os.environ["QC_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ------------------------------------------------------------------------------------------------------------------
# The pieces shared with tools/train_reference_wan.py: τ sampling and noising, EMA, resume state, the budgeted loop.

def add_common_args(ap: argparse.ArgumentParser, *, lr: float = 5e-4, warmup: int = 300) -> None:
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", default=None, help="folder with state_*.safetensors from an earlier run")
    ap.add_argument("--minutes", type=float, default=8.5, help="wall-clock training budget of this run")
    ap.add_argument("--plan-minutes", type=float, default=0.0,
                    help="wall-clock length of the whole schedule over all runs (default: --minutes)")
    ap.add_argument("--total-steps", type=int, default=0, help="schedule length; 0: estimate from --plan-minutes")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--train-shift", type=float, default=1.0,
                    help="apply the timestep transform τ' = sτ/(1+(s-1)τ) to the logit-normal τ (Open-Sora trains "
                         "with its transform); s > 1 trains more at high noise, where motion direction is decided")


def sample_tau(n: int, device, shift: float = 1.0) -> torch.Tensor:
    """Logit-normal (0, 1) noise levels τ, through the transform τ' = sτ/(1+(s-1)τ)."""
    tau = torch.sigmoid(torch.randn(n, device=device))
    return shift * tau / (1 + (shift - 1) * tau)


def add_noise(x0: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, ε) with x_t = (1 - τ)·x0 + τ·ε (rectified flow; Open-Sora's and diffusers' flow-matching convention)."""
    eps = torch.randn_like(x0)
    t = tau.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * eps, eps


def save_state(out: Path, net: torch.nn.Module, ema: torch.nn.Module, opt, params: list, step: int, total: int,
               log: dict, run: dict) -> None:
    """Resume state (fp32 weights, EMA, Adam moments, step counters) and the train log."""
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "state_model.safetensors")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, out / "state_ema.safetensors")
    save_file({n: opt.state[p]["exp_avg"].contiguous() for n, p in zip(names, params)},
              out / "state_opt_m.safetensors")
    save_file({n: opt.state[p]["exp_avg_sq"].contiguous() for n, p in zip(names, params)},
              out / "state_opt_v.safetensors")
    (out / "state_meta.json").write_text(json.dumps({"step": step, "total_steps": total}))
    (out / "train_log.json").write_text(json.dumps({**log, "runs": log["runs"] + [run]}))


def load_state(rd: Path, net: torch.nn.Module, ema: torch.nn.Module, opt, params: list,
               device) -> tuple[int, int, dict]:
    """Inverse of :func:`save_state`: (step, total_steps, log)."""
    net.load_state_dict(load_file(rd / "state_model.safetensors"))
    ema.load_state_dict(load_file(rd / "state_ema.safetensors"))
    m1, m2 = load_file(rd / "state_opt_m.safetensors"), load_file(rd / "state_opt_v.safetensors")
    meta = json.loads((rd / "state_meta.json").read_text())
    step, total = meta["step"], meta["total_steps"]
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    for n, p in zip(names, params):
        opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": m1[n].to(device),
                        "exp_avg_sq": m2[n].to(device)}
    log = json.loads((rd / "train_log.json").read_text())
    print(f"resumed at step {step}/{total}", flush=True)
    return step, total, log


def run_info(args, device: str, step: int, total: int, wall: float) -> dict:
    return {"steps_end": step, "wall_s": wall, "device": torch.cuda.get_device_name() if device == "cuda"
            else "cpu", "torch": torch.__version__, "commit": git_commit(), "batch": args.batch,
            "lr": args.lr, "total_steps": total}


def compiled_or_eager(core, compile_it: bool):
    """``core`` under ``torch.compile`` when asked, falling back to eager for good on a compiler failure (a
    compiler problem must not cost a budgeted training run)."""
    state = {"fn": torch.compile(core) if compile_it else core}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as e:
            if state["fn"] is core:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {e}); continuing eagerly", flush=True)
            state["fn"] = core
            return core(*args)

    return run


def train_loop(args, *, net: torch.nn.Module, ema: torch.nn.Module, opt, params: list, device: str,
               next_batch, loss_fn, save_all, log: dict, step: int, total: int, max_steps: int = 0) -> int:
    """The budgeted training loop: lr schedule (warm-up + cosine to 10%), bf16 autocast on CUDA, grad clip 1, EMA,
    a loss logged every ``args.log_every`` (default 25) steps, the schedule length sized from the measured speed when not given, and
    ``save_all(step, total, wall, final)`` every 2 minutes and at the end. ``max_steps`` > 0 stops early (smoke
    runs). Returns the final step."""
    t_start = time.time()
    last_save = last_print = t_start
    budget = args.minutes * 60
    t50 = t_start
    steps_this_run = 0
    torch.set_grad_enabled(True)  # callers (tests, notebooks) may have switched autograd off
    while True:
        x0, texts = next_batch()
        if total == 0 and step == 50:  # size the schedule from the measured speed
            per_step = (time.time() - t50) / 40
            total = step + int(((args.plan_minutes * 60 or budget) - (time.time() - t_start)) / per_step * 0.97)
            print(f"{per_step * 1000:.1f} ms/step -> total_steps {total}", flush=True)
        if step == 10:
            t50 = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, max(total, args.warmup + 1), args.lr, args.warmup)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn(x0, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - d)
        if step % getattr(args, "log_every", 25) == 0:
            log["losses"].append([step, loss.item()])
        step += 1
        steps_this_run += 1
        now = time.time()
        if now - last_print > 30:
            print(f"step {step}/{total} loss {log['losses'][-1][1]:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{now - t_start:.0f}s", flush=True)
            last_print = now
        if (total and step >= total) or now - t_start > budget or (max_steps and steps_this_run >= max_steps):
            break
        if now - last_save > 120:
            save_all(step, total, time.time() - t_start, False)
            last_save = now
    save_all(step, total, time.time() - t_start, True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--init-from", default=None, help="start from a qc-ref checkpoint's weights (fresh optimizer); "
                    "parameters the file lacks keep their init (e.g. a newly added table)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    net = Trainee().to(device)
    ema = Trainee().to(device)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    if args.init_from:
        from qc_compile.models.checkpoint import TEXT_PREFIX, read_safetensors

        tensors, _ = read_safetensors(args.init_from)
        sd = {("text_encoder." + k[len(TEXT_PREFIX):] if k.startswith(TEXT_PREFIX) else "model." + k): v.float()
              for k, v in tensors.items()}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        assert not unexpected, unexpected
        print(f"initialised from {args.init_from}; kept init for {missing}", flush=True)
        ema.load_state_dict(net.state_dict())
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    tok = CaptionTokenizer()
    cfg = QC_REF
    g = Geometry.for_model(cfg, cfg.default_frames, cfg.default_height, cfg.default_width)
    log: dict = {"losses": [], "runs": []}
    step, total = 0, args.total_steps
    if args.resume:
        step, total, log = load_state(Path(args.resume), net, ema, opt, params, device)
    gen = torch.Generator().manual_seed(args.seed + step)
    fps = torch.full((args.batch,), float(cfg.default_fps), device=device)
    null = lambda: net.model.y_embedder.y_embedding  # noqa: E731

    def core(x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = net.text_encoder(ids, mask)  # (B, 1, L, Cy)
        drop = torch.rand(x0.shape[0], device=device) < cfg.class_dropout_prob
        y = torch.where(drop[:, None, None, None], null()[None, None].to(y.dtype), y)
        tau = sample_tau(x0.shape[0], device, args.train_shift)
        xt, eps = add_noise(x0, tau)
        v = net.model.forward_units(xt, tau * 1000, y, mask, fps, g)
        return F.mse_loss(v.float(), (x0 - eps).float())

    run_core = compiled_or_eager(core, args.compile)

    def step_fn(x0: torch.Tensor, texts: list[str]) -> torch.Tensor:
        ids, mask = tok.encode(texts, max_length=cfg.model_max_length)  # strings stay outside the compiled graph
        return run_core(x0, ids.to(device), mask.to(device).bool())

    def save_all(step: int, total: int, wall: float, final: bool = False) -> None:
        """Resume state + the shipped EMA checkpoint; written periodically so a killed run loses little."""
        save_state(out, net, ema, opt, params, step, total, log, run_info(args, device, step, total, wall))
        meta = {"train_steps": str(step), "train_batch": str(args.batch), "train_commit": git_commit()}
        sha = save_checkpoint(out / "qc_ref.safetensors", ema.model, cfg, ema.text_encoder, dtype=torch.bfloat16,
                              extra_metadata=meta)
        print(f"{'done' if final else 'saved'}: step {step}/{total}, {wall:.0f}s this run, "
              f"checkpoint sha256 {sha[:12]}", flush=True)

    def next_batch():
        return sample_batch(args.batch, generator=gen, device=device, frames=cfg.default_frames,
                            height=cfg.default_height, width=cfg.default_width)

    train_loop(args, net=net, ema=ema, opt=opt, params=params, device=device, next_batch=next_batch, loss_fn=step_fn,
               save_all=save_all, log=log, step=step, total=total)


if __name__ == "__main__":
    sys.exit(main())
