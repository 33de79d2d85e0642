"""The procedural "shapes" video domain that `qc-ref` is trained on and checked against.

One coloured shape (circle, square or upward triangle) slides in a straight line over a flat background. Every
video is described exactly by a :class:`Caption` ("a red circle moving left on a black background"), so a
generated video's content can be read back analytically (``qc_compile.metrics.caption_checker``).

Conventions (Open-Sora's): videos are float32 ``(B, 3, T, H, W)`` in ``[-1, 1]`` (pixel * 2 - 1). Image rows grow
downwards, so "up" means the row index decreases. Rendering is vectorised torch on any device; all random draws
are made on the generator's device (CPU for an ``int`` seed) and then moved, so a seed gives the same video on CPU
and CUDA up to float rounding.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from qc_compile.errors import UserError
from qc_compile.prompts import excerpt

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary. The order of each tuple is part of the tokenizer's vocabulary (caption_encoder.py): never reorder.

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.10, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "magenta": (0.95, 0.15, 0.90),
    "cyan": (0.10, 0.90, 0.95),
    "white": (0.97, 0.97, 0.97),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "navy": (0.0, 0.0, 0.35),
}
# (colour, background) pairs that are never sampled and never accepted: the shape would share the background's
# hue and differ from it in brightness only (blue on navy), which is neither a fair task for the model nor a
# clear reading for the checker. Every other pair is >= 0.6 apart in RGB (tests/test_shapes.py checks it).
FORBIDDEN_PAIRS: frozenset[tuple[str, str]] = frozenset({("blue", "navy")})
TEMPLATE_WORDS: tuple[str, ...] = ("a", "moving", "on", "background")
TEMPLATE = "a <colour> <shape> moving <direction> on a <background> background"

# Unit direction vectors (dx, dy) in image coordinates (y = row index, growing downwards).
DIRECTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
}

# Geometry at the 32-px reference resolution; everything scales with min(H, W) / 32.
RADIUS_RANGE = (4.0, 7.0)        # circle radius; square half-side and triangle circumradius derive from it
SPEED_RANGE = (0.6, 1.3)         # px/frame, capped so that the whole path stays in frame
SQUARE_HALF = 0.9                # square half-side / radius
TRIANGLE_R = 1.25                # triangle circumradius / radius (an equilateral triangle pointing up)
MARGIN = 1.0                     # px kept free between the shape's extent and the frame edge (clean border)
COLOR_JITTER = 0.03              # uniform +- per channel on the shape colour
BACKGROUND_JITTER = 0.015        # uniform +- per channel on the background colour


def vocabulary_text() -> str:
    """The vocabulary as one line, for error messages."""
    return (f"colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; directions: {', '.join(DIRECTIONS)}; "
            f"backgrounds: {', '.join(BACKGROUNDS)}; other words: {', '.join(TEMPLATE_WORDS)}")


def all_words() -> tuple[str, ...]:
    """Every word a caption may contain, in the tokenizer's fixed order."""
    return TEMPLATE_WORDS + tuple(COLORS) + SHAPES + DIRECTIONS + tuple(BACKGROUNDS)


def split_words(text: str) -> list[str]:
    """Normalise a caption into words: case-insensitive, any whitespace, one optional trailing period."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    return text.split()


def check_known_words(text: str, words: Sequence[str]) -> None:
    """Raise a UserError naming the first word outside the vocabulary (shared with the caption tokenizer)."""
    known = set(all_words())
    for w in words:
        if w not in known:
            raise UserError(f"caption {excerpt(text)}: unknown word {excerpt(w, 40)}. Captions use only these words ({vocabulary_text()}), "
                            f"in the form '{TEMPLATE}'.")


# ----------------------------------------------------------------------------------------------------------------
# Captions


@dataclass(frozen=True)
class Caption:
    """One video's full description; ``text()`` is the exact training caption."""

    color: str
    shape: str
    direction: str
    background: str

    def text(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} on a {self.background} background"

    def __str__(self) -> str:
        return self.text()


_SLOTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", tuple(COLORS)), ("shape", SHAPES), ("direction", DIRECTIONS), ("background", tuple(BACKGROUNDS)),
)


