"""Train `qc-ref-wan` (diffusers' WanTransformer3DModel, tiny, + qc-ref's caption encoder) on the shapes videos.

Same data and training machinery as qc-ref (tools/train_reference.py: logit-normal τ with the shift transform,
caption dropout for CFG, AdamW, warm-up + cosine, grad clip, bf16 autocast, EMA that ships, resumable state), with
Wan's flow-matching convention: x_t = (1 - σ)·x0 + σ·ε, target ε - x0, timestep σ·1000. A dropped caption is the
empty caption (the null caption qc-ref-wan samples with). See qc_compile/models/qc_ref_wan.py for the model.

    python tools/train_reference_wan.py --out OUT --minutes 7 --compile          # H100: ~7 min
    python tools/train_reference_wan.py --out OUT --max-steps 30 --batch 4       # CPU smoke run
    python tools/train_reference_wan.py --out OUT2 --init-from OUT/qc_ref_wan --lr 3e-4 --warmup 100 --minutes 10 --compile
                                                      # a further stage from a folder's weights, fresh schedule

Writes OUT/qc_ref_wan/ (the diffusers-layout folder to ship: EMA weights, fp32), OUT/state_*.safetensors (resume
state), OUT/train_log.json (losses every 25 steps, per-run device/commit/wall time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_reference import (add_common_args, add_noise, compiled_or_eager, git_commit, load_state, run_info,  # noqa: E402
                             sample_tau, save_state, train_loop)

from qc_compile.data.shapes import sample_batch  # noqa: E402
from qc_compile.models import qc_ref_wan as qrw  # noqa: E402

CLASS_DROPOUT = 0.1


class Trainee(torch.nn.Module):
    """Transformer + caption encoder as one module (one parameter set for the optimizer, EMA and resume state)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.transformer = qrw.build_transformer(config)
        self.text_encoder = qrw.build_text_encoder()


def init_from_folder(net: Trainee, folder: Path, config: dict) -> dict:
    """Load a qc-ref-wan folder's transformer and caption encoder into ``net`` (verified by sha256 on load); the
    folder's transformer config must be the one being trained."""
    import json

    from qc_compile.errors import UserError

    loaded = qrw.load_qc_ref_wan(folder)
    norm = lambda x: json.loads(json.dumps(x))  # noqa: E731  (tuples vs lists)
    diff = {k: (loaded.transformer.config.get(k), v) for k, v in config.items()
            if norm(loaded.transformer.config.get(k)) != norm(v)}
    if diff:
        raise UserError(f"--init-from {folder}: its transformer config differs from the one being trained "
                        f"(field: (folder, training)) {diff}; pass the matching --config.")
    net.transformer.load_state_dict(loaded.transformer.state_dict())
    net.text_encoder.load_state_dict(loaded.text_encoder.state_dict())
    steps = loaded.meta.get("provenance", {}).get("train_steps")
    print(f"initialised from {folder} ({steps} steps)", flush=True)
    return {"folder": str(folder), "train_steps": steps, "files": loaded.meta.get("files", {})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, lr=5e-4, warmup=300)
    ap.set_defaults(train_shift=4.0, minutes=7.0)  # qc-ref's lesson: train at the sampling shift from the start
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke runs)")
    ap.add_argument("--log-every", type=int, default=25, help="log the loss every N steps")
    ap.add_argument("--config", default=None, help="JSON file overriding fields of the transformer config (tests)")
    ap.add_argument("--init-from", default=None,
                    help="a qc-ref-wan folder (e.g. the shipped one) whose weights start this run, with a fresh "
                         "optimizer and lr schedule (qc-ref's later stages; --resume instead continues a schedule)")
    args = ap.parse_args(argv)

    import json

    config = dict(qrw.TRANSFORMER_CONFIG)
    if args.config:
        config.update(json.loads(Path(args.config).read_text()))
    defaults = qrw.SamplingDefaults()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    net = Trainee(config).to(device)
    ema = Trainee(config).to(device)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    log: dict = {"losses": [], "runs": [], "model": "qc-ref-wan", "transformer_config": config,
                 "train_shift": args.train_shift, "class_dropout": CLASS_DROPOUT}
    if args.init_from:
        log["init_from"] = init_from_folder(net, Path(args.init_from), config)
        ema.load_state_dict(net.state_dict())
    step, total = 0, args.total_steps
    if args.resume:
        step, total, log = load_state(Path(args.resume), net, ema, opt, params, device)
    if args.max_steps and not total:
        total = step + args.max_steps  # a smoke run's whole schedule
    gen = torch.Generator().manual_seed(args.seed + step)
    drop_gen = torch.Generator().manual_seed(args.seed + 7 + step)

    def core(x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = net.text_encoder(ids, mask)[:, 0] * mask[..., None].to(torch.float32)
        tau = sample_tau(x0.shape[0], device, args.train_shift)
        xt, eps = add_noise(x0, tau)
        v = net.transformer(qrw.with_frame_channel(xt), tau * 1000, y, return_dict=False)[0]
        return F.mse_loss(v.float(), (eps - x0).float())

    run_core = compiled_or_eager(core, args.compile)

    def loss_fn(x0: torch.Tensor, texts: list[str]) -> torch.Tensor:
        from qc_compile.models.caption_encoder import CaptionTokenizer

        drop = torch.rand(len(texts), generator=drop_gen) < CLASS_DROPOUT
        texts = ["" if d else t for d, t in zip(drop.tolist(), texts)]  # the null caption: the empty one
        ids, mask = CaptionTokenizer().encode(texts, max_length=qrw.TEXT_ENCODER_CONFIG["max_length"])
        return run_core(x0, ids.to(device), mask.to(device))

    def save_all(step: int, total: int, wall: float, final: bool) -> None:
        run = run_info(args, device, step, total, wall)
        save_state(out, net, ema, opt, params, step, total, log, run)
        prov = {"train_steps": step, "train_batch": args.batch, "train_commit": git_commit(),
                "train_shift": args.train_shift, "init_from": log.get("init_from"), "runs": log["runs"] + [run]}
        qrw.save_qc_ref_wan(out / "qc_ref_wan", ema.transformer, ema.text_encoder, defaults=defaults,
                            provenance=prov)
        print(f"{'done' if final else 'saved'}: step {step}/{total}, {wall:.0f}s this run", flush=True)

    def next_batch():
        return sample_batch(args.batch, generator=gen, device=device, frames=defaults.frames,
                            height=defaults.height, width=defaults.width)

    train_loop(args, net=net, ema=ema, opt=opt, params=params, device=device, next_batch=next_batch,
               loss_fn=loss_fn, save_all=save_all, log=log, step=step, total=total, max_steps=args.max_steps)
    return 0


if __name__ == "__main__":
    from qc_compile.errors import UserError

    try:
        sys.exit(main())
    except UserError as err:  # a bad --init-from / --config / --resume: one paragraph, exit 2, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
