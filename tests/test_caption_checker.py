"""The caption checker reads rendered ground truth right (>= 99 %) and says wrong for wrong captions."""

from __future__ import annotations

import dataclasses
import json

import torch

from qc_compile.data.shapes import Caption, all_captions, render, sample_captions
from qc_compile.metrics.caption_checker import check_video, score_videos, summarize


def test_ground_truth_accuracy_all_combos_several_seeds() -> None:
    caps = all_captions()  # every allowed combo, then a random draw with other sizes and speeds
    more = sample_captions(120, seed=1)
    results = score_videos(render(caps, seed=0), caps)["results"] + score_videos(render(more, seed=1), more)["results"]
    acc = summarize(results)
    assert acc["n"] == len(caps) + 120
    for attr in ("color", "shape", "direction", "background"):
        assert acc[attr] >= 0.99, (attr, acc, [r.summary() for r in results if not getattr(r, f"{attr}_ok")][:5])


def test_ground_truth_other_sizes_and_frame_counts() -> None:
    caps = sample_captions(40, seed=5)
    for frames, h, w in ((8, 32, 32), (16, 64, 64), (12, 48, 32)):
        acc = score_videos(render(caps, frames=frames, height=h, width=w, seed=3), caps)
        assert min(acc[a] for a in ("color", "shape", "direction", "background")) >= 0.99, (frames, h, w, acc)


def test_mismatched_caption_is_wrong() -> None:
    truth = Caption("red", "circle", "left", "black")
    video = render([truth], seed=2)[0]
    r = check_video(video, truth)
    assert r.all_ok and r.color == "red" and r.speed > 0.5 and r.velocity[0] < 0
    for field, other in (("color", "blue"), ("shape", "square"), ("direction", "right"), ("background", "gray")):
        wrong = dataclasses.replace(truth, **{field: other})
        r = check_video(video, wrong.text())
        assert not getattr(r, f"{field}_ok") and not r.all_ok
        assert f"{field} FAIL (" in r.summary() and f"want {other}" in r.summary()


def test_static_and_empty_videos() -> None:
    truth = Caption("yellow", "square", "up", "navy")
    video = render([truth], seed=1)[0]
    static = video[:, :1].expand_as(video).contiguous()
    r = check_video(static, truth)
    assert r.direction == "static" and not r.direction_ok and r.shape_ok and r.color_ok
    empty = torch.full_like(video, -1.0)
    r = check_video(empty, truth)
    assert (r.color, r.shape, r.direction, r.background) == ("none", "none", "none", "black")


def test_reversed_video_reads_opposite_direction() -> None:
    truth = Caption("cyan", "triangle", "down", "gray")
    video = render([truth], seed=6)[0]
    assert check_video(video.flip(1), truth).direction == "up"


def test_robust_to_mild_noise() -> None:
    caps = sample_captions(80, seed=8)
    v = render(caps, seed=8)
    noisy = (v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    acc = score_videos(noisy, caps)
    assert acc["all"] >= 0.95, acc


def test_result_is_json_ready() -> None:
    caps = all_captions()[:1]
    d = check_video(render(caps, seed=0)[0], caps[0]).to_dict()
    assert json.loads(json.dumps(d))["expected"] == caps[0].text() and d["all_ok"] is True