def parse_caption(text: str) -> Caption:
    """Parse a template caption; every deviation is a UserError that says what was expected."""
    words = split_words(text)
    check_known_words(text, words)
    for slot, options in _SLOTS:
        found = [w for w in words if w in options]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({', '.join(found)})"
            raise UserError(f"caption {excerpt(text)} has {what} {slot} word; expected exactly one of {', '.join(options)}, "
                            f"in the form '{TEMPLATE}'.")
    m = re.fullmatch(r"a (\S+) (\S+) moving (\S+) on a (\S+) background", " ".join(words))
    fields = m.groups() if m else ()
    if not m or [f in opts for f, (_, opts) in zip(fields, _SLOTS)] != [True] * 4:
        raise UserError(f"caption {excerpt(text)} does not follow the template '{TEMPLATE}' (the words are right but their "
                        f"order or the filler words are not), e.g. '{Caption('red', 'circle', 'left', 'black').text()}'.")
    cap = Caption(*fields)
    if (cap.color, cap.background) in FORBIDDEN_PAIRS:
        raise UserError(f"caption {excerpt(text)}: a {cap.color} shape on a {cap.background} background is not part of the "
                        f"domain (too little contrast); forbidden colour/background pairs: {_forbidden_text()}.")
    return cap


def _forbidden_text() -> str:
    return ", ".join(f"{c} on {b}" for c, b in sorted(FORBIDDEN_PAIRS))


def as_caption(c: Caption | str) -> Caption:
    return c if isinstance(c, Caption) else parse_caption(c)


def all_captions() -> list[Caption]:
    """Every allowed caption, in a fixed order (colour, shape, direction, background nested loops)."""
    return [Caption(c, s, d, b) for c, s, d, b in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)
            if (c, b) not in FORBIDDEN_PAIRS]


