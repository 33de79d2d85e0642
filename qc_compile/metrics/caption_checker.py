"""Read colour, shape, motion direction and background back from a shapes video and score them against a caption.

This is what makes `qc-ref`'s quality measurable beyond fidelity (DESIGN.md §7): a quantized or cached engine
may stay close in PSNR yet draw the wrong colour or move the wrong way. The reading is analytic:

1. background = per-channel median of the outermost pixel ring over all frames; its name is the nearest
   vocabulary background;
2. foreground colour: median of the pixels farther than :data:`FG_DISTANCE` (RGB, [0, 1]) from the background,
   refined once on the pixels that the coverage map (step 3) says are solid; its name is the nearest vocabulary
   colour;
3. coverage alpha in [0, 1] per pixel = projection of (pixel - background) on (foreground - background), so that
   anti-aliased edges count fractionally; alpha < :data:`ALPHA_FLOOR` is zeroed (noise);
4. shape, from two numbers, each the median over frames whose shape does not touch the border (all frames with a
   shape if none is clear of it), measured inside the shape's window (``_isolate``) so that noise elsewhere does
   not count: the vertical asymmetry (``_asymmetry``: 1/6 for the upward triangle, 0 for the others; rendered
   0.13-0.17 vs |a| < 0.01, and > 0.08 even after two 3x3 blurs) says "triangle" above
   :data:`TRIANGLE_ASYMMETRY`; otherwise the fill ratio area / (soft width x soft height), where the soft width
   sums each column's maximum alpha (circle pi/4 ~ 0.785, square 1; rendered 0.78-0.81 and 1.00-1.01), says
   "square" from :data:`SQUARE_FILL` up and "circle" below;
5. direction from a least-squares line through the alpha-weighted centroids over frames: the axis with the larger
   velocity and its sign ("up" = row index decreasing); "static" if the speed is below
   :data:`STATIC_SPEED` px/frame at 32 px (scaled with the frame size).

Videos are (3, T, H, W) in [-1, 1] on any device; the reading runs in float64 on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from qc_compile.data.shapes import BACKGROUNDS, COLORS, SHAPES, Caption, as_caption

FG_DISTANCE = 0.3            # RGB distance from the background that surely is foreground (colours are >= 0.6 away)
ALPHA_FLOOR = 0.15           # coverage below this is noise
SOLID_ALPHA = 0.75           # coverage above this is the shape's interior (its colour sample)
MIN_AREA_32 = 4.0            # px of coverage (at 32 px) for a frame to count as showing the shape
STATIC_SPEED = 0.2           # px/frame at 32 px below which the shape is called static (data: >= 0.6)
TRIANGLE_ASYMMETRY = 0.06   # see the module doc, step 4
SQUARE_FILL = 0.90
NONE = "none"


@dataclass
class CheckResult:
    """What the checker read from one video, compared with the caption it was meant to show."""

    expected: Caption
    color: str
    shape: str
    direction: str
    background: str
    color_ok: bool
    shape_ok: bool
    direction_ok: bool
    background_ok: bool
    # Confidence numbers: colours are RGB in [0, 1]; distances are RGB Euclidean.
    foreground_rgb: tuple[float, float, float] | None
    background_rgb: tuple[float, float, float]
    color_distance: float | None      # foreground to its nearest vocabulary colour
    color_margin: float | None        # second-nearest minus nearest colour distance
    background_distance: float        # background estimate to its nearest vocabulary background
    fill_ratio: float | None
    asymmetry: float | None
    velocity: tuple[float, float] | None  # (vx, vy) in px/frame at the video's resolution; +y is down
    speed: float | None
    frames_with_shape: int

    @property
    def all_ok(self) -> bool:
        return self.color_ok and self.shape_ok and self.direction_ok and self.background_ok

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["expected"] = self.expected.text()
        d["all_ok"] = self.all_ok
        return d

    def summary(self) -> str:
        """e.g. ``color ok (red) shape ok (circle) direction FAIL (left, want right) background ok (black)``."""
        parts = []
        for attr in ("color", "shape", "direction", "background"):
            got, want = getattr(self, attr), getattr(self.expected, attr)
            parts.append(f"{attr} ok ({got})" if getattr(self, f"{attr}_ok") else f"{attr} FAIL ({got}, want {want})")
        return " ".join(parts)


def _nearest(rgb: torch.Tensor, table: dict[str, tuple[float, float, float]]) -> tuple[str, float, float]:
    """(name, distance, margin to the runner-up) of the table entry nearest to ``rgb``."""
    ref = torch.tensor(list(table.values()), dtype=torch.float64)
    d = (ref - rgb).norm(dim=1)
    order = torch.argsort(d)
    margin = float(d[order[1]] - d[order[0]]) if len(order) > 1 else float("inf")
    return list(table)[int(order[0])], float(d[order[0]]), margin


def _border_median(rgb: torch.Tensor) -> torch.Tensor:
    """Per-channel median of the outermost pixel ring of all frames; rgb is (T, H, W, 3)."""
    ring = torch.cat([rgb[:, 0], rgb[:, -1], rgb[:, 1:-1, 0], rgb[:, 1:-1, -1]], dim=1)
    return ring.reshape(-1, 3).median(dim=0).values


def _coverage(rgb: torch.Tensor, bg: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    axis = fg - bg
    alpha = ((rgb - bg) @ axis) / axis.dot(axis).clamp(min=1e-12)
    alpha = alpha.clamp(0, 1)
    return torch.where(alpha < ALPHA_FLOOR, torch.zeros_like(alpha), alpha)


def _foreground_colour(rgb: torch.Tensor, bg: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(foreground RGB, coverage (T, H, W)), or (None, None) when nothing stands out from the background."""
    far = (rgb - bg).pow(2).sum(dim=-1) > FG_DISTANCE**2
    if int(far.sum()) < 2:
        return None, None
    fg = rgb[far].median(dim=0).values
    alpha = _coverage(rgb, bg, fg)
    solid = alpha > SOLID_ALPHA
    if int(solid.sum()) >= 2:
        fg = rgb[solid].median(dim=0).values
        alpha = _coverage(rgb, bg, fg)
    return fg, alpha


