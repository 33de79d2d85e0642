"""`qc-ref-wan`: a tiny Wan-architecture video model, in diffusers' own class and weight layout, on the shapes set.

It exists so that the peers' own code (diffusers' cache hooks, cache-dit, torchao, ModelOpt) and qc-compile's
policies run on the *same trained* model (DESIGN.md §6). The shipped folder ``qc_compile/assets/qc_ref_wan/`` is
a diffusers layout:

* ``transformer/`` — ``WanTransformer3DModel.from_pretrained`` loads it (config.json + safetensors);
* ``scheduler/`` — ``FlowMatchEulerDiscreteScheduler`` with the sampling shift;
* ``text_encoder.safetensors`` — qc-ref's caption encoder (T5's role) with its config in the metadata;
* ``qc_ref_wan.json`` — sampling defaults and provenance.

Two choices where the real Wan relies on parts we do not have (documented in docs/MODEL_CARD_WAN.md):

* **Pixel space, temporal patch 2.** No VAE: RGB 16 x 32 x 32 in [-1, 1] with patch (2, 2, 2) — 8 x 16 x 16 =
  2,048 tokens of full 3-D attention; the temporal patch plays the Wan VAE's 4x temporal compression.
* **A frame-position input channel.** ``in_channels = 4``: the noisy RGB plus one conditioning channel, a ramp
  from -1 (first frame) to 1 (last frame), concatenated like Wan I2V's mask/image channels. With relative RoPE as
  its only position signal a pixel-space model cannot tell the start of a video from its end, so "moving left"
  and "moving right" become indistinguishable (measured on qc-ref, docs/MODEL_CARD.md); the ramp is the absolute
  time cue. The class, its code and its weight names are diffusers' own.

Sampling follows ``WanPipeline``: flow matching (x_t = (1 - σ)·x0 + σ·ε, the model predicts ε - x0, timestep σ·1000)
with diffusers' ``FlowMatchEulerDiscreteScheduler``, and classifier-free guidance as two calls per step inside
``transformer.cache_context("cond" | "uncond", step_index=i, ...)`` — so diffusers' cache hooks and
``qc_compile.enable`` see exactly what they see under ``WanPipeline``. The null caption is the encoding of the
empty caption, as Wan's default negative prompt is an encoded string; padding positions are zeroed as
``WanPipeline`` zeroes T5's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from qc_compile.errors import UserError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "qc_ref_wan"
META_FILE = "qc_ref_wan.json"
TEXT_FILE = "text_encoder.safetensors"
FORMAT = "qc-compile/qc-ref-wan"
SCHEMA_VERSION = 1

TRANSFORMER_CONFIG: dict = {
    "patch_size": [2, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 4,  # RGB + the frame-position channel
    "out_channels": 3,
    "text_dim": 64,  # the caption encoder's width
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
TEXT_ENCODER_CONFIG: dict = {"dim": 64, "layers": 2, "heads": 4, "max_length": 12}


@dataclass(frozen=True)
class SamplingDefaults:
    frames: int = 16
    height: int = 32
    width: int = 32
    steps: int = 30
    cfg: float = 4.0
    shift: float = 4.0  # flow shift: sigma' = s·sigma / (1 + (s - 1)·sigma), as qc-ref's sampling shift

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def build_transformer(config: dict | None = None) -> nn.Module:
    """A freshly initialised qc-ref-wan transformer (diffusers' WanTransformer3DModel), DiT-style init: xavier
    linears with zero bias, N(0, 0.02) timestep / text embedders, zero output projection."""
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(**dict(config or TRANSFORMER_CONFIG))
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    w = m.patch_embedding.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(m.patch_embedding.bias)
    ce = m.condition_embedder
    for lin in (ce.time_embedder.linear_1, ce.time_embedder.linear_2, ce.time_proj, ce.text_embedder.linear_1,
                ce.text_embedder.linear_2):
        nn.init.normal_(lin.weight, std=0.02)
    nn.init.zeros_(m.proj_out.weight)
    nn.init.zeros_(m.proj_out.bias)
    return m


def build_text_encoder(config: dict | None = None) -> nn.Module:
    from qc_compile.models.caption_encoder import CaptionEncoder, CaptionTokenizer

    return CaptionEncoder(CaptionTokenizer().vocab_size, **dict(config or TEXT_ENCODER_CONFIG))


def frame_channel(batch: int, frames: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The conditioning channel (B, 1, F, H, W): a ramp from -1 at the first frame to 1 at the last."""
    ramp = torch.linspace(-1.0, 1.0, frames, device=device, dtype=dtype)
    return ramp.view(1, 1, frames, 1, 1).expand(batch, 1, frames, height, width)


def with_frame_channel(z: torch.Tensor) -> torch.Tensor:
    """Model input: the noisy RGB (B, 3, F, H, W) with the frame-position channel appended."""
    B, _, F, H, W = z.shape
    return torch.cat([z, frame_channel(B, F, H, W, z.device, z.dtype)], dim=1)


def encode_captions(text_encoder: nn.Module, texts: Sequence[str], max_length: int = 12,
                    device=None) -> torch.Tensor:
    """Caption features (B, L, dim) for the transformer's ``encoder_hidden_states``, padding positions zeroed."""
    from qc_compile.models.caption_encoder import CaptionTokenizer

    ids, mask = CaptionTokenizer().encode(list(texts), max_length=max_length)
    dev = device if device is not None else next(text_encoder.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    y = text_encoder(ids, mask)[:, 0]
    return y * mask[..., None].to(y.dtype)


def flow_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class QCRefWan:
    """The loaded model: ``transformer`` (diffusers), ``text_encoder`` (caption encoder), sampling defaults, and a
    WanPipeline-style sampler. ``model`` is the qc-compile adapter over the same transformer."""

    name = "qc-ref-wan"
    family = "wan2.1"

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module, defaults: SamplingDefaults,
                 meta: dict | None = None, checkpoint: str | None = None) -> None:
        from qc_compile.models.diffusers_adapter import WanAdapter

        self.transformer = transformer
        self.text_encoder = text_encoder
        self.defaults = defaults
        self.meta = meta or {}
        self.checkpoint = checkpoint
        self.model = WanAdapter(transformer)
        self.current_timestep: torch.Tensor | None = None

    @property
    def config(self):
        return self.transformer.config

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return encode_captions(self.text_encoder, prompts, TEXT_ENCODER_CONFIG["max_length"], self.device)

    def null_captions(self, n: int) -> torch.Tensor:
        return self.encode_prompts([""] * n)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], *, seed: int = 0, steps: int | None = None, cfg: float | None = None,
               shift: float | None = None, cfg_batched: bool = False, progress: bool = False,
               on_step: Callable[[int, float], None] | None = None) -> torch.Tensor:
        """Videos (n, 3, F, H, W) in [-1, 1] for ``prompts``; prompt k starts from the noise of seed ``seed + k``
        (drawn on the CPU, so CPU and GPU runs start alike). The transformer is called as ``WanPipeline`` calls
        it — CFG as two calls per step in ``cache_context("cond")`` / ``("uncond")`` — so hooks installed on it
        (diffusers caches, cache-dit, ``qc_compile.enable``) act as they would there. ``cfg_batched`` instead runs
        one call on the batch [uncond; cond] in ``cache_context("cond_uncond")``, as ``CogVideoXPipeline`` does
        (what diffusers' FasterCache expects). ``self.current_timestep`` follows the loop (the pipelines'
        ``current_timestep``, for hooks that take a timestep callback); stateful diffusers hooks are reset at the
        end, as pipelines do."""
        from tqdm.auto import tqdm

        from qc_compile.runtime.sampler import noise

        d = self.defaults
        steps = steps or d.steps
        cfg = d.cfg if cfg is None else cfg
        sched = flow_scheduler(d.shift if shift is None else shift)
        sched.set_timesteps(steps, device=self.device)
        n = len(prompts)
        dtype = self.transformer.patch_embedding.weight.dtype  # diffusers keeps some modules in fp32
        y = self.encode_prompts(prompts).to(dtype)
        y_null = self.null_captions(n).to(dtype)
        z = torch.cat([noise((1, 3, d.frames, d.height, d.width), seed + k) for k in range(n)]).to(self.device)
        tr = self.transformer
        for i, t in enumerate(tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False)):
            self.current_timestep = t
            x = with_frame_channel(z).to(dtype)
            ctx = {"step_index": i, "sigma": float(sched.sigmas[i]), "num_inference_steps": steps}
            if cfg != 1.0 and cfg_batched:
                with tr.cache_context("cond_uncond", **ctx):
                    out = tr(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * n),
                             encoder_hidden_states=torch.cat([y_null, y]), return_dict=False)[0].float()
                v_u, v_c = out.chunk(2)
                v = v_u + cfg * (v_c - v_u)
            else:
                with tr.cache_context("cond", **ctx):
                    v = tr(hidden_states=x, timestep=t.expand(n), encoder_hidden_states=y, return_dict=False)[0].float()
                if cfg != 1.0:
                    with tr.cache_context("uncond", **ctx):
                        v_u = tr(hidden_states=x, timestep=t.expand(n), encoder_hidden_states=y_null,
                                 return_dict=False)[0].float()
                    v = v_u + cfg * (v - v_u)
            z = sched.step(v, t, z, return_dict=False)[0]
            if on_step is not None:
                on_step(i, float(t))
        self.current_timestep = None
        if hasattr(tr, "_reset_stateful_cache"):
            tr._reset_stateful_cache()
        return z.clamp(-1.0, 1.0).float().cpu()