def _make_generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def sample_captions(n: int, seed: int | torch.Generator) -> list[Caption]:
    """``n`` captions drawn uniformly (with replacement) from :func:`all_captions`; deterministic for a seed."""
    gen = _make_generator(seed)
    pool = all_captions()
    idx = torch.randint(len(pool), (n,), generator=gen, device=gen.device).tolist()
    return [pool[i] for i in idx]


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _shape_extents(shape_id: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample extents from the shape centre: (half-width, extent above, extent below), in px."""
    R = TRIANGLE_R * r
    half_w = torch.stack([r, SQUARE_HALF * r, R * math.sqrt(3) / 2])
    above = torch.stack([r, SQUARE_HALF * r, R])
    below = torch.stack([r, SQUARE_HALF * r, R / 2])
    pick = lambda t: t.gather(0, shape_id[None]).squeeze(0)  # noqa: E731
    return pick(half_w), pick(above), pick(below)


def _axis_path(u: torch.Tensor, ext_lo: torch.Tensor, ext_hi: torch.Tensor, size: float, travel: torch.Tensor,
               sign: torch.Tensor, margin: float) -> torch.Tensor:
    """Start coordinate along one axis so that the whole path [start, start + sign*travel] stays in frame."""
    lo = ext_lo + margin
    room = (size - ext_hi - margin) - lo - travel  # >= 0 because travel was capped
    p0 = lo + u * room.clamp(min=0)
    return torch.where(sign < 0, p0 + travel, p0)


def _draw_params(batch: int, height: int, width: int, gen: torch.Generator):
    """All random per-sample parameters, drawn on the generator's device in a fixed order."""
    g = dict(generator=gen, device=gen.device, dtype=torch.float32)
    u = torch.rand(batch, 4, **g)
    jit = torch.rand(batch, 6, **g) * 2 - 1
    scale = min(height, width) / 32.0
    r = (RADIUS_RANGE[0] + u[:, 0] * (RADIUS_RANGE[1] - RADIUS_RANGE[0])) * scale
    speed = (SPEED_RANGE[0] + u[:, 1] * (SPEED_RANGE[1] - SPEED_RANGE[0])) * scale
    return u, jit, r, speed


def render(captions: Sequence[Caption | str], *, frames: int = 16, height: int = 32, width: int = 32,
           seed: int | torch.Generator = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """Render one video per caption: (B, 3, T, H, W) float32 in [-1, 1], anti-aliased, deterministic for a seed.

    Size, speed, start position and a small colour jitter are random; the path is chosen so that the shape stays
    wholly inside the frame in every frame, with a one-pixel margin: the outermost pixel ring is pure background.
    """
    caps = [as_caption(c) for c in captions]
    if not caps:
        return torch.zeros(0, 3, frames, height, width, device=device)
    gen = _make_generator(seed)
    u, jit, r, speed = _draw_params(len(caps), height, width, gen)
    u, jit, r, speed = (t.to(device) for t in (u, jit, r, speed))

    def lookup(table: list, index: list[int]) -> torch.Tensor:
        return torch.tensor(table, dtype=torch.float32, device=device)[
            torch.tensor(index, dtype=torch.long, device=device)]

    shape_id = torch.tensor([SHAPES.index(c.shape) for c in caps], device=device)
    fg = lookup(list(COLORS.values()), [list(COLORS).index(c.color) for c in caps])
    bg = lookup(list(BACKGROUNDS.values()), [list(BACKGROUNDS).index(c.background) for c in caps])
    dvec = lookup(list(DIRECTION_VECTORS.values()), [list(DIRECTION_VECTORS).index(c.direction) for c in caps])
    fg = (fg + COLOR_JITTER * jit[:, :3]).clamp(0, 1)
    bg = (bg + BACKGROUND_JITTER * jit[:, 3:]).clamp(0, 1)

    half_w, above, below = _shape_extents(shape_id, r)
    # Cap the speed so the path fits along the motion axis.
    room_x = width - 2 * half_w - 2 * MARGIN
    room_y = height - above - below - 2 * MARGIN
    room = torch.where(dvec[:, 0] != 0, room_x, room_y)
    speed = torch.minimum(speed, room.clamp(min=0) / max(frames - 1, 1))
    travel = speed * (frames - 1)
    cx0 = _axis_path(u[:, 2], half_w, half_w, width, travel * dvec[:, 0].abs(), dvec[:, 0], MARGIN)
    cy0 = _axis_path(u[:, 3], above, below, height, travel * dvec[:, 1].abs(), dvec[:, 1], MARGIN)

    t = torch.arange(frames, device=device, dtype=torch.float32)
    cx = cx0[:, None] + speed[:, None] * dvec[:, 0:1] * t  # (B, T)
    cy = cy0[:, None] + speed[:, None] * dvec[:, 1:2] * t
    coverage = _coverage(shape_id, r, cx, cy, height, width)  # (B, T, H, W)
    cov = coverage[:, None]
    video = bg[:, :, None, None, None] * (1 - cov) + fg[:, :, None, None, None] * cov
    return video * 2 - 1


def _coverage(shape_id: torch.Tensor, r: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
              height: int, width: int) -> torch.Tensor:
    """Soft pixel coverage in [0, 1] from a signed distance (px) with a 1-px linear ramp: (B, T, H, W)."""
    dev = cx.device
    ys = torch.arange(height, device=dev, dtype=torch.float32) + 0.5  # pixel centres
    xs = torch.arange(width, device=dev, dtype=torch.float32) + 0.5
    dx = xs[None, None, None, :] - cx[:, :, None, None]  # (B, T, 1, W)
    dy = ys[None, None, :, None] - cy[:, :, None, None]  # (B, T, H, 1)
    rr = r[:, None, None, None]
    d_circle = torch.sqrt(dx * dx + dy * dy) - rr
    d_square = _box_sdf(dx, dy, SQUARE_HALF * rr)
    d_tri = _triangle_sdf(dx, dy, TRIANGLE_R * rr)
    sid = shape_id[:, None, None, None]
    d = torch.where(sid == 0, d_circle, torch.where(sid == 1, d_square, d_tri))
    return (0.5 - d).clamp(0.0, 1.0)


def _box_sdf(dx: torch.Tensor, dy: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Exact signed distance to an axis-aligned square of half-side ``half`` centred at the origin."""
    qx, qy = dx.abs() - half, dy.abs() - half
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _triangle_sdf(dx: torch.Tensor, dy: torch.Tensor, circumradius: torch.Tensor) -> torch.Tensor:
    """Exact signed distance to an upward equilateral triangle centred (centroid) at the origin.

    Inigo Quilez's sdEquilateralTriangle with y flipped (image rows grow downwards); exact distances keep the
    anti-aliased rim of the corners as thin as that of the edges, so the shape's extent is its true extent.
    """
    k = math.sqrt(3.0)
    h = circumradius * k / 2  # half the side
    px = dx.abs() - h
    py = -dy + h / k
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.minimum(torch.maximum(px, -2 * h), torch.zeros_like(px))
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def sample_batch(batch_size: int, *, seed: int | None = None, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu", frames: int = 16, height: int = 32,
                 width: int = 32) -> tuple[torch.Tensor, list[str]]:
    """A training batch: (video (B, 3, T, H, W) in [-1, 1], caption texts). Give exactly one of seed/generator.

    With a generator, successive calls continue its stream (the training loop's usual pattern).
    """
    if (seed is None) == (generator is None):
        raise ValueError("sample_batch: give exactly one of seed= or generator=")
    gen = generator if generator is not None else _make_generator(seed)
    caps = sample_captions(batch_size, gen)
    video = render(caps, frames=frames, height=height, width=width, seed=gen, device=device)
    return video, [c.text() for c in caps]
