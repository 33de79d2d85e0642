"""Open-Sora 1.2's video VAE (``OpenSoraVAE_V1_2`` / ``VideoAutoencoderPipeline``), loading the released file unchanged.

Two stages, as in ``opensora/models/vae/{vae,vae_temporal}.py`` at v1.2.0:

* **spatial**: the SD-XL VAE (diffusers ``AutoencoderKL``) applied frame by frame in micro-batches of
  ``micro_batch_size`` frames. Latents are multiplied by **0.18215** — the SD-1.x factor, not SD-XL's 0.13025;
  Open-Sora trained with it, so it is part of the model.
* **temporal**: a causal 3-D convolutional VAE (4 -> 4 channels, /4 in time) run on chunks of ``micro_frame_size``
  = 17 frames. Each chunk is front-padded with zeros to a multiple of 4 (17 -> 20) and gives 5 latent frames; the
  decoder drops the same number of leading frames.

Latents are normalised per channel, ``z = (z - shift) / scale``. So F frames at H x W pixels give latents
``(4, 5*floor(F/17) + ceil((F mod 17)/4), H/8, W/8)``: 51 frames at 480 x 854 -> 4 x 15 x 60 x 106.

The state dict keeps Open-Sora's names (``scale``, ``shift``, ``spatial_vae.module.<AutoencoderKL keys>``,
``temporal_vae.{encoder,decoder,quant_conv,post_quant_conv}...``), checked against a table written from Open-Sora's
own source (``tools/opensora_vae_table.py`` -> ``tests/data/opensora_vae_v12_keys.json``).

Decoding is bounded in memory: one temporal chunk at a time, its frames through the spatial decoder in micro-batches,
each written straight into the output tensor (optionally on another device, e.g. the CPU); spatial tiling of large
frames is available through diffusers' own tiling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from qc_compile.errors import UserError

# PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers/vae/config.json (the spatial VAE OpenSoraVAE_V1_2 builds).
SDXL_VAE_CONFIG: dict = dict(
    in_channels=3, out_channels=3, latent_channels=4, act_fn="silu", layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SPATIAL_SCALE = 0.18215  # Open-Sora's hard-coded factor (see the module docstring)
FORMAT = "qc-compile/opensora-vae"  # metadata of files we write (tiny test weights); the released file has none
RELEASED_FILE = "model.safetensors"


@dataclass(frozen=True)
class TemporalConfig:
    """``VAE_Temporal`` arguments; the defaults are ``VAE_Temporal_SD`` (the v1.2 temporal VAE)."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True)
