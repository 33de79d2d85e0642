"""The options that give opensora-v1.2 its text encoder and VAE (Open-Sora's released T5 and OpenSora-VAE-v1.2
files), shared by every command that samples: one definition, so `generate` and `run` take the same words."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

import qc_compile.validate as V

OPENSORA_OPTIONS = ("text_encoder", "vae", "caption_cache", "aes", "flow")


def opensora_options(f: Callable) -> Callable:
    """Add --text-encoder, --vae, --caption-cache, --aes and --flow to a click command."""
    for opt in reversed([
        click.option("--text-encoder", type=click.Path(path_type=Path), default=None,
                     help="opensora-v1.2: folder of its T5 v1.1 XXL (e.g. DeepFloyd/t5-v1_1-xxl: config.json, "
                          "*.safetensors, tokenizer)."),
        click.option("--vae", type=click.Path(path_type=Path), default=None,
                     help="opensora-v1.2: the OpenSora-VAE-v1.2 folder or its model.safetensors (latents -> frames)."),
        click.option("--caption-cache", type=click.Path(path_type=Path), default=None,
                     help="opensora-v1.2: safetensors file of T5 features, read and extended (T5 runs only on new "
                          "prompts)."),
        click.option("--aes", type=V.FiniteFloat(-100.0, 100.0), default=6.5, show_default=True,
                     help="opensora-v1.2: ' aesthetic score: X.' appended to each prompt, as Open-Sora's sampling "
                          "config does (negative: none)."),
        click.option("--flow", type=V.FiniteFloat(-100.0, 100.0), default=None,
                     help="opensora-v1.2: ' motion score: X.' appended (default none)."),
    ]):
        f = opt(f)
    return f
