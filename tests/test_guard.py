"""The divergence guard (runtime/policies/guard.py): composed with a caching policy it bounds consecutive skips and
the accumulated residual drift of every block unit, by turning skips into computes (never the reverse)."""

from __future__ import annotations

import pytest
import torch

SMALL = dict(frames=4, height=16, width=16, steps=8)
PROMPT = "a blue square moving up on a gray background"


@pytest.fixture(scope="module")
def pipe():
    from qc_compile.runtime import Pipeline

    return Pipeline.from_pretrained("qc-ref")


def _runs(res, unit: str) -> list[int]:
    """Lengths of the runs of consecutive uncomputed steps of ``unit``."""
    out, n = [], 0
    for st in res.steps:
        if st.decisions.get(unit, {}).get("action", "compute") in ("reuse", "prune"):
            n += 1
        else:
            if n:
                out.append(n)
            n = 0
    return out + ([n] if n else [])


def test_guard_bounds_consecutive_reuse(pipe):
    over = {"interval.interval": 100, "interval.tail": 0}
    free = pipe(PROMPT, policy="interval", overrides={"interval": 100, "tail": 0}, seed=0, reference=True,
                **SMALL)
    assert max(_runs(free, "spatial_0")) == SMALL["steps"] - 1  # the unguarded policy reuses to the end
    guarded = pipe(PROMPT, policy="interval+guard", overrides={**over, "guard.max_reuse": 2,
                                                               "guard.max_drift": 0}, seed=0, reference=True,
                   **SMALL)
    for u in ("spatial_0", "temporal_3"):
        runs = _runs(guarded, u)
        assert runs and max(runs) == 2, (u, runs)
    assert guarded.compute_fraction > free.compute_fraction
    # the forced computes bring the video back towards the FP run
    assert guarded.metrics()["reference"]["psnr_db"] > free.metrics()["reference"]["psnr_db"]


def test_guard_drift_bound_forces_compute(pipe):
    over = {"interval.interval": 3, "interval.tail": 0, "guard.max_reuse": 0}
    plain = pipe(PROMPT, policy="interval", overrides={"interval": 3, "tail": 0}, seed=0, **SMALL)
    tight = pipe(PROMPT, policy="interval+guard", overrides={**over, "guard.max_drift": 1e-9}, seed=0, **SMALL)
    # computed at steps 0 and 3 by the interval, a change rate is known from step 3 on: no later skip fits the bound
    for st in tight.steps[4:]:
        assert all(d["action"] == "compute" for u, d in st.decisions.items() if u.startswith(("spatial", "temporal")))
    assert tight.compute_fraction > plain.compute_fraction
    loose = pipe(PROMPT, policy="interval+guard", overrides={**over, "guard.max_drift": 1e9}, seed=0, **SMALL)
    assert torch.equal(loose.videos, plain.videos)  # a bound that never binds changes nothing
    assert loose.compute_fraction == plain.compute_fraction


def test_guard_leaves_default_hlc_alone(pipe):
    """At its defaults the guard does not act on HLC's default schedule (τ ≤ 5 < max_reuse 8)."""
    a = pipe(PROMPT, policy="hlc", seed=0, **SMALL)
    b = pipe(PROMPT, policy="hlc+guard", seed=0, **SMALL)
    assert torch.equal(a.videos, b.videos)
