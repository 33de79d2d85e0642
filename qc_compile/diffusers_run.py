"""Running a diffusers (Wan) model through qc-compile: load it (by name, from a WanPipeline folder or from a work
dir, with the work dir's files and digests checked), sample it with its own sampler while its transformer runs under
:func:`qc_compile.enable`, and record the run as a :class:`~qc_compile.runtime.result.RunResult`.

The library half of the ``run`` / ``generate`` / ``sweep`` commands for diffusers models (their flag checks and
messages are :mod:`qc_compile.commands.run_diffusers`); calibration uses it too, which is why it sits below the CLI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

CLI_MODELS = ("qc-ref-wan",)  # diffusers models the command line runs by name
PIPELINE_FAMILIES = ("wan2.1", "wan2.2")  # FAMILY:PATH folders it runs (a WanPipeline folder; cogvideox: Python only)
FPS = 8  # qc-ref-wan's frame rate for the written mp4s (as qc-ref's); a pipeline model has its own (.fps)


def is_pipeline(model: str) -> bool:
    """Whether ``model`` is a ``wan2.1:PATH`` / ``wan2.2:PATH`` WanPipeline folder (not qc-ref-wan)."""
    return model not in CLI_MODELS and model.split(":", 1)[0].lower() in PIPELINE_FAMILIES


def load(model: str, checkpoint: Path | None, device: str, dtype: torch.dtype | None = None,
         size: Mapping[str, int | None] | None = None, negative_prompt: str = ""):
    """The model: qc-ref-wan (``dtype`` None: fp32; its folder's own size) or a WanPipeline folder (``dtype`` None:
    bf16 on CUDA, fp32 on the CPU; ``size`` overrides the pipeline's default frames / height / width)."""
    from qc_compile.runtime.generation import resolve_device

    if is_pipeline(model):
        from qc_compile.models.diffusers_pipeline import load_wan_pipeline

        return load_wan_pipeline(model, device=resolve_device(device), dtype=dtype, negative_prompt=negative_prompt,
                                 **dict(size or {}))
    from qc_compile.models import load_model

    return load_model(model, checkpoint, device=resolve_device(device), dtype=dtype or torch.float32)


def check_captions(prompts: Sequence[str], model: str = "qc-ref-wan") -> None:
    """Every prompt through qc-ref-wan's caption tokenizer before any sampling (unknown words are a UserError); a
    WanPipeline folder's tokenizer takes any text (nothing to check)."""
    if model not in CLI_MODELS:
        return
    from qc_compile.models.caption_encoder import CaptionTokenizer
    from qc_compile.models.qc_ref_wan import TEXT_ENCODER_CONFIG

    CaptionTokenizer().encode(list(prompts), max_length=TEXT_ENCODER_CONFIG["max_length"])


def wan_unit_flops(transformer: torch.nn.Module, frames: int, height: int, width: int,
                   text_len: int) -> dict[str, dict[str, float]]:
    """Multiply-add FLOPs (x2) per sub-block of each Wan block unit, one batch element (the analogue of
    :func:`qc_compile.runtime.trace.unit_flops` for STDiT3, so ``flop_fraction`` counts sub-block caches)."""
    c = transformer.config
    pt, ph, pw = c.patch_size
    n = (frames // pt) * (height // ph) * (width // pw)
    C = c.num_attention_heads * c.attention_head_dim
    L = text_len
    per = {"attn": 2 * n * C * 3 * C + 2 * n * C * C + 4 * n * n * C,
           "cross": 2 * n * C * C + 4 * L * C * C + 2 * n * C * C + 4 * n * L * C,
           "mlp": 4 * n * C * c.ffn_dim}
    return {f"block_{i}": dict(per) for i in range(c.num_layers)}


def text_length(loaded) -> int:
    """Text tokens the transformer's cross-attention reads: the pipeline's padded T5 length, or qc-ref-wan's."""
    from qc_compile.models.qc_ref_wan import TEXT_ENCODER_CONFIG

    return int(getattr(loaded, "text_len", TEXT_ENCODER_CONFIG["max_length"]))


def transformer_size(loaded) -> tuple[int, int, int]:
    """(frames, height, width) of the transformer's input: latent for a pipeline, pixels for qc-ref-wan."""
    if hasattr(loaded, "latent_size"):
        return loaded.latent_size()
    d = loaded.defaults
    return d.frames, d.height, d.width


def model_record(loaded) -> dict:
    """What trace.json says about the weights: the folder, its training provenance and the files' sha256."""
    prov = loaded.meta.get("provenance") or {}
    return {"name": loaded.name, "folder": loaded.checkpoint, "family": loaded.family,
            "train_steps": prov.get("train_steps"), "train_commit": prov.get("train_commit"),
            "files_sha256": dict(loaded.meta.get("files") or {}), "sampling": loaded.defaults.to_dict()}


@torch.no_grad()
def sample_under_policy(loaded, prompts: Sequence[str], *, policy: str | None = None,
                        overrides: Mapping[str, Any] | None = None, seed: int = 0, steps: int | None = None,
                        cfg: float | None = None, reference: bool = False, progress: bool = False,
                        work: Path | None = None, executor: str = "torch"):
    """Videos of ``prompts`` (prompt k: noise seed ``seed + k``) from the model's own sampler with its transformer
    enabled under ``policy`` (a name, default none), as a RunResult; ``reference`` adds the plain sampler's videos
    (no policy, nothing enabled) of the same prompts and seeds. ``work``: the work dir ``loaded`` came from
    (:func:`load_work`): its plan's policy settings, and on the torch executor its quantized linears
    (:func:`qc_compile.diffusers_quant.apply_plan`); ``executor`` onnxruntime / tensorrt: the work dir's graphs."""
    import qc_compile
    from qc_compile.runtime.result import RunResult

    prompts = list(prompts)
    check_captions(prompts, loaded.name)
    d = loaded.defaults
    steps = steps or d.steps
    cfg = d.cfg if cfg is None else cfg
    plan_record = plan_summary(work, executor) if work is not None else None
    name = policy or (plan_record or {}).get("policy") or "none"
    has_plan = plan_record is not None and plan_record["file"] is not None
    session = qc_compile.enable(loaded.transformer, work=work if has_plan or executor != "torch" else None,
                                policy=name, overrides=overrides, seed=seed, executor=executor)
    try:
        start = time.perf_counter()
        videos = loaded.sample(prompts, seed=seed, steps=steps, cfg=cfg, progress=progress)
        seconds = time.perf_counter() - start
        fraction = session.compute_fraction
        session_trace = session.trace()
    finally:
        qc_compile.disable(loaded.transformer)
    pol = session.policy
    desc = dict(pol.describe() if hasattr(pol, "describe") else {"name": name}, spec=name,
                overrides=dict(overrides or {}))
    device = str(loaded.device)
    res = RunResult(
        prompts=prompts, videos=videos, policy=name, policy_config=desc, seed=seed,
        settings={"model": loaded.name, "steps": steps, "cfg": cfg, "seed": seed,
                  "seeds": [seed + k for k in range(len(prompts))], "frames": d.frames, "height": d.height,
                  "width": d.width, "fps": getattr(loaded, "fps", FPS), "shift": d.shift, "device": device,
                  "dtype": str(loaded.transformer.patch_embedding.weight.dtype).replace("torch.", ""),
                  "work_dir": None if work is None else str(work), "plan": has_plan,
                  "quantized": bool(has_plan and plan_record["quantized"]),
                  "driver": session_trace["settings"]["driver"]},
        unit_names=tuple(session.unit_names), steps=list(session.steps),
        costs=wan_unit_flops(loaded.transformer, *transformer_size(loaded), text_length(loaded)),
        seconds=seconds, executor=executor, frame_upscale=getattr(loaded, "frame_upscale", 8),
        strip_upscale=getattr(loaded, "strip_upscale", 4))
    if getattr(loaded, "negative_prompt", None) is not None:
        res.settings["negative_prompt"] = loaded.negative_prompt
    res.extra["model"] = model_record(loaded)
    if plan_record is not None:
        res.extra["plan"] = plan_record
    res.extra["session"] = {"compute_fraction": fraction, "steps_recorded": len(session_trace["steps"]),
                            "runs": session.runs}
    if abs(res.compute_fraction - fraction) > 1e-12:  # the trace is the session's records; they must agree
        raise RuntimeError(f"compute fraction {res.compute_fraction} of the trace != the session's {fraction}")
    if reference:
        start = time.perf_counter()
        res.fp_videos = loaded.sample(prompts, seed=seed, steps=steps, cfg=cfg, progress=progress)
        res.fp_seconds = time.perf_counter() - start
    return res


def is_pipeline_work(info) -> bool:
    """Whether a diffusers work dir was exported from a whole WanPipeline folder (``wan2.1:PATH`` with
    model_index.json), whose own sampler (text encoder, tokenizer, VAE, scheduler) can run it."""
    return info.name not in CLI_MODELS and is_pipeline(info.name) and \
        (Path(info.data["weights"]["path"]) / "model_index.json").is_file()


def load_work(work: Path, info, device: str, negative_prompt: str = ""):
    """The work dir's model (files' sha256 and state digest checked against model.json) and its plan, validated
    against model.json (None when the work dir has no plan yet). qc-ref-wan through ``load_model_for``; a WanPipeline
    work dir through :func:`load_pipeline_work`."""
    from qc_compile.plan import load_plan
    from qc_compile.runtime.generation import resolve_device
    from qc_compile.workdir import WorkDir, load_model_for

    wd = WorkDir(work)
    plan = load_plan(wd.plan_json, model_info=info) if wd.plan_json.exists() else None  # before the weights load
    if is_pipeline_work(info):
        return load_pipeline_work(info, resolve_device(device), negative_prompt), plan
    return load_model_for(info, device=resolve_device(device)), plan


def load_pipeline_work(info, device: str, negative_prompt: str = ""):
    """The WanPipeline folder a ``wan2.1:PATH`` work dir was exported from, at the export's video size, float32 (the
    export's weights) and T5 features padded to the export's text length (the graphs' fixed length), its transformer
    files' sha256 and state digest checked against model.json before it is trusted."""
    from qc_compile.artifacts import sha256_file
    from qc_compile.errors import ArtifactError
    from qc_compile.models.diffusers_pipeline import load_wan_pipeline
    from qc_compile.workdir import state_digest

    w = info.data["weights"]
    folder = Path(w["path"])
    for rel, sha in w["files"].items():
        f = folder / rel
        if not f.is_file() or sha256_file(f) != sha:
            raise ArtifactError(f"{info.path}: weight file {f} is missing or changed since export (sha256 differs); "
                                "re-export.")
    frames, height, width = info.video_size
    loaded = load_wan_pipeline(info.name, device=device, dtype=torch.float32, frames=frames, height=height,
                               width=width, negative_prompt=negative_prompt)
    if state_digest(loaded.transformer) != w["state_sha256"]:
        raise ArtifactError(f"{info.path}: the weights loaded now ({folder}) are not the ones exported (state digest "
                            "differs); re-run qc-compile export.")
    loaded.max_sequence_length = int(info.text_length)
    return loaded


def plan_summary(work: Path, executor: str = "torch") -> dict:
    """What trace.json records of the work dir's plan: its sha256, formats, variants and schedule, and how it ran."""
    from collections import Counter

    from qc_compile.artifacts import sha256_file
    from qc_compile.diffusers_quant import plan_is_quantized
    from qc_compile.plan import load_plan
    from qc_compile.runtime.policies import plan_policy_name
    from qc_compile.workdir import WorkDir

    wd = WorkDir(work)
    if not wd.plan_json.is_file():
        return {"file": None, "quantized": False, "policy": None}
    plan = load_plan(wd.plan_json)
    formats = Counter(f"{e.weight}/{e.activation}" for e in plan.linears.values())
    quantized = plan_is_quantized(plan)
    how = ("torch executor: the quantized linears on qc-compile's FastLinear kernels (FP8: per-token dynamic "
           "activation scales), the others the model's own modules" if executor == "torch"
           else f"{executor} executor: the work dir's graphs")
    return {"file": "plan.json", "sha256": sha256_file(wd.plan_json), "quantized": quantized,
            "formats": dict(sorted(formats.items())), "variants": plan.variant_names, "schedule": list(plan.schedule),
            "policy": plan_policy_name(plan), "command": (plan.provenance or {}).get("command"), "ran_as": how}
