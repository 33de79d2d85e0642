"""What both calibration methods start from: the work dir's model, the calibration prompts (checked against the
caption vocabulary) and the sampling settings at the exported geometry."""

from __future__ import annotations

from pathlib import Path

from qc_compile.errors import UserError


def load_for_calibration(work_dir: Path, prompts_file: Path | None, num_prompts: int, *, steps, cfg, seed,
                         hint: str, text_encoder: Path | None = None, caption_cache: Path | None = None,
                         device: str = "cpu"):
    """Shared by both calibration methods: the work dir's model, the calibration prompts (each checked against the
    caption vocabulary) and the sampling settings at the exported geometry. ``text_encoder``: opensora-v1.2's T5
    folder (prompts go through Open-Sora's conventions and T5, optionally through a caption cache)."""
    from qc_compile.calib.ranges import default_prompts
    from qc_compile.prompts import read_prompt_file
    from qc_compile.models.caption_encoder import CaptionTokenizer
    from qc_compile.runtime.generation import GenerationSettings
    from qc_compile.workdir import WorkDir, load_model_for, read_model_info

    from qc_compile.models.opensora_parts import check_part_paths

    check_part_paths(text_encoder=text_encoder, caption_cache=caption_cache)  # before any load
    work = WorkDir(work_dir)
    info = read_model_info(work)
    prompts = read_prompt_file(prompts_file) if prompts_file else default_prompts(info.name, num_prompts)
    if not prompts:
        raise UserError(f"model {info.name} has no built-in calibration prompts; pass --prompts FILE.")
    from qc_compile.runtime.generation import resolve_device

    loaded = load_model_for(info, device=resolve_device(device))
    if loaded.text_encoder is None and text_encoder is None:
        raise UserError(f"model {info.name} takes T5 caption features: pass --text-encoder with the folder of its T5 "
                        f"(T5 v1.1 XXL) to calibrate from text prompts; {hint}")
    if text_encoder is not None or caption_cache is not None:
        from qc_compile.models.opensora_parts import attach_opensora_parts

        attach_opensora_parts(loaded, text_encoder=text_encoder, caption_cache=caption_cache, need_vae=False)
    if loaded.text_encoder is not None:
        try:
            CaptionTokenizer().encode(prompts, max_length=loaded.config.model_max_length)
        except UserError as e:
            raise UserError(f"--prompts {prompts_file or '(default)'}: {e}") from None
    frames, height, width = info.video_size
    settings = GenerationSettings.defaults(loaded, steps=steps, cfg=cfg, seed=seed, frames=frames, height=height,
                                           width=width)
    return work, info, loaded, prompts, settings
