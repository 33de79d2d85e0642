"""The statistics level follows the policy: policy none measures nothing and keeps no residuals (same latent as
stats='full', bit for bit); a reuse under stats='none' raises; an explicit level wins."""

from __future__ import annotations

import pytest
import torch

from qc_compile.models import load_model
from qc_compile.models.stdit3 import Geometry
from qc_compile.runtime.policies import NoPolicy, get_policy
from qc_compile.runtime.policy import Action, UnitDecision
from qc_compile.runtime.protocols import Conditioning
from qc_compile.runtime.runners.fast import FastRunner
from qc_compile.runtime.runners.torch import TorchRunner
from qc_compile.runtime.sampler import RFlowSampler, SamplerConfig
from qc_compile.runtime.step_executor import StepExecutor

FRAMES, STEPS = 4, 3


@pytest.fixture(scope="module")
def qcref():
    return load_model("qc-ref")


def _setup(loaded):
    c = loaded.config
    g = Geometry.for_model(c, FRAMES, c.default_height, c.default_width)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, c.in_channels, g.frames, g.height, g.width, generator=gen)
    y = torch.randn(1, 1, c.model_max_length, c.caption_channels, generator=gen)
    mask = torch.zeros(1, c.model_max_length, dtype=torch.bool)
    mask[0, :6] = True
    return g, z, y, mask, loaded.null_captions(1)


def _sample(loaded, ex, policy=None):
    g, z, y, mask, y_null = _setup(loaded)
    c = loaded.config
    s = RFlowSampler(SamplerConfig(num_steps=STEPS, cfg_scale=7.0, use_timestep_transform=False))
    return s.sample(ex, z, y, mask, y_null, c.default_fps, video_size=(FRAMES, c.default_height, c.default_width),
                    policy=policy, progress=False)


def _runner(kind, loaded, g):
    return TorchRunner(loaded.model, g) if kind == "torch" else FastRunner(loaded.model, g)


@pytest.mark.parametrize("kind", ["torch", "fast"])
def test_policy_none_measures_nothing_and_gives_the_same_latent(qcref, kind):
    g = _setup(qcref)[0]
    full = StepExecutor(_runner(kind, qcref, g), g, stats="full")
    r_full = _sample(qcref, full)
    ex = StepExecutor(_runner(kind, qcref, g), g)  # default: follows the policy (none)
    calls = []
    real = ex._unit_stats
    ex._unit_stats = lambda *a, **k: calls.append(1) or real(*a, **k)
    r_none = _sample(qcref, ex)
    assert ex.stats_level == "none" and full.stats_level == "full"
    assert torch.equal(r_none.z, r_full.z)
    assert not calls and not ex.residuals and full.residuals
    for rec_none, rec_full in zip(r_none.steps, r_full.steps):
        for u in ex.block_units:
            assert set(rec_none.stats[u]) == {"action"}, rec_none.stats[u]  # everything else NaN (not measured)
            assert rec_none.stats[u]["action"] == rec_full.stats[u]["action"]
            assert len(rec_full.stats[u]) > 4
    assert ex.describe()["stats"] == "none"


def test_level_follows_the_policy_unless_asked(qcref):
    g = _setup(qcref)[0]
    ex = StepExecutor(TorchRunner(qcref.model, g), g)
    assert ex.stats_level == "full"  # no policy yet: the safe level
    ex.use_policy(NoPolicy())
    assert ex.stats_level == "none"
    for name in ("interval", "teacache", "pab"):
        ex.use_policy(get_policy(name, None, None))
        assert ex.stats_level == "full", name
    pinned = StepExecutor(TorchRunner(qcref.model, g), g, stats="cache")
    pinned.use_policy(NoPolicy())
    assert pinned.stats_level == "cache"
    with pytest.raises(ValueError, match="stats must be one of"):
        StepExecutor(TorchRunner(qcref.model, g), g, stats="some")


def test_reuse_under_stats_none_raises(qcref):
    g = _setup(qcref)[0]
    ex = StepExecutor(TorchRunner(qcref.model, g), g, stats="none")
    with pytest.raises(RuntimeError, match="policy 'interval' asked to reuse .*stats='none'"):
        _sample(qcref, ex, get_policy("interval", None, None))  # its level is not taken: 'none' was asked for
    g_, z, y, mask, _ = _setup(qcref)
    cond = Conditioning(y=torch.cat([y, y]), mask=torch.cat([mask, mask]), fps=torch.full((2,), 24.0))
    ex.reset()
    zz, t = torch.cat([z, z]), torch.full((2,), 500.0)
    ex.step(zz, t, cond, {})
    with pytest.raises(RuntimeError, match="stats='none'"):
        ex.step(zz, t, cond, {ex.block_units[1]: UnitDecision(Action.REUSE)})