def save_qc_ref_wan(folder: str | os.PathLike, transformer: nn.Module, text_encoder: nn.Module, *,
                    defaults: SamplingDefaults = SamplingDefaults(), provenance: dict | None = None) -> Path:
    """Write the diffusers-layout folder (fp32 weights; atomic per file)."""
    from safetensors.torch import save

    from qc_compile.artifacts import sha256_file, write_bytes_atomic, write_json_atomic

    folder = Path(folder)
    tr_dir = folder / "transformer"
    tmp = folder / "transformer.tmp"
    transformer.save_pretrained(str(tmp), safe_serialization=True)
    if tr_dir.exists():
        import shutil

        shutil.rmtree(tr_dir)
    tmp.rename(tr_dir)
    flow_scheduler(defaults.shift).save_config(str(folder / "scheduler"))
    sd = {k: v.detach().float().contiguous().cpu() for k, v in text_encoder.state_dict().items()}
    write_bytes_atomic(folder / TEXT_FILE, save(sd, metadata={"format": FORMAT, "config": json.dumps(
        TEXT_ENCODER_CONFIG)}))
    files = {str(f.relative_to(folder)): sha256_file(f) for f in sorted(folder.rglob("*.safetensors"))}
    write_json_atomic(folder / META_FILE, {"format": FORMAT, "schema_version": SCHEMA_VERSION, "files": files,
                                           "sampling": defaults.to_dict(), "text_encoder": TEXT_ENCODER_CONFIG,
                                           "frame_channel": "channel 3: linspace(-1, 1, frames) over frames",
                                           "prediction": "flow (noise - x0), timestep = sigma * 1000",
                                           "provenance": provenance or {}})
    return folder


