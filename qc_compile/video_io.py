"""Video files in and out: mp4 (h264) for watching, PNG strips for lossless keeping.

Video tensors in the project are ``(C, T, H, W)`` float in ``[-1, 1]`` (or ``(B, C, T, H, W)``). qc-ref videos are
32x32 px, unwatchable at native size, so writers upscale by nearest neighbour and record the factor in the file
(mp4: the ``comment`` metadata tag ``qc-compile upscale=N``; PNG: the text chunks ``qc-compile-upscale`` and
``qc-compile-frames``). :func:`read_video` undoes the upscale with this rule, first that applies:

1. ``size=(H, W)`` given: block-average (area) down to that size (the file's size must be a multiple of it);
2. the file carries our upscale tag: block-average by that factor;
3. otherwise the frames are tested for nearest-neighbour blockiness at f in (8, 4, 2), largest first: f is taken
   when pixel differences inside f x f blocks are under 10 % of those across block edges (an h264 round trip
   keeps this far below; natural video is near 100 %);
4. else the frames are returned at their stored size.

PNG strips hold the frames side by side left to right; without our text chunk the frames are taken to be square
(the frame count is width / height). Nothing is ever pickled.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qc_compile.artifacts import atomic_path, atomic_write
from qc_compile.errors import UserError

MP4_CRF = 12  # near-lossless h264; the 8x nearest upscale also keeps chroma subsampling inside one source pixel
_COMMENT_RE = re.compile(r"comment\s*:\s*qc-compile upscale=(\d+)")


# ----------------------------------------------------------------------------------------------------------------
# Tensor <-> uint8 frames


def _single(video: torch.Tensor) -> torch.Tensor:
    """Accept (C, T, H, W) or (1, C, T, H, W); refuse a real batch (write one file per video)."""
    if video.dim() == 5 and video.shape[0] == 1:
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected one RGB video (3, T, H, W), got shape {tuple(video.shape)}")
    return video


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, clamped and rounded."""
    v = _single(video).detach().to("cpu", torch.float32)
    u8 = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(u8.permute(1, 2, 3, 0).numpy())


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32)).permute(3, 0, 1, 2).contiguous() / 127.5 - 1.0


def _upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    if factor < 1:
        raise ValueError(f"upscale must be >= 1, got {factor}")
    return np.ascontiguousarray(frames.repeat(factor, axis=1).repeat(factor, axis=2)) if factor > 1 else frames


# ----------------------------------------------------------------------------------------------------------------
# Writers


def _imageio_ffmpeg():
    """imageio-ffmpeg (a dependency; its 68 MB wheel carries ffmpeg), or a UserError that says how to get it."""
    try:
        import imageio_ffmpeg
    except ModuleNotFoundError:
        from qc_compile.errors import UserError

        raise UserError("writing or reading mp4 needs the imageio-ffmpeg package (a qc-compile dependency, which "
                        "brings its own ffmpeg), and it is not installed in this environment: `pip install "
                        "'imageio-ffmpeg>=0.5,<0.9'`. Nothing was written for this video.") from None
    return imageio_ffmpeg


def write_mp4(path: str | os.PathLike, video: torch.Tensor, fps: int = 8, upscale: int = 8) -> Path:
    """h264 (crf 12, yuv420p) mp4 of the nearest-upscaled frames, written atomically; returns the path."""
    imageio_ffmpeg = _imageio_ffmpeg()

    path = Path(path)
    frames = _upscale(to_uint8_frames(video), upscale)
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise ValueError(f"yuv420p needs even frame sizes; {H}x{W} after upscale {upscale} is not (use an even upscale)")
    with atomic_path(path, suffix=".mp4") as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (W, H), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None, macro_block_size=2,
            output_params=["-crf", str(MP4_CRF), "-preset", "medium", "-movflags", "+faststart",
                           "-metadata", f"comment=qc-compile upscale={upscale}"])
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()
    return path


