"""`--model wan2.1:PATH` / `wan2.2:PATH` on `qc-compile run` / `generate` / `sweep`: a local diffusers WanPipeline.

PATH is a folder written by ``WanPipeline.save_pretrained`` (model_index.json, transformer/, vae/, text_encoder/ with
UMT5EncoderModel, tokenizer/, scheduler/), e.g. ``Wan2.1-T2V-1.3B-Diffusers``. It is loaded with
``WanPipeline.from_pretrained(PATH, local_files_only=True, use_safetensors=True)`` — no hub access, and no pickled
``.bin`` weights are ever read. The loaded object offers what :mod:`qc_compile.commands.run_diffusers` uses of
``qc-ref-wan``'s (:class:`~qc_compile.models.qc_ref_wan.QCRefWan`): ``.sample(prompts, seed=, steps=, cfg=,
progress=)`` returning videos (n, 3, F, H, W) in [-1, 1] on the CPU, ``.transformer``, ``.defaults``, ``.name``,
``.checkpoint``, ``.family``, ``.meta`` and ``.device``. Sampling is the pipeline's own ``__call__`` (scheduler, CFG
as two transformer calls per step in ``cache_context``, VAE decode), so ``qc_compile.enable(loaded.transformer)``
sees exactly what it sees under ``WanPipeline``.

Choices: prompt k starts from the noise of ``torch.Generator("cpu").manual_seed(seed + k)`` (all prompts in one
pipeline call with a list of generators; the CPU generator makes CPU and GPU runs start alike); the negative prompt
is the empty string unless given (``WanPipeline``'s own default when none is passed); the sampling defaults are the
pipeline's ``__call__`` defaults (81 frames, 480 x 832, 50 steps, guidance 5.0 in diffusers 0.42) and the CLI's
--frames/--height/--width/--steps/--cfg override them. Two-expert Wan 2.2 folders (``transformer_2``) are refused:
``qc_compile.enable`` wraps one transformer.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from qc_compile.errors import UserError

PIPELINE_CLASS = "WanPipeline"
TRANSFORMER_CLASS = "WanTransformer3DModel"
WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae")  # the components that hold weights
REQUIRED = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
FPS = 16  # Wan's frame rate
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default text length (T5 features padded to it)


def _read_json(path: Path, spec: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--model {spec}: {path} is not readable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise UserError(f"--model {spec}: {path} is not a JSON object.")
    return data


def check_pipeline_folder(family: str, path: str | os.PathLike) -> tuple[Path, dict]:
    """The folder and its model_index.json, after checking (without loading weights) that it is a single-transformer
    WanPipeline folder with safetensors weights; a UserError of one paragraph otherwise."""
    from qc_compile.models.diffusers_adapter import _transformer_folder

    spec = f"{family}:{path}"
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--model {spec}: {folder} is not a folder; expected a local diffusers WanPipeline folder "
                        "(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. "
                        "Wan2.1-T2V-1.3B-Diffusers as written by save_pretrained.")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        if (folder / "config.json").is_file():  # a transformer-only folder? (its own check names a wrong class)
            tr = _transformer_folder(folder, TRANSFORMER_CLASS, spec)
            raise UserError(f"--model {spec}: {tr} is a {TRANSFORMER_CLASS} folder only; `run` and `generate` "
                            "need the whole WanPipeline folder above it: model_index.json, the text encoder "
                            "(text_encoder/) and tokenizer (tokenizer/) for the prompts, the VAE (vae/) to decode and "
                            "the scheduler (scheduler/) to sample. Pass that folder, or drive the transformer from "
                            "Python with qc_compile.enable.")
        raise UserError(f"--model {spec}: {index_path} not found; expected a diffusers WanPipeline folder "
                        "(model_index.json naming WanPipeline, with transformer/, vae/, text_encoder/, tokenizer/ and "
                        "scheduler/).")
    index = _read_json(index_path, spec)
    if index.get("_class_name") != PIPELINE_CLASS:
        raise UserError(f"--model {spec}: {index_path} has _class_name {index.get('_class_name')!r}; expected "
                        f"{PIPELINE_CLASS!r} (a text-to-video Wan pipeline folder).")
    missing = [k for k in REQUIRED if not (isinstance(index.get(k), list) and index[k][-1] is not None)
               or not (folder / k).is_dir()]
    if missing:
        raise UserError(f"--model {spec}: {index_path} (or the folder) has no {', '.join(missing)} component; "
                        "`run` and `generate` need the whole pipeline: the transformer, the text encoder "
                        "(UMT5EncoderModel) and its tokenizer for the prompts, the VAE to decode and the scheduler "
                        "to sample.")
    if index.get("transformer")[-1] != TRANSFORMER_CLASS:
        raise UserError(f"--model {spec}: {index_path} names transformer {index['transformer']!r}; expected "
                        f"{TRANSFORMER_CLASS}.")
    if isinstance(index.get("transformer_2"), list) and index["transformer_2"][-1] is not None:
        raise UserError(f"--model {spec}: {index_path} names a transformer_2 (a two-expert Wan 2.2 pipeline); the "
                        "command line enables one transformer, so these are not run here yet. Drive it from Python "
                        "with qc_compile.enable on each expert.")
    for comp in WEIGHT_COMPONENTS:
        sub = folder / comp
        if not any(sub.glob("*.safetensors")):
            if any(sub.glob("*.bin")) or any(sub.glob("*.pt")) or any(sub.glob("*.pth")):
                raise UserError(f"--model {spec}: {sub} holds only pickled (.bin/.pt) weights and no .safetensors; "
                                "qc-compile never unpickles weight files (they can run code when loaded). Convert the "
                                "folder once with WanPipeline.from_pretrained(...).save_pretrained(..., "
                                "safe_serialization=True) in an environment you trust, and pass the converted folder.")
            raise UserError(f"--model {spec}: {sub} has no .safetensors weights; expected the {comp} of a "
                            "WanPipeline folder as written by save_pretrained.")
    return folder, index


def check_size(folder: Path, spec: str, frames: int, height: int, width: int) -> None:
    """Refuse a size the pipeline would silently round: frames - 1 a multiple of the VAE's temporal factor, height
    and width multiples of its spatial factor times the transformer's patch."""
    vae = _read_json(folder / "vae" / "config.json", spec)
    tr = _read_json(folder / "transformer" / "config.json", spec)
    ft, fs = int(vae.get("scale_factor_temporal", 4)), int(vae.get("scale_factor_spatial", 8))
    patch = tr.get("patch_size", [1, 2, 2])
    mh, mw = fs * int(patch[1]), fs * int(patch[2])
    bad = []
    if (frames - 1) % ft:
        bad.append(f"--frames {frames} (frames - 1 must be a multiple of {ft}, e.g. {(frames - 1) // ft * ft + 1})")
    if height % mh:
        bad.append(f"--height {height} (a multiple of {mh})")
    if width % mw:
        bad.append(f"--width {width} (a multiple of {mw})")
    if bad:
        raise UserError(f"--model {spec}: {'; '.join(bad)}: the pipeline would round the size and the record would "
                        "not match the video; give sizes its VAE and patch size divide.")


