"""The parts around the DiT that turn a latent model into prompt -> video: T5 in front, the VAE behind.

One function for the verbs (``generate``, ``calibrate``) so each checks the same things with the same messages:
a latent model needs ``--text-encoder`` (T5) and, where frames are wanted, ``--vae``; a pixel-space model (qc-ref)
has its own caption encoder and no VAE, so those options are refused for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qc_compile.errors import UserError


def check_part_paths(*, text_encoder: Path | None = None, vae: Path | None = None,
                     caption_cache: Path | None = None) -> None:
    """The files behind ``--text-encoder``/``--vae``/``--caption-cache`` checked without loading anything (folder
    layout, config.json, that the cache is a writable file), so a wrong path fails before a multi-GB model load or
    a long generation. :func:`attach_opensora_parts` later checks their contents."""
    if text_encoder is not None:
        from qc_compile.models.t5 import check_t5_folder

        check_t5_folder(text_encoder)
    if vae is not None:
        from qc_compile.models.opensora_vae import resolve_vae_file

        resolve_vae_file(vae)
    if caption_cache is not None:
        from qc_compile.models.text_cache import check_cache_path

        check_cache_path(caption_cache)


def attach_opensora_parts(loaded, *, text_encoder: Path | None, vae: Path | None = None,
                          caption_cache: Path | None = None, aes: float | None = 6.5, flow: float | None = None,
                          dtype: torch.dtype = torch.float32, need_vae: bool = True):
    """Attach T5 (+ cache) to ``loaded`` and load the VAE; returns the VAE (None for pixel-space models or when
    ``need_vae`` is False). Negative ``aes``/``flow`` mean no suffix."""
    name = loaded.config.name
    given = [o for o, v in (("--text-encoder", text_encoder), ("--vae", vae), ("--caption-cache", caption_cache))
             if v is not None]
    if loaded.config.space != "latent":
        if given:
            raise UserError(f"{', '.join(given)}: model {name} works in pixel space with its own caption encoder; "
                            "these options are for opensora-v1.2 (T5 text encoder and VAE).")
        return None
    if text_encoder is None:
        raise UserError(f"model {name} takes T5 caption features: pass --text-encoder with the folder of its T5 "
                        "(T5 v1.1 XXL, e.g. a local copy of DeepFloyd/t5-v1_1-xxl with safetensors weights).")
    if need_vae and vae is None:
        raise UserError(f"model {name} generates VAE latents: pass --vae with the OpenSora-VAE-v1.2 folder (or its "
                        "model.safetensors) to decode them to frames.")
    from qc_compile.models.opensora_vae import load_vae
    from qc_compile.models.prompt_encoder import attach_text_encoder

    device = loaded.model.x_embedder.proj.weight.device
    decoder = load_vae(vae, device=device, dtype=dtype) if need_vae else None  # file checks before T5's
    attach_text_encoder(loaded, text_encoder, cache=caption_cache,
                        aes=None if aes is not None and aes < 0 else aes,
                        flow=None if flow is not None and flow < 0 else flow)
    return decoder
