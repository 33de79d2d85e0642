"""Loading and saving model weights (safetensors only; never pickles).

Two layouts are read:
* Open-Sora's own ``model.safetensors`` (STDiT3 keys at top level, no metadata) — loads unchanged; ``rope.freqs``
  may be present or absent.
* qc-compile checkpoints: the same STDiT3 keys plus ``text_encoder.*`` keys for the small caption encoder, and
  metadata ``{"format": "qc-compile/checkpoint", "schema_version": "1", "config": <json>}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from qc_compile.artifacts import write_bytes_atomic
from qc_compile.errors import UserError
from qc_compile.models.config import STDiT3Config
from qc_compile.validate import check_weights

FORMAT = "qc-compile/checkpoint"
SCHEMA_VERSION = "1"
TEXT_PREFIX = "text_encoder."
ASSETS = Path(__file__).resolve().parent.parent / "assets"
QC_REF_CHECKPOINT = ASSETS / "qc_ref.safetensors"


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with a one-paragraph error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass --checkpoint with the path of a .safetensors file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types (SafetensorError, OSError, ...)
        raise UserError(f"checkpoint {path} is not a readable safetensors file ({e}). qc-compile reads weights only "
                        "from .safetensors files (never pickles); convert a .pt/.pth file with safetensors first.") \
            from None
    return tensors, meta


def config_from_metadata(meta: dict[str, str], path: str | os.PathLike) -> STDiT3Config | None:
    if meta.get("format") != FORMAT:
        return None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"checkpoint {path} has schema_version {meta.get('schema_version')!r}; this qc-compile "
                        f"reads {SCHEMA_VERSION!r}.")
    try:
        return STDiT3Config.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, TypeError) as e:
        raise UserError(f"checkpoint {path}: its 'config' metadata is missing or malformed ({e}).") from None


def _describe(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], *, path: str | os.PathLike,
                     model_name: str) -> None:
    """Raise a UserError naming the missing/unexpected keys and mismatched shapes (all of them, summarised)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
                    for k in set(expected) & set(got) if tuple(got[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_describe(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_describe(shapes, 3)}")
    if problems:
        raise UserError(f"checkpoint {path} does not match model {model_name}: " + "; ".join(problems) +
                        ". Check that --model names the architecture this checkpoint was trained for.")


def load_stdit3_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], *, path, model_name: str) -> None:
    """Load STDiT3 keys (Open-Sora names); ``rope.freqs`` is optional and recomputed when absent."""
    sd = {k: v for k, v in tensors.items() if not k.startswith(TEXT_PREFIX)}
    expected = model.state_dict()
    if "rope.freqs" not in sd and "rope.freqs" in expected:
        sd["rope.freqs"] = expected["rope.freqs"].clone()
    check_state_dict(expected, sd, path=path, model_name=model_name)
    check_weights(sd, f"checkpoint {path}")
    model.load_state_dict(sd, strict=True)


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, config: STDiT3Config,
                    text_encoder: torch.nn.Module | None = None, dtype: torch.dtype = torch.bfloat16,
                    extra_metadata: dict[str, str] | None = None) -> str:
    """Write model (+ caption encoder) weights atomically; returns the file's sha256."""
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    if text_encoder is not None:
        tensors.update({TEXT_PREFIX + k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
                        .contiguous() for k, v in text_encoder.state_dict().items()})
    meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "config": json.dumps(config.to_dict())}
    meta.update(extra_metadata or {})
    return write_bytes_atomic(path, save(tensors, metadata=meta))
