"""Prompts -> caption features for Open-Sora 1.2: its prompt conventions, T5, and the optional caption cache.

``attach_text_encoder(loaded, path, ...)`` gives a :class:`~qc_compile.models.LoadedModel` of ``opensora-v1.2`` a
prompt encoder, after which ``loaded.encode_prompts(prompts)`` works as it does for qc-ref, so every code path that
takes text (``generate``, calibration, sweeps) feeds the real model real caption features. The null caption of CFG
stays the model's own learned ``y_embedder.y_embedding`` (``LoadedModel.null_captions``), as in Open-Sora.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qc_compile.models.opensora_prompts import AES_DEFAULT, preprocess
from qc_compile.models.t5 import T5TextEncoder
from qc_compile.models.text_cache import CaptionCache


@dataclass
class PromptEncoder:
    t5: T5TextEncoder
    cache: CaptionCache | None = None
    aes: float | None = AES_DEFAULT
    flow: float | None = None
    camera_motion: str | None = None
    clean: bool = True
    t5_calls: int = 0  # prompts actually run through T5 (the rest came from the cache)

    def texts(self, prompts: list[str]) -> list[str]:
        """The strings T5 sees (Open-Sora's score suffixes and cleaning)."""
        return [preprocess(p, aes=self.aes, flow=self.flow, camera_motion=self.camera_motion, clean=self.clean)
                for p in prompts]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 1, L, C) features in T5's dtype and (n, L) bool mask, on the CPU when every prompt is cached, else on
        T5's device. Cache misses are encoded in one batch and written back to the cache file."""
        texts = self.texts(prompts)
        ident = self.t5.identity if self.cache is not None else ""
        found = [self.cache.get(ident, t) if self.cache is not None else None for t in texts]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            y, mask = self.t5.encode([texts[i] for i in missing])
            self.t5_calls += len(missing)
            for j, i in enumerate(missing):
                found[i] = (y[j, 0], mask[j])
                if self.cache is not None:
                    self.cache.put(ident, texts[i], y[j, 0], mask[j])
            if self.cache is not None:
                self.cache.save()
        device = found[missing[0]][0].device if missing else torch.device("cpu")
        y = torch.stack([f[0].to(device) for f in found])[:, None]
        mask = torch.stack([f[1].to(device) for f in found])
        return y, mask


def attach_text_encoder(loaded, path: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, cache: str | os.PathLike | None = None,
                        aes: float | None = AES_DEFAULT, flow: float | None = None,
                        camera_motion: str | None = None) -> PromptEncoder:
    """Give ``loaded`` (an ``opensora-v1.2`` LoadedModel) a T5 prompt encoder from the folder ``path``."""
    if device is None:
        device = loaded.model.x_embedder.proj.weight.device
    t5 = T5TextEncoder(path, device=device, dtype=dtype, max_length=loaded.config.model_max_length,
                       expected_dim=loaded.config.caption_channels)
    enc = PromptEncoder(t5, CaptionCache(cache) if cache is not None else None, aes=aes, flow=flow,
                        camera_motion=camera_motion)
    loaded.prompt_encoder = enc
    return enc