def pipeline_call_defaults() -> dict:
    """WanPipeline.__call__'s own defaults: frames, height, width, steps and guidance."""
    from diffusers import WanPipeline

    p = inspect.signature(WanPipeline.__call__).parameters
    return {"frames": p["num_frames"].default, "height": p["height"].default, "width": p["width"].default,
            "steps": p["num_inference_steps"].default, "cfg": float(p["guidance_scale"].default)}


class WanPipelineModel:
    """A loaded WanPipeline with the interface of :class:`~qc_compile.models.qc_ref_wan.QCRefWan` that the CLI uses."""

    fps = FPS
    frame_upscale = 1  # decoded frames are written at their own size
    strip_upscale = 1

    def __init__(self, pipe, name: str, family: str, checkpoint: str, defaults, meta: dict,
                 negative_prompt: str = "", max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> None:
        self.pipe = pipe
        self.name, self.family, self.checkpoint = name, family, checkpoint
        self.defaults = defaults
        self.meta = meta
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length

    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.pipe.transformer.parameters()).device

    @property
    def text_len(self) -> int:
        """Text tokens the transformer attends to (the pipeline pads T5 features to max_sequence_length)."""
        return self.max_sequence_length

    def latent_size(self) -> tuple[int, int, int]:
        """(frames, height, width) of the transformer's input for the default size."""
        d, p = self.defaults, self.pipe
        return ((d.frames - 1) // p.vae_scale_factor_temporal + 1, d.height // p.vae_scale_factor_spatial,
                d.width // p.vae_scale_factor_spatial)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], *, seed: int = 0, steps: int | None = None, cfg: float | None = None,
               progress: bool = False) -> torch.Tensor:
        """Videos (n, 3, F, H, W) float32 in [-1, 1] on the CPU from the pipeline's own sampler, all prompts in one
        call; prompt k starts from the noise of the CPU generator seeded ``seed + k``."""
        d = self.defaults
        n = len(prompts)
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        gens = [torch.Generator("cpu").manual_seed(seed + k) for k in range(n)]
        frames = self.pipe(prompt=list(prompts), negative_prompt=[self.negative_prompt] * n, height=d.height,
                           width=d.width, num_frames=d.frames, num_inference_steps=steps or d.steps,
                           guidance_scale=d.cfg if cfg is None else cfg, generator=gens, output_type="pt",
                           max_sequence_length=self.max_sequence_length).frames  # (n, F, 3, H, W) in [0, 1]
        return (frames.float().permute(0, 2, 1, 3, 4) * 2.0 - 1.0).clamp(-1.0, 1.0).cpu()


