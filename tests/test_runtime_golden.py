"""Behaviour lock for the runtime: decisions and bit-exact videos of every policy on a fixed seed, per backend.

The expected values in ``tests/data/runtime_golden.json`` were recorded with the runtime as it was *before* the
runner / step-executor split (issue 10), by ``python tests/test_runtime_golden.py --record``; a refactor that changes
what any policy decides or any output bit fails here. Re-record only for an intended behaviour change, and say so in
the commit.

Re-recorded once (session 3, issue 12): calibrated plans now carry the `high` variant and a per-step schedule, so the
precision-reading policies (aigq, quantcache, dmpq, 6bit) on the plan backends (torch with a plan, onnxruntime)
execute different variants; every other case, and every torch-FP case, was unchanged.

Re-recorded for four cases (session 6, issue 12): calibrated plans now carry SRAP thresholds chosen by measured cost;
the 3-step test calibration leaves SRAP no steps to validate on, so its plan's thresholds never prune, where the
uncalibrated defaults (0.995 / 0.999) used to prune 5 unit evaluations of the FP8 plan: ``torch-plan/srap`` and
``onnxruntime/srap`` now equal their ``none`` runs, ``torch-plan/quantcache`` and ``onnxruntime/quantcache`` prune
nothing. Every other case is unchanged.

Re-recorded for the 18 plan cases (session 8, issue 12): ``calibrate --uniform`` keeps the embed and final units'
linears bf16 by default, so every ``torch-plan/*`` and ``onnxruntime/*`` video changed; decisions changed only for
``hlc`` and ``quantcache`` (their divergence score reads the changed outputs). All 14 ``torch-fp/*`` cases are
unchanged.

Re-recorded for the 6 HLC cases (session 9, issue 12): HLC's defaults are now δ 0.12 with extrapolated reuse
(``hlc.extrapolate`` 0.5), so ``hlc`` and ``quantcache`` on every backend (torch-fp, torch-plan, onnxruntime) reuse a
different residual; the other 26 cases are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from compile_helpers import built, calibrated  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "runtime_golden.json"
PROMPTS = ["a red circle moving right on a black background", "a blue square moving up on a gray background"]
STEPS = 12
SEED = 3
SMALL = dict(frames=4, height=16, width=16)
# Whole-unit policies run on every backend; sub-block (parts) and in-step gate policies need the torch executor.
WHOLE_UNIT = ("none", "hlc", "srap", "aigq", "quantcache", "tdc", "dmpq", "6bit", "interval")
TORCH_ONLY = ("fora", "pab", "fbcache", "dbcache", "teacache")


def _digest(res) -> dict:
    videos = res.videos.contiguous().float().numpy()
    return {
        "video_sha256": hashlib.sha256(videos.tobytes()).hexdigest(),
        "video_mean": float(videos.mean()),
        "decisions": [[s.decisions.get(u, {}).get("action", "compute") + ":" + s.decisions.get(u, {}).get("variant",
                                                                                                            "default")
                       for u in res.unit_names] for s in res.steps],
    }


def _cases():
    """(case id, pipeline factory, policy, settings) for every recorded run."""
    from qc_compile.runtime import Pipeline

    cases = []
    for pol in WHOLE_UNIT + TORCH_ONLY:
        cases.append((f"torch-fp/{pol}", lambda: Pipeline.from_pretrained("qc-ref"), pol, SMALL))
    for pol in WHOLE_UNIT:
        cases.append((f"torch-plan/{pol}", lambda: Pipeline(calibrated("fp8_e4m3")), pol, {}))
        cases.append((f"onnxruntime/{pol}",
                      lambda: Pipeline(built("fp8_e4m3", "rtx:sm89"), executor="onnxruntime"), pol, {}))
    return cases


_PIPES: dict[str, object] = {}


def _run(case_id: str, factory, policy: str, settings: dict) -> dict:
    kind = case_id.split("/")[0]
    if kind not in _PIPES:
        _PIPES[kind] = factory()
    res = _PIPES[kind](PROMPTS, policy=policy, seed=SEED, steps=STEPS, **settings)
    return _digest(res)


def record() -> None:
    out = {cid: _run(cid, f, p, s) for cid, f, p, s in _cases()}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"recorded {len(out)} runs -> {GOLDEN}")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_same_decisions_and_bit_identical_video(case):
    cid, factory, policy, settings = case
    expected = json.loads(GOLDEN.read_text())[cid]
    got = _run(cid, factory, policy, settings)
    assert got["decisions"] == expected["decisions"], f"{cid}: decisions changed"
    assert got["video_sha256"] == expected["video_sha256"], (
        f"{cid}: video changed (mean {got['video_mean']!r} vs recorded {expected['video_mean']!r})")


if __name__ == "__main__":
    if "--record" in sys.argv:
        record()