def _isolate(alpha: torch.Tensor) -> torch.Tensor:
    """Zero the coverage outside each frame's shape window, so that specks of noise elsewhere do not count.

    The core is the 3x3 morphological opening of alpha > 0.5 (it removes isolated noise pixels; every shape's
    interior survives it). The window is the bounding box of the alpha > 0.5 pixels within 3 px of the core (which
    recovers a triangle's thin apex), grown by one pixel for the anti-aliased rim.
    """
    hard = (alpha > 0.5).to(alpha.dtype)[:, None]
    opened = F.max_pool2d(-F.max_pool2d(-hard, 3, 1, 1), 3, 1, 1)
    near = F.max_pool2d(opened, 7, 1, 3)
    core = torch.where(opened.flatten(1).any(dim=1)[:, None, None, None], hard * near, hard)[:, 0] > 0.5
    rows, cols = core.any(dim=2), core.any(dim=1)  # (T, H), (T, W)
    grow = lambda m: F.max_pool1d(m[:, None].to(alpha.dtype), 3, 1, 1)[:, 0] > 0.5  # noqa: E731
    window = grow(rows)[:, :, None] & grow(cols)[:, None, :]
    return alpha * window


def _asymmetry(alpha: torch.Tensor) -> torch.Tensor:
    """Per frame (mass centroid row - row-occupancy centre) / soft height: 1/6 for an upward triangle, 0 for
    circles and squares. Unlike the fill ratio it survives blur, which keeps triangles apart from circles."""
    H = alpha.shape[1]
    ys = torch.arange(H, dtype=alpha.dtype) + 0.5
    mass = alpha.sum(dim=2)           # (T, H)
    occ = alpha.amax(dim=2)           # (T, H)
    c_mass = (mass * ys).sum(1) / mass.sum(1).clamp(min=1e-9)
    c_occ = (occ * ys).sum(1) / occ.sum(1).clamp(min=1e-9)
    return (c_mass - c_occ) / occ.sum(1).clamp(min=1e-9)


def _fill_ratios(alpha: torch.Tensor) -> torch.Tensor:
    """Per frame area / (soft width * soft height)."""
    area = alpha.sum(dim=(1, 2))
    width = alpha.amax(dim=1).sum(dim=1)
    height = alpha.amax(dim=2).sum(dim=1)
    return area / (width * height).clamp(min=1e-9)