def write_png_strip(path: str | os.PathLike, video: torch.Tensor, upscale: int = 4) -> Path:
    """All frames side by side (left to right) in one lossless PNG, written atomically; returns the path."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    frames = _upscale(to_uint8_frames(video), upscale)
    T, H, W, _ = frames.shape
    strip = np.ascontiguousarray(frames.transpose(1, 0, 2, 3).reshape(H, T * W, 3))
    info = PngInfo()
    info.add_text("qc-compile-upscale", str(upscale))
    info.add_text("qc-compile-frames", str(T))
    with atomic_write(path, "wb") as f:
        Image.fromarray(strip).save(f, format="PNG", pnginfo=info)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Readers


def read_video(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an .mp4 or a .png strip -> (3, T, H, W) float32 in [-1, 1], undoing our upscale (module doc rule)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: video file not found.")
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        frames, factor = _read_mp4(path)
    elif suffix == ".png":
        frames, factor = _read_png_strip(path)
    else:
        raise UserError(f"{path}: unsupported video file type {suffix!r}; qc-compile reads .mp4 and .png strips.")
    video = from_uint8_frames(frames)
    return _downscale(path, video, size, factor)


def _read_mp4(path: Path) -> tuple[np.ndarray, int | None]:
    imageio_ffmpeg = _imageio_ffmpeg()

    try:
        gen = imageio_ffmpeg.read_frames(str(path))
        meta = next(gen)
        W, H = meta["size"]
        frames = [np.frombuffer(b, dtype=np.uint8).reshape(H, W, 3) for b in gen]
    except (RuntimeError, OSError, StopIteration, ValueError, KeyError, IOError) as e:
        raise UserError(f"{path}: cannot be read as a video ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "the file is damaged or not an mp4.") from None
    if not frames:
        raise UserError(f"{path}: the video holds no frames; the file is damaged or empty.")
    expected = round(float(meta.get("duration") or 0) * float(meta.get("fps") or 0))
    if expected and len(frames) < expected:  # a cut-off file decodes "fine", minus its tail
        raise UserError(f"{path}: the container declares {expected} frames ({meta['duration']} s at {meta['fps']} "
                        f"fps) but only {len(frames)} decode; the file is truncated. Re-create it.")
    return np.stack(frames), _mp4_upscale_tag(path)


def _mp4_upscale_tag(path: Path) -> int | None:
    """Our ``comment`` tag, read from ffmpeg's description of the input (imageio-ffmpeg does not expose it)."""
    imageio_ffmpeg = _imageio_ffmpeg()

    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                          capture_output=True, text=True, errors="replace", timeout=60)
    m = _COMMENT_RE.search(proc.stderr)
    return int(m.group(1)) if m else None


def _read_png_strip(path: Path) -> tuple[np.ndarray, int | None]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot be read as a PNG image ({e}); the file is damaged or not a PNG.") from None
    H, W_total, _ = arr.shape
    frames_tag = text.get("qc-compile-frames")
    T = int(frames_tag) if frames_tag and frames_tag.isdigit() else (W_total // H if H else 0)
    if T < 1 or W_total % T:
        raise UserError(f"{path}: a {W_total}x{H} PNG cannot be split into frames; a strip without qc-compile's "
                        "frame-count tag must hold square frames side by side (width a multiple of height).")
    W = W_total // T
    frames = np.ascontiguousarray(arr.reshape(H, T, W, 3).transpose(1, 0, 2, 3))
    tag = text.get("qc-compile-upscale")
    return frames, int(tag) if tag and tag.isdigit() else None


def detect_upscale(video: torch.Tensor, factors: tuple[int, ...] = (8, 4, 2), ratio: float = 0.1) -> int:
    """Largest f whose f x f blocks look nearest-neighbour upscaled (see the module doc), else 1."""
    _, _, H, W = video.shape
    for f in factors:
        if H % f or W % f or H < 2 * f or W < 2 * f:
            continue
        dx = (video[..., :, 1:] - video[..., :, :-1]).abs()
        dy = (video[..., 1:, :] - video[..., :-1, :]).abs()
        edge_x = (torch.arange(1, W) % f == 0)
        edge_y = (torch.arange(1, H) % f == 0)
        inside = torch.cat([dx[..., ~edge_x].flatten(), dy[..., ~edge_y, :].flatten()]).mean()
        across = torch.cat([dx[..., edge_x].flatten(), dy[..., edge_y, :].flatten()]).mean()
        if across > 1e-3 and inside < ratio * across:
            return f
    return 1


def _downscale(path: Path, video: torch.Tensor, size: tuple[int, int] | None, factor: int | None) -> torch.Tensor:
    _, _, H, W = video.shape
    if size is not None:
        h, w = size
        if h < 1 or w < 1 or H % h or W % w:
            raise UserError(f"{path}: frames are {H}x{W}, not a whole multiple of the requested size {h}x{w}.")
        fh, fw = H // h, W // w
    else:
        f = factor if factor is not None else detect_upscale(video)
        if H % f or W % f:
            raise UserError(f"{path}: frames are {H}x{W} but the file says it was upscaled {f}x; it was modified.")
        fh = fw = f
    if fh == 1 and fw == 1:
        return video
    return F.avg_pool2d(video, kernel_size=(fh, fw))
