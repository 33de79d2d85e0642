"""HLC's first-order reuse (``hlc.extrapolate`` = g): a reused unit adds r1 + g·k·(r1 − r0), k = steps since r1 over
the steps between the unit's last two computations; g = 0 is the plain reuse bit for bit and keeps one residual."""

from __future__ import annotations

import pytest
import torch

from qc_compile.models import load_model
from qc_compile.models.stdit3 import Geometry
from qc_compile.runtime.policies import get_policy
from qc_compile.runtime.policy import Action, UnitDecision
from qc_compile.runtime.runners.torch import TorchRunner
from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig
from qc_compile.runtime.step_executor import StepExecutor
from test_stats_levels import FRAMES, _setup  # noqa: E402  (pytest prepends tests/ to sys.path)

STEPS = 5
UNIT = "spatial_1"
REUSE_AT = (1, 3, 4)  # UNIT computed at steps 0 and 2 only


class Scripted:
    """Reuses UNIT at REUSE_AT, computes everything else; asks for extrapolation ``g`` (None: no attribute)."""

    name = "scripted"
    reads_stats = "full"

    def __init__(self, g: float | None) -> None:
        if g is not None:
            self.extrapolation = g

    def reset(self, unit_names, num_steps) -> None:
        pass

    def decide(self, step):
        return {UNIT: UnitDecision(Action.REUSE)} if step.index in REUSE_AT else {}

    def observe(self, step, stats) -> None:
        pass


@pytest.fixture(scope="module")
def qcref():
    return load_model("qc-ref")


def _run(loaded, policy):
    c = loaded.config
    g, z, y, mask, y_null = _setup(loaded)  # fresh random latent and captions (test_stats_levels' inputs)
    ex = StepExecutor(TorchRunner(loaded.model, g), g)
    cached, added = [], {}  # UNIT's cached residual after every step; what each reuse added
    step, reused = ex.step, ex._reused

    def step_and_record(*a, **k):
        out = step(*a, **k)
        cached.append(ex.residuals[UNIT].clone())
        return out

    def reused_and_record(name):
        r = reused(name)
        if name == UNIT:
            added[len(cached)] = r.clone()
        return r

    ex.step, ex._reused = step_and_record, reused_and_record
    s = RFlowSampler(SamplerConfig(num_steps=STEPS, cfg_scale=7.0, use_timestep_transform=False))
    res = s.sample(ex, z, y, mask, y_null, c.default_fps,
                   video_size=(FRAMES, c.default_height, c.default_width), policy=policy, progress=False)
    return ex, res, cached, added


@pytest.mark.parametrize("g", [0.5, 1.0])
def test_reuse_adds_the_linear_extrapolation(qcref, g):
    ex, res, cached, added = _run(qcref, Scripted(g))
    assert sorted(added) == list(REUSE_AT)
    r0, r1 = cached[0], cached[2]  # the residuals of UNIT's computations at steps 0 and 2
    assert not torch.equal(r0, r1)
    torch.testing.assert_close(added[1], r0, rtol=0, atol=0)  # one computation seen: the plain reuse
    for s in (3, 4):
        k = g * (s - 2) / (2 - 0)
        want = r1.double() + k * (r1.double() - r0.double())
        err = (added[s].double() - want).norm() / want.norm()
        assert err < 1e-6, (s, err.item())
    assert UNIT in ex._older and ex._older[UNIT][0] == 0
    assert [r.stats[UNIT]["action"] for r in res.steps] == [0.0, 1.0, 0.0, 1.0, 1.0]


def test_zero_is_the_plain_reuse_and_keeps_one_residual(qcref):
    ex0, res0, _, added0 = _run(qcref, Scripted(0.0))
    exn, resn, cachedn, _ = _run(qcref, Scripted(None))  # a policy that never heard of extrapolation
    assert torch.equal(res0.z, resn.z)
    assert not ex0._older and not exn._older
    assert torch.equal(added0[4], cachedn[2])
    ex1, res1, _, _ = _run(qcref, Scripted(0.5))
    assert not torch.equal(res1.z, res0.z)  # and extrapolation does change the video


def test_hlc_default_extrapolates_and_the_executor_follows_it(qcref):
    hlc = get_policy("hlc", None, None)
    assert hlc.extrapolation == 0.5
    qc = get_policy("quantcache", None, None)
    assert qc.extrapolation == 0.5  # Compose: the largest of its components'
    off = get_policy("quantcache", {"hlc.extrapolate": 0}, None)
    assert off.extrapolation == 0.0
    c = qcref.config
    g = Geometry.for_model(c, FRAMES, c.default_height, c.default_width)
    ex = StepExecutor(TorchRunner(qcref.model, g), g)
    ex.use_policy(qc)
    assert ex.extrapolation == 0.5
    ex.use_policy(off)
    assert ex.extrapolation == 0.0
    with pytest.raises(Exception, match="extrapolate"):
        get_policy("hlc", {"hlc.extrapolate": 3}, None)
