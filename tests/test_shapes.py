"""The shapes domain: vocabulary, caption parsing, deterministic rendering that moves the right way."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qc_compile.data import shapes
from qc_compile.data.shapes import (BACKGROUNDS, COLORS, DIRECTIONS, FORBIDDEN_PAIRS, SHAPES, Caption,
                                    all_captions, parse_caption, render, sample_batch, sample_captions)
from qc_compile.errors import UserError


def test_caption_text_round_trip() -> None:
    for cap in all_captions():
        assert parse_caption(cap.text()) == cap
    assert Caption("red", "circle", "left", "black").text() == "a red circle moving left on a black background"


def test_parse_is_tolerant_of_case_spaces_and_period() -> None:
    assert parse_caption("  A  Red circle moving LEFT on a black   background. ") == Caption("red", "circle", "left", "black")


def test_unknown_word_names_word_and_vocabulary() -> None:
    with pytest.raises(UserError) as e:
        parse_caption("a purple circle moving left on a black background")
    msg = str(e.value)
    assert "'purple'" in msg
    for word in (*COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS):
        assert word in msg


@pytest.mark.parametrize("text, slot", [
    ("a circle moving left on a black background", "colour"),
    ("a red moving left on a black background", "shape"),
    ("a red circle moving on a black background", "direction"),
    ("a red circle moving left on a background", "background"),
    ("a red blue circle moving left on a black background", "colour"),
])
def test_missing_or_doubled_slot(text: str, slot: str) -> None:
    with pytest.raises(UserError, match=slot):
        parse_caption(text)


def test_wrong_order_and_forbidden_pair() -> None:
    with pytest.raises(UserError, match="template"):
        parse_caption("a circle red moving left on a black background")
    with pytest.raises(UserError, match="blue on navy"):
        parse_caption("a blue circle moving left on a navy background")


def test_vocabulary_and_forbidden_pairs() -> None:
    caps = all_captions()
    assert len(caps) == len(COLORS) * len(SHAPES) * len(DIRECTIONS) * len(BACKGROUNDS) - 12 * len(FORBIDDEN_PAIRS)
    assert not any((c.color, c.background) in FORBIDDEN_PAIRS for c in caps)
    # Every allowed pair is clearly apart in RGB; colours are apart from each other too.
    for c, b in itertools.product(COLORS, BACKGROUNDS):
        if (c, b) not in FORBIDDEN_PAIRS:
            assert math.dist(COLORS[c], BACKGROUNDS[b]) >= 0.6, (c, b)
    for a, b in itertools.combinations(COLORS, 2):
        assert math.dist(COLORS[a], COLORS[b]) >= 0.6, (a, b)


def test_sample_captions_deterministic_and_uniform_enough() -> None:
    a, b = sample_captions(500, seed=3), sample_captions(500, seed=3)
    assert a == b and a != sample_captions(500, seed=4)
    assert not any((c.color, c.background) in FORBIDDEN_PAIRS for c in a)
    assert {c.direction for c in a} == set(DIRECTIONS) and {c.shape for c in a} == set(SHAPES)


def test_render_shape_range_determinism() -> None:
    caps = all_captions()[:20]
    v = render(caps, seed=7)
    assert v.shape == (20, 3, 16, 32, 32) and v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1
    assert torch.equal(v, render(caps, seed=7))
    assert not torch.equal(v, render(caps, seed=8))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(render(caps, seed=g1), render(caps, seed=g2))
    # Anti-aliased: some pixels strictly between background and shape colour.
    assert ((v > -0.9) & (v < 0.8) & (v.amin(dim=1, keepdim=True) < -0.9)).any()


def _centroids(video: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """(T, 2) coverage centroids (x, y) of one (3, T, H, W) video against its background colour."""
    diff = (video - bg[:, None, None, None]).abs().sum(0)  # (T, H, W)
    T, H, W = diff.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    m = diff.sum((1, 2))
    return torch.stack([(diff * xs).sum((1, 2)) / m, (diff * ys).sum((1, 2)) / m], dim=1)


@pytest.mark.parametrize("direction, axis, sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)])
def test_direction_moves_centroid(direction: str, axis: int, sign: int) -> None:
    caps = [Caption(c, s, direction, "black") for c in ("red", "white") for s in SHAPES]
    v = render(caps, seed=11)
    for i in range(len(caps)):
        c = _centroids(v[i], torch.full((3,), -1.0))
        step = (c[-1] - c[0]) / 15
        assert sign * step[axis] > 0.5, (caps[i], step)      # >= 0.6 px/frame drawn
        assert abs(step[1 - axis]) < 0.05, (caps[i], step)    # no drift on the other axis


def test_shape_stays_inside_frame() -> None:
    caps = sample_captions(200, seed=1)
    v = render(caps, seed=2)
    bg = torch.tensor([BACKGROUNDS[c.background] for c in caps]) * 2 - 1
    diff = (v - bg[:, :, None, None, None]).abs().amax(dim=1)  # (B, T, H, W)
    border = torch.cat([diff[..., 0, :], diff[..., -1, :], diff[..., :, 0], diff[..., :, -1]], dim=-1)
    assert border.max() < 0.05 * 2  # the outermost ring is pure (jittered) background
    assert (diff.amax(dim=(2, 3)) > 0.5).all()  # shape visible in every frame


def test_render_scales_with_resolution() -> None:
    v = render([Caption("red", "square", "right", "black")], frames=8, height=64, width=48, seed=0)
    assert v.shape == (1, 3, 8, 64, 48)


def test_sample_batch() -> None:
    v, texts = sample_batch(8, seed=9)
    assert v.shape == (8, 3, 16, 32, 32) and len(texts) == 8
    v2, texts2 = sample_batch(8, seed=9)
    assert torch.equal(v, v2) and texts == texts2
    assert all(isinstance(parse_caption(t), Caption) for t in texts)
    g = torch.Generator().manual_seed(1)
    a, _ = sample_batch(4, generator=g)
    b, _ = sample_batch(4, generator=g)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_batch(2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_render_cuda_matches_cpu() -> None:
    caps = all_captions()[:16]
    torch.testing.assert_close(render(caps, seed=3, device="cuda").cpu(), render(caps, seed=3), atol=1e-4, rtol=0)


def test_module_constants_are_ordered() -> None:
    # The tokenizer's vocabulary order depends on these; changing them breaks shipped checkpoints.
    assert shapes.all_words()[:4] == ("a", "moving", "on", "background")
    assert list(COLORS) == ["red", "green", "blue", "yellow", "magenta", "cyan", "white"]
    assert list(BACKGROUNDS) == ["black", "gray", "navy"]
