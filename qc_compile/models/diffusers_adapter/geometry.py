"""The geometry of one diffusers video-transformer call: latent sizes, patch grid, and where the video tokens sit.

Diffusers transformers take latents, so the sizes here are *latent* frames/height/width (what the VAE produced);
:meth:`from_video` maps a pixel video size through the VAE's compression ratios. ``prefix_tokens`` counts the tokens
that precede the video tokens in the hidden state ``x`` the block units pass along (CogVideoX carries its text
stream in front of the video tokens; Wan carries none), so statistics over frames can slice the video part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qc_compile.errors import UserError
from qc_compile.models.units import PatchGrid


@dataclass(frozen=True)
class DiffusersGeometry(PatchGrid):  # sizes divide by the patch (checked): grid = sizes / patch
    frames: int  # latent frames
    height: int  # latent height
    width: int  # latent width
    patch_size: tuple[int, int, int]  # (pt, ph, pw)
    prefix_tokens: int = 0  # tokens in front of the video tokens in ``x`` (CogVideoX: the text length)

    def __post_init__(self) -> None:
        pt, ph, pw = self.patch_size
        bad = [f"{n}={v} (patch {p})" for n, v, p in (("frames", self.frames, pt), ("height", self.height, ph),
                                                       ("width", self.width, pw)) if v <= 0 or v % p]
        if bad:
            raise UserError(f"latent size does not divide by the transformer's patch size {self.patch_size}: "
                            f"{', '.join(bad)}. Choose a video size whose latent is a multiple of the patch size.")

    def video_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, N, C) video tokens of a hidden state ``x`` (B, prefix + N, C), frame-major (t, h, w)."""
        return x[:, self.prefix_tokens:]

    @classmethod
    def from_video(cls, frames: int, height: int, width: int, *, patch_size: tuple[int, int, int],
                   temporal_ratio: int, spatial_ratio: int, prefix_tokens: int = 0) -> "DiffusersGeometry":
        """From a pixel video size: latent frames (f - 1) // temporal_ratio + 1 (causal video VAEs of Wan and
        CogVideoX), latent height/width // spatial_ratio."""
        for name, v in (("frames", frames), ("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"{name} must be a positive integer, got {v!r}.")
        if (frames - 1) % temporal_ratio:
            raise UserError(f"frames={frames}: this model's VAE needs 1 + {temporal_ratio}·k frames "
                            f"(e.g. {1 + temporal_ratio * max(1, (frames - 1) // temporal_ratio)}).")
        return cls((frames - 1) // temporal_ratio + 1, height // spatial_ratio, width // spatial_ratio,
                   tuple(patch_size), prefix_tokens)