def load_wan_pipeline(spec: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                      frames: int | None = None, height: int | None = None, width: int | None = None,
                      negative_prompt: str = "") -> WanPipelineModel:
    """Load ``wan2.1:PATH`` / ``wan2.2:PATH`` (a local WanPipeline folder) for the CLI. ``dtype`` None: bf16 on CUDA,
    fp32 on the CPU; the size arguments override the pipeline's defaults."""
    from qc_compile.artifacts import sha256_file
    from qc_compile.models.diffusers_adapter import parse_model_spec
    from qc_compile.models.qc_ref_wan import SamplingDefaults

    parsed = parse_model_spec(spec)
    if parsed is None or parsed[0] not in ("wan2.1", "wan2.2"):
        raise UserError(f"--model {spec}: expected wan2.1:PATH or wan2.2:PATH (a local diffusers WanPipeline folder).")
    family, path = parsed
    folder, index = check_pipeline_folder(family, path)
    base = pipeline_call_defaults()
    size = {k: v for k, v in dict(frames=frames, height=height, width=width).items() if v is not None}
    base.update(size)
    check_size(folder, spec, base["frames"], base["height"], base["width"])
    sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json", spec) \
        if (folder / "scheduler" / "scheduler_config.json").is_file() else {}
    shift = sched_cfg.get("flow_shift", sched_cfg.get("shift"))
    defaults = SamplingDefaults(frames=base["frames"], height=base["height"], width=base["width"],
                                steps=base["steps"], cfg=base["cfg"], shift=None if shift is None else float(shift))
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    from diffusers import WanPipeline

    from diffusers.utils import logging as dlogging

    bars = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()  # "Loading pipeline components" bars for a local folder: noise on stderr
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype to dtype (a FutureWarning); both work
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                               torch_dtype=dtype)
    except (OSError, ValueError, EnvironmentError, RuntimeError, ImportError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise UserError(f"--model {spec}: diffusers could not load the WanPipeline in {folder}: {msg}") from None
    finally:
        if bars:
            dlogging.enable_progress_bar()
    pipe = pipe.to(device)
    for comp in (pipe.transformer, pipe.text_encoder, pipe.vae):
        comp.eval()
    files = {str(f.relative_to(folder)): sha256_file(f)
             for comp in WEIGHT_COMPONENTS for f in sorted((folder / comp).glob("*.safetensors"))}
    meta = {"files": files, "provenance": {}, "model_index": index, "scheduler": type(pipe.scheduler).__name__,
            "negative_prompt": negative_prompt}
    return WanPipelineModel(pipe, spec, family, str(folder), defaults, meta, negative_prompt=negative_prompt)

