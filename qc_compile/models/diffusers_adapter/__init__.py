"""Diffusers video transformers as qc-compile models: units, a geometry and sub-block hooks (DESIGN.md §6).

    from qc_compile.models.diffusers_adapter import adapter_for
    adapter = adapter_for(pipe.transformer)          # WanTransformer3DModel or CogVideoXTransformer3DModel
    g = adapter.geometry_of(latents)
    v = adapter.forward_units(adapter.forward_inputs(latents, t, prompt_embeds), g)   # == transformer(...).sample

The adapter wraps the diffusers module (weights shared, nothing copied); :mod:`.base` documents the protocol.
``load_diffusers_transformer`` reads a local diffusers folder for ``--model wan2.1:PATH`` / ``cogvideox:PATH``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qc_compile.errors import UserError
from qc_compile.models.diffusers_adapter.base import DiffusersAdapter
from qc_compile.models.diffusers_adapter.cogvideox import CogVideoXAdapter
from qc_compile.models.diffusers_adapter.geometry import DiffusersGeometry
from qc_compile.models.diffusers_adapter.wan import WanAdapter

FAMILIES: dict[str, tuple[str, type[DiffusersAdapter]]] = {
    # --model prefix: (diffusers class name, adapter)
    "wan2.1": ("WanTransformer3DModel", WanAdapter),
    "wan2.2": ("WanTransformer3DModel", WanAdapter),
    "cogvideox": ("CogVideoXTransformer3DModel", CogVideoXAdapter),
}

__all__ = ["DiffusersAdapter", "DiffusersGeometry", "WanAdapter", "CogVideoXAdapter", "adapter_for", "FAMILIES",
           "parse_model_spec", "load_diffusers_transformer", "load_diffusers_model", "DiffusersLoadedModel"]


def adapter_for(transformer: nn.Module) -> DiffusersAdapter:
    """The adapter for a diffusers transformer instance (by class)."""
    for cls_name, adapter in {v for v in FAMILIES.values()}:
        if type(transformer).__name__ == cls_name:
            return adapter(transformer)
    known = sorted({v[0] for v in FAMILIES.values()})
    raise UserError(f"qc-compile has no adapter for {type(transformer).__name__}; supported diffusers transformers: "
                    f"{', '.join(known)}.")


def parse_model_spec(name: str) -> tuple[str, str] | None:
    """``"wan2.1:/path"`` -> ``("wan2.1", "/path")``; None if ``name`` names no diffusers family."""
    family, sep, path = name.partition(":")
    if not sep or family.lower() not in FAMILIES:
        return None
    if not path:
        raise UserError(f"--model {name}: give the local diffusers model folder after the colon, e.g. "
                        f"{family}:/models/Wan2.1-T2V-1.3B-Diffusers.")
    return family.lower(), path


def _transformer_folder(path: Path, cls_name: str, spec: str) -> Path:
    """A transformer folder (config.json naming ``cls_name``) or a pipeline folder holding one in transformer/."""
    if not path.is_dir():
        raise UserError(f"--model {spec}: {path} is not a folder; expected a local diffusers model folder (a pipeline "
                        "folder with model_index.json, or its transformer/ subfolder).")
    for cand in (path, path / "transformer"):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                found = json.loads(cfg.read_text()).get("_class_name")
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"--model {spec}: {cfg} is not readable JSON ({e}).") from None
            if found == cls_name:
                return cand
            if cand == path and found is not None and not (path / "transformer").is_dir():
                raise UserError(f"--model {spec}: {cfg} holds a {found}, not a {cls_name}; pass the folder of a "
                                f"{cls_name} (or the pipeline folder above it).")
    raise UserError(f"--model {spec}: found no {cls_name} config.json in {path} or {path / 'transformer'}; expected "
                    "a diffusers model folder as written by save_pretrained.")


def load_diffusers_transformer(family: str, path: str | os.PathLike, *, device: str = "cpu",
                               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the transformer of a local diffusers folder (no hub access: ``local_files_only``); safetensors only."""
    import diffusers

    cls_name, _ = FAMILIES[family]
    spec = f"{family}:{path}"
    folder = _transformer_folder(Path(path), cls_name, spec)
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"--model {spec}: {folder} has no .safetensors weights; qc-compile never unpickles .bin "
                        "files. Convert the weights with save_pretrained(safe_serialization=True).")
    cls = getattr(diffusers, cls_name)
    try:
        if _accelerate_available():
            model = cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True)
        else:
            model = _from_folder_without_accelerate(cls, folder, dtype)
    except (OSError, ValueError, EnvironmentError, RuntimeError) as e:
        raise UserError(f"--model {spec}: diffusers could not load {folder}: {e}") from None
    return model.to(device).eval()


def _accelerate_available() -> bool:
    from diffusers.utils import is_accelerate_available

    return is_accelerate_available()


def _from_folder_without_accelerate(cls, folder: Path, dtype: torch.dtype) -> nn.Module:
    """What ``from_pretrained`` does for these classes, for installs without ``accelerate`` (diffusers refuses to load
    models with ``_keep_in_fp32_modules`` then): build from config.json, load every safetensors shard strictly, cast
    to ``dtype`` and keep the class's fp32 modules in fp32 as diffusers would."""
    from safetensors.torch import load_file

    model = cls.from_config(cls.load_config(str(folder)))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    ignore = tuple(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ())
    state = {k: v for k, v in state.items() if not any(p in k for p in ignore)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():  # parameters only: diffusers leaves computed buffers (RoPE) alone
        p.data = p.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


class DiffusersLoadedModel:
    """What ``load_model("wan2.1:PATH")`` returns: the adapter (``model``), its family and the model spec.

    Diffusers families take text-encoder features (T5 / UMT5) that qc-compile does not ship, so ``text_encoder`` is
    None and prompts must come as features; ``qc-ref-wan`` (:mod:`qc_compile.models.qc_ref_wan`) brings its own.
    """

    def __init__(self, name: str, family: str, adapter: DiffusersAdapter, checkpoint: str | None,
                 text_encoder: nn.Module | None = None) -> None:
        self.name, self.family, self.model, self.checkpoint = name, family, adapter, checkpoint
        self.text_encoder = text_encoder

    @property
    def transformer(self) -> nn.Module:
        return self.model.transformer

    @property
    def config(self):
        """The diffusers transformer's config (``.in_channels``, ``.patch_size``, ...)."""
        return self.model.transformer.config

    def encode_prompts(self, prompts: list[str]):
        raise UserError(f"model {self.name} takes text-encoder features (its pipeline's T5), which qc-compile does "
                        "not ship; pass prompt embeddings, or drive the diffusers pipeline with qc_compile.enable(pipe).")


def load_diffusers_model(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DiffusersLoadedModel:
    """``load_model`` for ``wan2.1:PATH`` / ``wan2.2:PATH`` / ``cogvideox:PATH`` (a local diffusers folder)."""
    family, path = parse_model_spec(name)
    transformer = load_diffusers_transformer(family, path, device=device, dtype=dtype)
    return DiffusersLoadedModel(name, family, FAMILIES[family][1](transformer), str(path))