def load_qc_ref_wan(folder: str | os.PathLike | None = None, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float32) -> QCRefWan:
    """Load the shipped folder (or another one written by :func:`save_qc_ref_wan`)."""
    from safetensors import safe_open

    from qc_compile.artifacts import read_json, sha256_file
    from qc_compile.errors import ArtifactError
    from qc_compile.models.diffusers_adapter import load_diffusers_transformer

    folder = Path(folder) if folder is not None else ASSET_DIR
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        hint = ("the shipped qc-ref-wan weights are not in this installation yet (train them with "
                "tools/train_reference_wan.py)" if folder == ASSET_DIR else "pass a folder written by "
                "tools/train_reference_wan.py")
        raise UserError(f"qc-ref-wan: {meta_path} not found; {hint}.")
    meta = read_json(meta_path, kind="qc-ref-wan metadata")
    if meta.get("format") != FORMAT or meta.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{meta_path}: not a qc-ref-wan folder of schema {SCHEMA_VERSION} (format "
                        f"{meta.get('format')!r}, schema_version {meta.get('schema_version')!r}).")
    files = meta.get("files") or {}
    if not files:
        raise ArtifactError(f"{meta_path}: lists no weight files with their sha256.")
    for rel, sha in files.items():
        f = folder / rel
        if not f.is_file() or sha256_file(f) != sha:
            raise ArtifactError(f"{f}: missing, or its sha256 differs from {meta_path} (the file changed after it was "
                                "written); re-copy the folder or re-run tools/train_reference_wan.py.")
    transformer = load_diffusers_transformer("wan2.1", folder, device=device, dtype=dtype)
    text_path = folder / TEXT_FILE
    if not text_path.is_file():
        raise UserError(f"qc-ref-wan: {text_path} is missing.")
    with safe_open(str(text_path), framework="pt") as f:
        cfg = json.loads((f.metadata() or {}).get("config", json.dumps(TEXT_ENCODER_CONFIG)))
        sd = {k: f.get_tensor(k) for k in f.keys()}
    text_encoder = build_text_encoder(cfg)
    missing, unexpected = text_encoder.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{text_path}: caption-encoder weights do not match (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}).")
    defaults = SamplingDefaults(**meta.get("sampling", {}))
    return QCRefWan(transformer, text_encoder.to(device).eval(), defaults, meta, str(folder))
