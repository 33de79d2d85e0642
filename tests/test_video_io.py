"""Video IO: uint8 conversion, mp4 and PNG strip round trips with the upscale undone, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qc_compile.data.shapes import Caption, render
from qc_compile.errors import UserError
from qc_compile.metrics.caption_checker import check_video
from qc_compile.metrics.fidelity import psnr
from qc_compile.video_io import (detect_upscale, from_uint8_frames, read_video, to_uint8_frames, write_mp4,
                                 write_png_strip)

CAP = Caption("magenta", "triangle", "down", "gray")


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return render([CAP], seed=4)[0]


def test_uint8_round_trip(video: torch.Tensor) -> None:
    frames = to_uint8_frames(video)
    assert frames.shape == (16, 32, 32, 3) and frames.dtype == np.uint8
    back = from_uint8_frames(frames)
    assert back.shape == video.shape and (back - video).abs().max() <= 1 / 255 + 1e-6
    assert to_uint8_frames(torch.full((3, 1, 2, 2), 5.0)).max() == 255  # clamped


def test_png_strip_round_trip_is_lossless(tmp_path: Path, video: torch.Tensor) -> None:
    p = write_png_strip(tmp_path / "v.png", video, upscale=4)
    from PIL import Image
    assert Image.open(p).size == (16 * 32 * 4, 32 * 4)
    back = read_video(p)
    torch.testing.assert_close(back, from_uint8_frames(to_uint8_frames(video)), atol=1e-6, rtol=0)  # block-mean rounding
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_png_strip_without_tags_assumes_square_frames(tmp_path: Path, video: torch.Tensor) -> None:
    from PIL import Image
    frames = to_uint8_frames(video).repeat(2, axis=1).repeat(2, axis=2)  # 2x nearest upscale, no tags
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(tmp_path / "plain.png")
    back = read_video(tmp_path / "plain.png")
    assert back.shape == (3, 16, 32, 32)
    torch.testing.assert_close(back, from_uint8_frames(to_uint8_frames(video)), atol=1e-6, rtol=0)


def test_mp4_round_trip_close_and_checker_still_right(tmp_path: Path, video: torch.Tensor) -> None:
    p = write_mp4(tmp_path / "v.mp4", video, fps=8, upscale=8)
    back = read_video(p)
    assert back.shape == video.shape
    assert psnr(back, video) > 30
    assert check_video(back, CAP).all_ok


def test_mp4_without_tag_uses_blockiness(tmp_path: Path, video: torch.Tensor) -> None:
    import imageio_ffmpeg
    frames = to_uint8_frames(video).repeat(4, axis=1).repeat(4, axis=2)
    w = imageio_ffmpeg.write_frames(str(tmp_path / "plain.mp4"), (128, 128), fps=8, quality=None,
                                    output_params=["-crf", "18"])
    w.send(None)
    for f in frames:
        w.send(np.ascontiguousarray(f))
    w.close()
    back = read_video(tmp_path / "plain.mp4")
    assert back.shape == video.shape and psnr(back, video) > 30
    assert read_video(tmp_path / "plain.mp4", size=(64, 64)).shape == (3, 16, 64, 64)


def test_detect_upscale() -> None:
    v = render([CAP], seed=1)[0]
    assert detect_upscale(v.repeat_interleave(8, -1).repeat_interleave(8, -2)) == 8
    assert detect_upscale(v.repeat_interleave(2, -1).repeat_interleave(2, -2)) == 2
    g = torch.Generator().manual_seed(0)
    assert detect_upscale(torch.rand(3, 2, 64, 64, generator=g)) == 1


def test_missing_and_garbled_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(UserError, match="bad.mp4"):
        read_video(bad)
    badpng = tmp_path / "bad.png"
    badpng.write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="bad.png"):
        read_video(badpng)
    other = tmp_path / "v.avi"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported"):
        read_video(other)


def test_missing_imageio_ffmpeg_is_a_user_error(tmp_path: Path, video: torch.Tensor, monkeypatch) -> None:
    """An environment without imageio-ffmpeg (the GPU image here) gets one paragraph, and nothing is written."""
    import builtins

    from qc_compile.errors import UserError
    from qc_compile.video_io import write_mp4

    real_import = builtins.__import__

    def no_ffmpeg(name, *a, **kw):
        if name == "imageio_ffmpeg":
            raise ModuleNotFoundError("No module named 'imageio_ffmpeg'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ffmpeg)
    with pytest.raises(UserError, match="imageio-ffmpeg"):
        write_mp4(tmp_path / "a.mp4", video)
    assert not list(tmp_path.iterdir())