class VAEConfig:
    """``OpenSoraVAE_V1_2``: spatial AutoencoderKL kwargs, temporal VAE, micro sizes and the latent scale/shift."""

    spatial: dict = field(default_factory=lambda: dict(SDXL_VAE_CONFIG))
    temporal: TemporalConfig = TemporalConfig()
    micro_frame_size: int | None = 17
    micro_batch_size: int | None = 4
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.spatial["block_out_channels"]) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spatial"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.spatial.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        d = dict(d)
        t = dict(d.pop("temporal", {}))
        for k in ("channel_multipliers", "temporal_downsample"):
            if k in t:
                t[k] = tuple(t[k])
        spatial = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("spatial", SDXL_VAE_CONFIG).items()}
        return cls(spatial=spatial, temporal=TemporalConfig(**t), shift=tuple(d.pop("shift", cls.shift)),
                   scale=tuple(d.pop("scale", cls.scale)), **d)

    def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, H, W) of the latent of a frames x height x width video (Open-Sora's ``get_latent_size``)."""
        f = self.temporal.time_factor
        s = self.spatial_factor
        if self.micro_frame_size is None:
            return math.ceil(frames / f), height // s, width // s
        m = self.micro_frame_size
        return (frames // m) * math.ceil(m / f) + math.ceil((frames % m) / f), height // s, width // s


OPENSORA_VAE_V12 = VAEConfig()


# ------------------------------------------------------------------------------------------------------------------
# Temporal VAE (causal 3-D convolutions), module names as in vae_temporal.py


class CausalConv3d(nn.Module):
    """Conv3d padded causally in time (front only, ``k - stride`` frames) and symmetrically in space, with zeros."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int | tuple[int, int, int], *,
                 stride_t: int = 1, bias: bool = True) -> None:
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - stride_t, 0)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=(stride_t, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, filters: int, num_groups: int) -> None:
        super().__init__()
        self.in_channels, self.filters = in_channels, filters
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, filters)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False)
        if in_channels != filters:
            self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv3(x) if self.in_channels != self.filters else x)


class TemporalEncoder(nn.Module):
    def __init__(self, c: TemporalConfig) -> None:
        super().__init__()
        self.c = c
        self.conv_in = CausalConv3d(c.in_out_channels, c.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = c.filters
        n = len(c.channel_multipliers)
        for i, mult in enumerate(c.channel_multipliers):
            filters = c.filters * mult
            items = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                items.append(ResBlock(prev, filters, c.num_groups))
                prev = filters
            self.block_res_blocks.append(items)
            if i < n - 1:  # an Identity keeps the index of a level without temporal downsampling
                self.conv_blocks.append(CausalConv3d(prev, filters, 3, stride_t=2) if c.temporal_downsample[i]
                                        else nn.Identity())
                prev = filters
        self.res_blocks = nn.ModuleList(ResBlock(prev, filters, c.num_groups) for _ in range(c.num_res_blocks))
        self.norm1 = nn.GroupNorm(c.num_groups, prev)
        self.conv2 = CausalConv3d(prev, 2 * c.latent_embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for b in blocks:
                x = b(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for b in self.res_blocks:
            x = b(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, c: TemporalConfig) -> None:
        super().__init__()
        self.c = c
        filters = c.filters * c.channel_multipliers[-1]
        prev = filters
        self.conv1 = CausalConv3d(c.latent_embed_dim, filters, 3)
        self.res_blocks = nn.ModuleList(ResBlock(filters, filters, c.num_groups) for _ in range(c.num_res_blocks))
        blocks: list[nn.ModuleList] = []
        convs: list[nn.Module] = []
        for i in reversed(range(len(c.channel_multipliers))):
            filters = c.filters * c.channel_multipliers[i]
            items = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                items.append(ResBlock(prev, filters, c.num_groups))
                prev = filters
            blocks.insert(0, items)
            if i > 0:  # conv to (channels x 2) then depth-to-time, or an Identity placeholder
                convs.insert(0, CausalConv3d(prev, prev * 2, 3) if c.temporal_downsample[i - 1] else nn.Identity())
        self.block_res_blocks = nn.ModuleList(blocks)
        self.conv_blocks = nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(c.num_groups, prev)
        self.conv_out = CausalConv3d(filters, c.in_out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for b in self.res_blocks:
            x = b(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for b in self.block_res_blocks[i]:
                x = b(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.c.temporal_downsample[i - 1]:  # "B (C ts) T H W -> B C (T ts) H W", ts = 2
                    B, C2, T, H, W = x.shape
                    x = x.reshape(B, C2 // 2, 2, T, H, W).transpose(2, 3).reshape(B, C2 // 2, T * 2, H, W)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """``VAE_Temporal``: encode pads the front to a multiple of the time factor; decode drops those frames."""

    def __init__(self, c: TemporalConfig) -> None:
        super().__init__()
        self.c = c
        self.encoder = TemporalEncoder(c)
        self.quant_conv = CausalConv3d(2 * c.latent_embed_dim, 2 * c.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(c.embed_dim, c.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(c)

    def _front_pad(self, frames: int) -> int:
        return (-frames) % self.c.time_factor

    def encode(self, x: torch.Tensor, *, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, 0, self._front_pad(x.shape[2]), 0))
        mean, logvar = self.quant_conv(self.encoder(x)).to(x.dtype).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device,
                          dtype=mean.dtype).to(mean.device)
        return mean + std * eps

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))[:, :, self._front_pad(num_frames):]


# ------------------------------------------------------------------------------------------------------------------
# Spatial VAE and the pipeline


class SpatialVAE(nn.Module):
    """``VideoAutoencoderKL``: diffusers' AutoencoderKL under ``.module``, frame by frame in micro-batches."""

    def __init__(self, config: dict, micro_batch_size: int | None) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        self.module = AutoencoderKL(**config)
        self.micro_batch_size = micro_batch_size

    def set_tiling(self, tile_px: int | None) -> None:
        """Tile frames larger than ``tile_px`` pixels (diffusers' blended tiling); None switches tiling off."""
        m = self.module
        m.use_tiling = tile_px is not None
        if tile_px is not None:
            m.tile_sample_min_size = tile_px
            m.tile_latent_min_size = tile_px // 2 ** (len(m.config.block_out_channels) - 1)

    def _batches(self, n: int) -> range:
        return range(0, n, self.micro_batch_size or n)

    def encode(self, x: torch.Tensor, *, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 4, T, H/8, W/8) scaled by 0.18215."""
        B, C, T, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)
        out = []
        for i in self._batches(B * T):
            dist = self.module.encode(frames[i:i + (self.micro_batch_size or B * T)]).latent_dist
            out.append((dist.sample(generator) if sample else dist.mode()) * SPATIAL_SCALE)
        z = torch.cat(out)
        return z.reshape(B, T, *z.shape[1:]).transpose(1, 2)

    def decode_into(self, z: torch.Tensor, out: torch.Tensor) -> None:
        """Decode latents (B, 4, T, h, w) into ``out`` (B, 3, T, H, W), micro-batch by micro-batch."""
        B, C, T, h, w = z.shape
        frames = z.transpose(1, 2).reshape(B * T, C, h, w)
        mb = self.micro_batch_size or B * T
        for i in range(0, B * T, mb):
            x = self.module.decode(frames[i:i + mb] / SPATIAL_SCALE).sample
            for k in range(x.shape[0]):
                b, t = divmod(i + k, T)
                out[b, :, t].copy_(x[k])


class VideoAutoencoderPipeline(nn.Module):
    """Open-Sora 1.2's video VAE. ``encode``: video in [-1, 1] -> normalised latent; ``decode`` the reverse."""

    def __init__(self, config: VAEConfig = OPENSORA_VAE_V12) -> None:
        super().__init__()
        self.config = config
        self.spatial_vae = SpatialVAE(config.spatial, config.micro_batch_size)
        self.temporal_vae = TemporalVAE(config.temporal)
        self.register_buffer("scale", torch.tensor(config.scale, dtype=torch.float32)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(config.shift, dtype=torch.float32)[None, :, None, None, None])

    @property
    def dtype(self) -> torch.dtype:
        return self.temporal_vae.quant_conv.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.temporal_vae.quant_conv.conv.weight.device

    def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return self.config.latent_size(frames, height, width)

    def check_geometry(self, model_config, frames: int, height: int, width: int) -> None:
        """The DiT's latent for this video size must be the VAE's (channels, frames, height, width)."""
        from qc_compile.models.stdit3 import Geometry

        g = Geometry.for_model(model_config, frames, height, width)
        ours = (self.config.temporal.embed_dim, *self.latent_size(frames, height, width))
        if (model_config.in_channels, g.frames, g.height, g.width) != ours:
            raise UserError(f"the VAE's latent for {frames}x{height}x{width} is {ours}, but model "
                            f"{model_config.name} expects {(model_config.in_channels, g.frames, g.height, g.width)}; "
                            "use the VAE released with the model.")

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """(B, 3, F, H, W) video in [-1, 1] -> (B, 4, T, H/8, W/8). ``sample`` draws from the posteriors as
        Open-Sora does (posterior.sample()); ``sample=False`` takes their means (deterministic)."""
        x = x.to(self.device, self.dtype)
        x_z = self.spatial_vae.encode(x, sample=sample, generator=generator)
        m = self.config.micro_frame_size or x_z.shape[2]
        z = torch.cat([self.temporal_vae.encode(x_z[:, :, i:i + m], sample=sample, generator=generator)
                       for i in range(0, x_z.shape[2], m)], dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, num_frames: int, *, out_device: str | torch.device | None = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 4, T, h, w) latent -> (B, 3, num_frames, 8h, 8w) video (not clamped), built chunk by chunk into one
        output tensor on ``out_device`` (default: the VAE's device)."""
        expected = self.config.latent_size(num_frames, 8, 8)[0]
        if z.dim() != 5 or z.shape[1] != self.config.temporal.embed_dim or z.shape[2] != expected:
            raise UserError(f"VAE decode: latent of shape {tuple(z.shape)} does not hold {num_frames} frames "
                            f"(expected (B, {self.config.temporal.embed_dim}, {expected}, h, w)).")
        z = z.to(self.device, self.dtype)
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        B, _, T, h, w = z.shape
        s = self.config.spatial_factor
        out = torch.empty(B, self.config.spatial["out_channels"], num_frames, h * s, w * s,
                          device=out_device or self.device, dtype=out_dtype)
        m = self.config.micro_frame_size
        mz = self.config.latent_size(m, 8, 8)[0] if m else T
        done, remaining = 0, num_frames
        for i in range(0, T, mz):
            nf = min(m, remaining) if m else num_frames
            x_z = self.temporal_vae.decode(z[:, :, i:i + mz], num_frames=nf)
            self.spatial_vae.decode_into(x_z, out[:, :, done:done + x_z.shape[2]])
            done += x_z.shape[2]
            remaining -= nf
        return out


# ------------------------------------------------------------------------------------------------------------------
# Loading


def _describe(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def resolve_vae_file(path: str | os.PathLike) -> Path:
    """``--vae`` takes the released folder (hpcai-tech/OpenSora-VAE-v1.2) or its model.safetensors."""
    p = Path(path)
    if p.is_dir():
        f = p / RELEASED_FILE
        if not f.is_file():
            raise UserError(f"--vae {p}: the folder has no {RELEASED_FILE}; pass the OpenSora-VAE-v1.2 folder "
                            f"(hpcai-tech/OpenSora-VAE-v1.2, which holds {RELEASED_FILE}) or that file itself.")
        return f
    if not p.is_file():
        raise UserError(f"--vae {p}: no such file or folder; pass the OpenSora-VAE-v1.2 folder or its "
                        f"{RELEASED_FILE}.")
    return p


def _wrong_model_hint(keys: set[str]) -> str:
    if any(k.startswith(("spatial_blocks.", "temporal_blocks.")) for k in keys):
        return " It holds STDiT3 keys (spatial_blocks.*): this is the DiT checkpoint; pass it as --checkpoint."
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return (" It holds a bare AutoencoderKL (encoder.*/decoder.*): that is the SD-XL spatial VAE alone; "
                "--vae takes OpenSora-VAE-v1.2, which bundles it with the temporal VAE.")
    if any(k.startswith(("encoder.block.", "shared.")) for k in keys):
        return " It holds T5 keys: pass that folder as --text-encoder."
    return ""


def load_vae(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             tile_px: int | None = None) -> VideoAutoencoderPipeline:
    """Load OpenSora-VAE-v1.2's ``model.safetensors`` (or a file we wrote in the same layout) unchanged.

    The module is built on the meta device and the file's tensors are assigned, so a full-size load costs no
    random initialisation. ``scale``/``shift`` are taken from the file when present, else from the v1.2 config."""
    from safetensors import safe_open

    f = resolve_vae_file(path)
    try:
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as e:  # safetensors raises several types
        raise UserError(f"--vae {f} is not a readable safetensors file ({e}); qc-compile reads weights only from "
                        ".safetensors files.") from None
    config = OPENSORA_VAE_V12
    if meta.get("format") == FORMAT:
        try:
            config = VAEConfig.from_dict(json.loads(meta["config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"--vae {f}: its 'config' metadata is malformed ({e}).") from None
    with torch.device("meta"):
        vae = VideoAutoencoderPipeline(config)
    expected = vae.state_dict()
    for k in ("scale", "shift"):
        tensors.setdefault(k, getattr(vae, k).new_tensor(getattr(config, k), device="cpu").reshape(1, -1, 1, 1, 1))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} (expected {tuple(expected[k].shape)})"
                    for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing key(s): {_describe(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected key(s): {_describe(unexpected)}" if unexpected else "",
                 f"{len(shapes)} shape mismatch(es): {_describe(shapes, 3)}" if shapes else ""]
        raise UserError(f"--vae {f} is not an OpenSora-VAE-v1.2 file: " + "; ".join(p for p in parts if p) +
                        ". Expected keys scale, shift, spatial_vae.module.* (SD-XL AutoencoderKL) and temporal_vae.* "
                        f"({len(expected)} tensors)." + _wrong_model_hint(set(tensors)))
    from qc_compile.validate import check_weights

    check_weights(tensors, f"--vae {f}")  # a NaN/Inf weight decodes to garbage frames with exit 0 otherwise
    vae.load_state_dict({k: v.to(dtype if v.is_floating_point() and k not in ("scale", "shift") else v.dtype)
                         for k, v in tensors.items()}, assign=True)
    vae = vae.to(device).eval()
    vae.spatial_vae.set_tiling(tile_px)
    return vae


def save_vae(path: str | os.PathLike, vae: VideoAutoencoderPipeline) -> str:
    """Write ``vae`` in the released key layout, with its config as metadata (used for small test weights)."""
    from safetensors.torch import save

    from qc_compile.artifacts import write_bytes_atomic

    tensors = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    meta = {"format": FORMAT, "schema_version": "1", "config": json.dumps(vae.config.to_dict())}
    return write_bytes_atomic(path, save(tensors, metadata=meta))
