"""Write the OpenSora-VAE-v1.2 state-dict table (key -> shape) from Open-Sora's own source, for tests to check against.

The released ``hpcai-tech/OpenSora-VAE-v1.2/model.safetensors`` is ``VideoAutoencoderPipeline.state_dict()``:
``scale``/``shift`` buffers (1, 4, 1, 1, 1), ``spatial_vae.module.*`` (diffusers ``AutoencoderKL`` with the SD-XL VAE
config of ``PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers/vae``) and ``temporal_vae.*`` (``VAE_Temporal_SD``).
This script instantiates Open-Sora's ``VAE_Temporal_SD`` from a checkout of its source (tag v1.2.0) on the meta
device — only the registry/checkpoint imports are stubbed, the module code is theirs — plus diffusers'
``AutoencoderKL`` with that config, and writes the table that ``tests/test_opensora_vae.py`` compares our
re-implementation with. Run once; the output is committed as ``tests/data/opensora_vae_v12_keys.json``.

    git -C OPEN_SORA show v1.2.0:opensora/models/vae/vae_temporal.py > /tmp/os/vae_temporal.py   (and utils.py)
    python tools/opensora_vae_table.py --src /tmp/os --out tests/data/opensora_vae_v12_keys.json

``--check`` (needs ``einops``) also runs Open-Sora's temporal VAE and ours on the same small random weights in
float64 (encode means and decode, 17, 9 and 1 frames) and prints the relative differences (0.0 at c. 2026-11-28).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch


def _stub_modules() -> None:
    """Open-Sora's registry (mmengine) and checkpoint utilities are not needed to build the module: stub them."""
    registry = types.ModuleType("opensora.registry")

    class _Registry:
        def register_module(self, name=None, *a, **k):
            return (lambda f: f) if name is None or isinstance(name, str) else name

    registry.MODELS = _Registry()
    ckpt = types.ModuleType("opensora.utils.ckpt_utils")
    ckpt.load_checkpoint = lambda *a, **k: None
    einops = types.ModuleType("einops")  # used only in forward(); the table needs __init__ only
    einops.rearrange = None
    for name in ("opensora", "opensora.utils", "opensora.models", "opensora.models.vae"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["opensora.registry"] = registry
    sys.modules["opensora.utils.ckpt_utils"] = ckpt
    sys.modules.setdefault("einops", einops)


def _load(src: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"opensora.models.vae.{name}", src / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, required=True, help="folder holding Open-Sora's vae_temporal.py and utils.py")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--check", action="store_true", help="compare our temporal VAE with theirs numerically")
    ap.add_argument("--commit", default="17cce908b22283acc3c946816c81f46dd442a453")
    args = ap.parse_args()
    _stub_modules()
    if args.check:
        del sys.modules["einops"]  # the real one: forward() uses rearrange
    _load(args.src, "utils")
    vt = _load(args.src, "vae_temporal")
    from diffusers import AutoencoderKL

    from qc_compile.models.opensora_vae import SDXL_VAE_CONFIG

    with torch.device("meta"):
        temporal = vt.VAE_Temporal_SD()
        spatial = AutoencoderKL(**SDXL_VAE_CONFIG)
    table = {"scale": [1, 4, 1, 1, 1], "shift": [1, 4, 1, 1, 1]}
    table.update({f"spatial_vae.module.{k}": list(v.shape) for k, v in spatial.state_dict().items()})
    table.update({f"temporal_vae.{k}": list(v.shape) for k, v in temporal.state_dict().items()})
    numel = {part: sum(int(torch.Size(s).numel()) for k, s in table.items() if k.startswith(part))
             for part in ("spatial_vae.", "temporal_vae.")}
    out = {"source": f"hpcaitech/Open-Sora@{args.commit} opensora/models/vae/{{vae,vae_temporal}}.py "
                     "(VAE_Temporal_SD, OpenSoraVAE_V1_2) + diffusers AutoencoderKL(SD-XL VAE config)",
           "num_tensors": len(table), "numel": numel, "keys": dict(sorted(table.items()))}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}: {len(table)} tensors, {numel}")
    if args.check:
        _check(vt)


@torch.no_grad()
def _check(vt) -> None:
    from qc_compile.models.opensora_vae import TemporalConfig, TemporalVAE

    torch.manual_seed(0)
    theirs = vt.VAE_Temporal(filters=8, num_res_blocks=2, channel_multipliers=(1, 2, 2, 4),
                             temporal_downsample=(False, True, True), num_groups=4).double()
    ours = TemporalVAE(TemporalConfig(filters=8, num_res_blocks=2, num_groups=4)).double()
    sd = {k: torch.randn_like(v) * 0.2 for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(sd)
    ours.load_state_dict(sd, strict=True)
    for frames in (17, 9, 1):
        x = torch.randn(2, 4, frames, 6, 5, dtype=torch.float64)
        m1, m2 = theirs.encode(x).mode(), ours.encode(x, sample=False, generator=None)
        d1, d2 = theirs.decode(m1, num_frames=frames), ours.decode(m1, num_frames=frames)
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        print(f"{frames} frames: latent {tuple(m1.shape)} rel diff {rel(m2, m1):.3g}; "
              f"decode {tuple(d1.shape)} rel diff {rel(d2, d1):.3g}")


if __name__ == "__main__":
    main()
