"""`qc-compile eval`: fidelity of a video to a reference, and the shapes caption checker.

Both inputs are read with :func:`qc_compile.video_io.read_video` (our upscale undone), so an mp4 written by
`generate` compares directly with another one or with a PNG strip.
"""

from __future__ import annotations

from pathlib import Path

import click

from qc_compile.errors import UserError

SCHEMA_VERSION = 1


def _fidelity(video_path: Path, video, ref_path: Path) -> tuple[dict, str]:
    from qc_compile.metrics.fidelity import compare_videos
    from qc_compile.video_io import read_video

    ref = read_video(ref_path)
    if ref.shape != video.shape:
        raise UserError(f"{video_path} holds a video of shape (C, T, H, W) = {tuple(video.shape)} but the reference "
                        f"{ref_path} holds {tuple(ref.shape)}; both need the same frame count and frame size.")
    result = compare_videos(video, ref)
    return result, f"psnr {result['psnr_db']:.1f} dB  ssim {result['ssim']:.3f}"


def _caption(video, caption: str) -> tuple[dict, str]:
    from qc_compile.data.shapes import parse_caption
    from qc_compile.metrics.caption_checker import check_video

    result = check_video(video, parse_caption(caption))
    return result.to_dict(), f"caption: {result.summary()}"


@click.command("eval")
@click.argument("video", type=click.Path(path_type=Path))
@click.option("--reference", "reference", type=click.Path(path_type=Path), default=None,
              help="Reference video (e.g. the FP output for the same seed and prompt): PSNR and SSIM against it.")
@click.option("--caption", "caption", default=None,
              help="Caption the video should show (shapes domain): colour, shape, direction and background are checked.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the full results (per-frame values, checker readings) to this JSON file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
def evaluate(video: Path, reference: Path | None, caption: str | None, json_out: Path | None,
             overwrite: bool) -> None:
    """Measure VIDEO (.mp4 or .png strip): fidelity to --reference and/or content against --caption."""
    if reference is None and caption is None:
        raise click.UsageError("give --reference REF (fidelity) and/or --caption TEXT (content check).")
    from qc_compile.artifacts import write_json_atomic
    from qc_compile.video_io import read_video

    if json_out is not None:
        from qc_compile.outputs import check_output_file

        check_output_file(json_out, "--json", overwrite)
    if caption is not None:  # fail on a bad caption before any decoding work
        from qc_compile.data.shapes import parse_caption
        parse_caption(caption)
    frames = read_video(video)
    report: dict = {"schema_version": SCHEMA_VERSION, "video": str(video), "video_shape": list(frames.shape)}
    parts = []
    if reference is not None:
        report["reference"] = str(reference)
        report["fidelity"], line = _fidelity(video, frames, reference)
        parts.append(line)
    if caption is not None:
        report["caption"], line = _caption(frames, caption)
        parts.append(line)
    click.echo("  | ".join(parts))
    if json_out is not None:
        write_json_atomic(json_out, report)