def _classify_shape(fill: float, asymmetry: float) -> str:
    if asymmetry >= TRIANGLE_ASYMMETRY:
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def _velocity(alpha: torch.Tensor, frames: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of the alpha-weighted centroid over the given frame indices, px/frame."""
    T, H, W = alpha.shape
    a = alpha[frames]
    area = a.sum(dim=(1, 2))
    ys = torch.arange(H, dtype=torch.float64) + 0.5
    xs = torch.arange(W, dtype=torch.float64) + 0.5
    cx = (a.sum(dim=1) * xs).sum(dim=1) / area
    cy = (a.sum(dim=2) * ys).sum(dim=1) / area
    t = frames.to(torch.float64)
    tc = t - t.mean()
    denom = tc.dot(tc)
    return float(tc.dot(cx - cx.mean()) / denom), float(tc.dot(cy - cy.mean()) / denom)


def _direction(vx: float, vy: float, scale: float) -> str:
    if max(abs(vx), abs(vy)) < STATIC_SPEED * scale:
        return "static"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded: the checker's tensors are tiny, and intra-op threads contending for a busy CPU
    made it up to 10x slower (measured on 2 cores under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def check_video(video: torch.Tensor, caption: str | Caption) -> CheckResult:
    """Read one video (3, T, H, W) in [-1, 1] and compare it with ``caption``."""
    cap = as_caption(caption)
    with _one_thread():
        return _check(video, cap)


def _check(video: torch.Tensor, cap: Caption) -> CheckResult:
    if video.dim() == 5 and video.shape[0] == 1:
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected one RGB video (3, T, H, W), got shape {tuple(video.shape)}")
    rgb = ((video.detach().to("cpu", torch.float64).clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).contiguous()
    T, H, W, _ = rgb.shape
    scale = min(H, W) / 32.0

    bg = _border_median(rgb)
    background, bg_dist, _ = _nearest(bg, BACKGROUNDS)
    fg, alpha = _foreground_colour(rgb, bg)
    if alpha is not None:
        alpha = _isolate(alpha)
    color = shape = direction = NONE
    color_dist = color_margin = fill = asym = speed = None
    velocity = None
    n_frames = 0
    if fg is not None:
        color, color_dist, color_margin = _nearest(fg, COLORS)
        present = alpha.sum(dim=(1, 2)) >= MIN_AREA_32 * scale**2
        n_frames = int(present.sum())
        if n_frames >= 1:
            ring = torch.ones(H, W, dtype=torch.bool)
            ring[1:-1, 1:-1] = False
            clear = present & (alpha[:, ring].amax(dim=1) < 0.5)
            use = clear if bool(clear.any()) else present
            fill = float(_fill_ratios(alpha[use]).median())
            asym = float(_asymmetry(alpha[use]).median())
            shape = _classify_shape(fill, asym)
        if n_frames >= 2:
            vx, vy = _velocity(alpha, torch.nonzero(present).flatten())
            velocity, speed = (vx, vy), (vx * vx + vy * vy) ** 0.5
            direction = _direction(vx, vy, scale)
    return CheckResult(
        expected=cap, color=color, shape=shape, direction=direction, background=background,
        color_ok=color == cap.color, shape_ok=shape == cap.shape, direction_ok=direction == cap.direction,
        background_ok=background == cap.background,
        foreground_rgb=tuple(float(c) for c in fg) if fg is not None else None,
        background_rgb=tuple(float(c) for c in bg), color_distance=color_dist, color_margin=color_margin,
        background_distance=bg_dist, fill_ratio=fill, velocity=velocity, speed=speed, frames_with_shape=n_frames, asymmetry=asym,
    )


ATTRIBUTES = ("color", "shape", "direction", "background")


def summarize(results: Sequence[CheckResult]) -> dict:
    """Accuracy per attribute and for all four together, over ``results``."""
    n = len(results)
    out: dict = {"n": n}
    for attr in ATTRIBUTES:
        out[attr] = sum(getattr(r, f"{attr}_ok") for r in results) / n if n else float("nan")
    out["all"] = sum(r.all_ok for r in results) / n if n else float("nan")
    return out


def score_videos(videos: torch.Tensor | Sequence[torch.Tensor], captions: Sequence[str | Caption]) -> dict:
    """Check each video against its caption: ``summarize`` of the results plus the results themselves."""
    if len(videos) != len(captions):
        raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
    results = [check_video(v, c) for v, c in zip(videos, captions)]
    out = summarize(results)
    out["results"] = results
    return out


__all__ = ["CheckResult", "check_video", "score_videos", "summarize", "SHAPES"]
