"""T5 v1.1 XXL, the text encoder of Open-Sora 1.2, through ``transformers`` from a local folder (no hub access).

``--text-encoder PATH`` names a folder laid out as ``DeepFloyd/t5-v1_1-xxl`` (or any T5 checkpoint saved with
``save_pretrained``): ``config.json`` (model_type ``t5``), safetensors weights (``model.safetensors`` or shards with
``model.safetensors.index.json``; the decoder weights of a full T5 are ignored) and a tokenizer (``spiece.model``
and/or ``tokenizer.json`` + ``tokenizer_config.json``). Pickled ``.bin`` weights are refused: qc-compile never
unpickles.

Encoding follows Open-Sora's ``T5Embedder.get_text_embeddings``: pad to ``max_length`` (300) with truncation, EOS
added, the encoder's ``last_hidden_state`` returned as ``(n, 1, L, d_model)`` with the ``(n, L)`` attention mask.
Open-Sora runs T5 in fp32; the default here is bf16 on CUDA (half the memory and time of the 4.8 B-parameter
encoder; T5 v1.1 is bf16-safe, unlike fp16) and fp32 on the CPU. The model is loaded on first use, so a caption
cache that holds every prompt never loads T5 at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from qc_compile.errors import UserError

MAX_LENGTH = 300  # Open-Sora 1.2 model_max_length
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets): a cheap fingerprint of its layout."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def _weight_files(p: Path) -> list[Path]:
    return sorted(x for x in p.glob("*.safetensors") if x.is_file())


def check_t5_folder(path: str | os.PathLike, expected_dim: int | None = None) -> dict:
    """``--text-encoder`` checked without loading anything (folder, config.json, safetensors weights, tokenizer);
    returns its config. Cheap, so the commands call it before any model load."""
    p = Path(path)
    what = ("a T5 encoder folder such as DeepFloyd/t5-v1_1-xxl (config.json, model*.safetensors, spiece.model "
            "or tokenizer.json)")
    if not p.is_dir():
        raise UserError(f"--text-encoder {p}: not a folder; pass {what}.")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"--text-encoder {p}: no config.json; pass {what}.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--text-encoder {cfg_path}: not valid JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"--text-encoder {cfg_path}: expected a JSON object (a transformers config), got "
                        f"{type(cfg).__name__}; pass {what}.")
    if cfg.get("model_type") != "t5":
        raise UserError(f"--text-encoder {cfg_path}: model_type is {cfg.get('model_type')!r}, expected 't5' "
                        f"(Open-Sora 1.2 uses T5 v1.1 XXL); pass {what}.")
    if isinstance(cfg.get("d_model"), bool) or not isinstance(cfg.get("d_model"), int) or cfg["d_model"] < 1:
        raise UserError(f"--text-encoder {cfg_path}: d_model is {cfg.get('d_model')!r}, expected a positive integer "
                        "(T5 v1.1 XXL has 4096).")
    if expected_dim is not None and cfg["d_model"] != expected_dim:
        raise UserError(f"--text-encoder {cfg_path}: d_model is {cfg.get('d_model')}, but the model takes "
                        f"{expected_dim}-channel caption features (T5 v1.1 XXL has d_model 4096).")
    if not _weight_files(p):
        pickled = sorted(x.name for x in p.glob("*.bin"))
        extra = (f" It holds only pickled weights ({', '.join(pickled[:3])}); qc-compile never unpickles. "
                 "Fetch the .safetensors variant of the checkpoint, or convert the .bin files once where you "
                 "trust them (transformers save_pretrained writes safetensors).") if pickled else ""
        raise UserError(f"--text-encoder {p}: no model*.safetensors weights.{extra}")
    if not any((p / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise UserError(f"--text-encoder {p}: no tokenizer (expected spiece.model or tokenizer.json).")
    return cfg


class T5TextEncoder:
    """A T5 encoder folder: checked on construction, loaded lazily; ``identity`` keys the caption cache."""

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, max_length: int = MAX_LENGTH,
                 expected_dim: int | None = None) -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_length = max_length
        self.config = self._check_folder(expected_dim)
        self.d_model = int(self.config["d_model"])
        self._model = None
        self._tokenizer = None
        self._identity: str | None = None

    @classmethod
    def from_model(cls, model, tokenizer, *, identity: str, max_length: int = MAX_LENGTH) -> "T5TextEncoder":
        """Wrap an already built encoder and tokenizer (random weights for benchmarks); no folder involved."""
        self = cls.__new__(cls)
        p = next(model.parameters())
        self.path, self.device, self.dtype, self.max_length = None, p.device, p.dtype, max_length
        self.config = {"model_type": "t5", "d_model": model.config.d_model}
        self.d_model = model.config.d_model
        self._model, self._tokenizer, self._identity = model.eval(), tokenizer, identity
        return self

    # -- checks ----------------------------------------------------------------------------------------------------

    def _check_folder(self, expected_dim: int | None) -> dict:
        return check_t5_folder(self.path, expected_dim)

    @staticmethod
    def weight_files(p: Path) -> list[Path]:
        return _weight_files(p)

    # -- identity (cache key) ----------------------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """sha256 of config.json, the tokenizer files, every weight file's header and size, dtype and max length.
        Weight *values* are not hashed (19 GB); any re-save, conversion or different checkpoint changes a header."""
        if self._identity is None:
            h = hashlib.sha256()
            h.update((self.path / "config.json").read_bytes())
            for name in _TOKENIZER_FILES:
                f = self.path / name
                if f.is_file():
                    h.update(name.encode() + b"\0" + f.read_bytes())
            for f in self.weight_files(self.path):
                h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + _safetensors_header(f))
            h.update(f"{self.dtype}|{self.max_length}".encode())
            self._identity = h.hexdigest()
        return self._identity

    # -- loading and encoding --------------------------------------------------------------------------------------

    def load(self) -> None:
        if self._model is not None:
            return
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise UserError("the T5 text encoder needs transformers and sentencepiece: "
                            "pip install 'qc-compile[models]'.") from None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise in CLI output
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:  # transformers raises OSError/ValueError/... for a broken tokenizer folder
            raise UserError(f"--text-encoder {self.path}: the tokenizer does not load ({type(e).__name__}: {e}).") \
                from None
        try:
            import transformers

            old = int(transformers.__version__.split(".")[0]) < 5 and \
                int(transformers.__version__.split(".")[1]) < 56  # `dtype=` arrived in 4.56 (`torch_dtype` before)
            kw = {"torch_dtype" if old else "dtype": self.dtype}
            model = T5EncoderModel.from_pretrained(str(self.path), use_safetensors=True, **kw)
        except Exception as e:
            raise UserError(f"--text-encoder {self.path}: the T5 encoder weights do not load "
                            f"({type(e).__name__}: {e}).") from None
        model = model.to(self.device).eval()
        from qc_compile.validate import check_weights

        check_weights(model.state_dict(), f"--text-encoder {self.path}")  # NaN/Inf weights give garbage captions
        self._model = model

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.load()
        tok = self._tokenizer(texts, max_length=self.max_length, padding="max_length", truncation=True,
                              return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts (already in Open-Sora's conventions) -> features (n, 1, L, d_model) in the encoder's dtype and the
        mask (n, L) bool, on the encoder's device."""
        ids, mask = self.tokenize(list(texts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        y = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
        return y[:, None], mask.bool()
