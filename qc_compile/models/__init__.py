"""Models: STDiT3 (Open-Sora 1.2) and the `qc-ref` reference model, plus loading by name.

``load_model("qc-ref")`` gives the shipped, trained reference model with its caption encoder;
``load_model("opensora-v1.2", checkpoint=...)`` loads a released STDiT3-XL/2 file unchanged (random weights
without a checkpoint, for speed work at the real scale). Diffusers video transformers come through their adapter
(:mod:`qc_compile.models.diffusers_adapter`): ``load_model("wan2.1:PATH")`` / ``"wan2.2:PATH"`` / ``"cogvideox:PATH"``
with a local diffusers folder, and ``load_model("qc-ref-wan")`` for the shipped Wan-architecture reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from qc_compile.errors import UserError
from qc_compile.models.checkpoint import (QC_REF_CHECKPOINT, TEXT_PREFIX, check_state_dict, config_from_metadata,
                                          load_stdit3_weights, read_safetensors)
from qc_compile.models.config import CONFIGS, STDiT3Config, get_config, is_diffusers_spec
from qc_compile.models.stdit3 import STDiT3, Geometry

__all__ = ["STDiT3", "STDiT3Config", "Geometry", "LoadedModel", "load_model", "CONFIGS", "get_config"]


@dataclass
class LoadedModel:
    config: STDiT3Config
    model: STDiT3
    text_encoder: torch.nn.Module | None  # qc-ref's caption encoder; None for models fed by an external T5
    checkpoint: str | None
    # Open-Sora 1.2: T5 + its prompt conventions (+ caption cache), set by prompt_encoder.attach_text_encoder.
    prompt_encoder: object | None = None

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption features (n, 1, L, Cy) and mask (n, L) bool, on the model's device."""
        device = self.model.x_embedder.proj.weight.device
        if self.prompt_encoder is not None:
            y, mask = self.prompt_encoder.encode(list(prompts))
            return y.to(device, torch.float32), mask.to(device).bool()
        if self.text_encoder is None:
            raise UserError(f"model {self.config.name} takes T5 caption features: pass --text-encoder with the "
                            "folder of its T5 (T5 v1.1 XXL, e.g. DeepFloyd/t5-v1_1-xxl) to use text prompts.")
        from qc_compile.models.caption_encoder import CaptionTokenizer

        ids, mask = CaptionTokenizer().encode(prompts, max_length=self.config.model_max_length)
        with torch.no_grad():
            y = self.text_encoder(ids.to(device), mask.to(device))
        return y.float(), mask.bool().to(device)

    def null_captions(self, n: int) -> torch.Tensor:
        """The learned null caption (the CFG unconditional branch), (n, 1, L, Cy)."""
        return self.model.y_embedder.y_embedding[None, None].float().repeat(n, 1, 1, 1)


def build_text_encoder(config: STDiT3Config) -> torch.nn.Module | None:
    if not config.text_encoder:
        return None
    from qc_compile.models.caption_encoder import CaptionEncoder, CaptionTokenizer

    kw = dict(config.text_encoder)
    if kw.get("dim") != config.caption_channels:
        raise UserError(f"model config {config.name}: text_encoder dim {kw.get('dim')} must equal caption_channels "
                        f"{config.caption_channels}.")
    return CaptionEncoder(CaptionTokenizer().vocab_size, **kw)


def load_model(name: str = "qc-ref", checkpoint: str | os.PathLike | None = None, *, device: str = "cpu",
               dtype: torch.dtype = torch.float32, random_weights: bool = False, seed: int = 0) -> LoadedModel:
    """Build model ``name`` and load its weights (the shipped file for qc-ref unless ``checkpoint`` is given)."""
    if is_diffusers_spec(name):
        return _load_diffusers(name, checkpoint, device=device, dtype=dtype)
    config = get_config(name)
    if checkpoint is None and name == "qc-ref" and not random_weights:
        checkpoint = QC_REF_CHECKPOINT
        if not checkpoint.is_file():
            raise UserError(f"the shipped qc-ref checkpoint {checkpoint} is missing from this installation; "
                            "reinstall qc-compile or pass --checkpoint.")
    tensors = meta = None
    if checkpoint is not None:
        tensors, meta = read_safetensors(checkpoint)
        file_config = config_from_metadata(meta, checkpoint)
        if file_config is not None and file_config.name != config.name:
            raise UserError(f"checkpoint {checkpoint} holds model {file_config.name!r}, not {config.name!r}; pass "
                            f"--model {file_config.name}.")
        if file_config is not None:
            config = file_config
    torch.manual_seed(seed)
    model = STDiT3(config)
    text_encoder = build_text_encoder(config)
    if tensors is not None:
        load_stdit3_weights(model, tensors, path=checkpoint, model_name=config.name)
        if text_encoder is not None:
            te = {k[len(TEXT_PREFIX):]: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
            check_state_dict(text_encoder.state_dict(), te, path=checkpoint, model_name=f"{config.name} text encoder")
            from qc_compile.validate import check_weights

            check_weights(te, f"checkpoint {checkpoint} (text encoder)")
            text_encoder.load_state_dict(te)
    model = model.to(device=device, dtype=dtype).eval()
    if text_encoder is not None:
        text_encoder = text_encoder.to(device=device).eval()  # the caption encoder stays fp32 (T5 runs fp32 too)
    return LoadedModel(config, model, text_encoder, str(checkpoint) if checkpoint else None)


def _load_diffusers(name: str, checkpoint, *, device: str, dtype: torch.dtype):
    """Diffusers families and qc-ref-wan (their own loaders; kept out of the STDiT3 path above)."""
    if name == "qc-ref-wan":
        from qc_compile.models.qc_ref_wan import load_qc_ref_wan

        return load_qc_ref_wan(checkpoint, device=device, dtype=dtype)
    if checkpoint is not None:
        raise UserError(f"--model {name} reads its weights from the folder after the colon; drop --checkpoint.")
    from qc_compile.models.diffusers_adapter import load_diffusers_model

    return load_diffusers_model(name, device=device, dtype=dtype)
