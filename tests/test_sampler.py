"""RFLOW schedule/transform against the reference's worked numbers; sampler determinism and policy hooks."""

from __future__ import annotations

import math

import pytest
import torch

from qc_compile.models import load_model
from qc_compile.runtime.generation import GenerationSettings, generate
from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.schedule import (base_timesteps, sampling_timesteps, step_sizes, timestep_transform,
                                         transform_ratio)


def test_base_schedule():
    ts = base_timesteps(30)
    assert len(ts) == 30 and ts[0] == 1000 and math.isclose(ts[1], 966.6667, rel_tol=1e-6)
    assert math.isclose(ts[-1], 33.3333, rel_tol=1e-5) and min(ts) > 0


@pytest.mark.parametrize("h,w,f,ratio", [(240, 426, 51, 2.419), (240, 426, 102, 3.42), (360, 640, 51, 3.63),
                                         (480, 854, 51, 4.84), (720, 1280, 51, 7.26), (720, 1280, 102, 10.27),
                                         (720, 1280, 408, 20.54), (240, 426, 1, 0.625)])
def test_transform_ratios(h, w, f, ratio):
    assert math.isclose(transform_ratio(h, w, f), ratio, abs_tol=0.006)


def test_240p_51f_schedule_matches_reference():
    ts = sampling_timesteps(30, height=240, width=426, num_frames=51)
    want_head = [1000, 985.9, 971.3, 956.1, 940.2]
    want_tail = [271.2, 211.8, 147.3, 77.0]
    assert [round(t, 1) for t in ts[:5]] == want_head
    assert [round(t, 1) for t in ts[-4:]] == want_tail
    dts = step_sizes(ts)
    assert math.isclose(sum(dts), 1.0, rel_tol=1e-9) and math.isclose(dts[-1], ts[-1] / 1000)


def test_transform_is_identity_at_ratio_one_and_monotone():
    assert math.isclose(timestep_transform(500, 1.0), 500)
    vals = [timestep_transform(t, 3.0) for t in (100, 400, 700)]
    assert vals == sorted(vals) and all(v > t for v, t in zip(vals, (100, 400, 700)))


def test_short_clips_refuse_the_transform():
    with pytest.raises(ValueError, match="17 frames"):
        sampling_timesteps(10, height=32, width=32, num_frames=16)


class Recorder:
    """A policy that reuses every odd-step block after step 2, to exercise the hooks."""

    name = "recorder"

    def reset(self, unit_names, num_steps):
        self.units, self.seen, self.stats = unit_names, [], []

    def decide(self, step: StepInfo):
        self.seen.append(step.index)
        if step.index >= 2 and step.index % 2 == 1:
            return {u: UnitDecision(Action.REUSE) for u in step.unit_names if u.startswith(("spatial", "temporal"))}
        if step.index == 4:
            return {"temporal_1": UnitDecision(Action.PRUNE)}
        return {}

    def observe(self, step: StepInfo, stats: StepStats):
        self.stats.append(stats)


@pytest.fixture(scope="module")
def tiny_model():
    loaded = load_model("qc-ref", random_weights=True, seed=0)
    for p in loaded.model.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    return loaded


def _settings(loaded, **kw):
    return GenerationSettings.defaults(loaded, steps=6, frames=4, height=8, width=8, **kw)


def test_sampler_is_deterministic_and_seed_dependent(tiny_model):
    a, _ = generate(tiny_model, ["a red circle moving left on a black background"], _settings(tiny_model, seed=5),
                    progress=False)
    b, _ = generate(tiny_model, ["a red circle moving left on a black background"], _settings(tiny_model, seed=5),
                    progress=False)
    c, _ = generate(tiny_model, ["a red circle moving left on a black background"], _settings(tiny_model, seed=6),
                    progress=False)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_batch_element_equals_single_prompt(tiny_model):
    prompts = ["a red circle moving left on a black background", "a blue square moving up on a gray background"]
    both, _ = generate(tiny_model, prompts, _settings(tiny_model, seed=3), progress=False)
    second, _ = generate(tiny_model, prompts[1:], _settings(tiny_model, seed=4), progress=False)
    assert torch.allclose(both[1], second[0], atol=1e-5)


def test_policy_hooks_see_every_step_and_steer_it(tiny_model):
    pol = Recorder()
    prompts = ["a green triangle moving right on a navy background"]
    video, res = generate(tiny_model, prompts, _settings(tiny_model), policy=pol, progress=False)
    assert pol.seen == list(range(6)) and len(pol.stats) == 6
    blocks = [u for u in pol.units if u.startswith(("spatial", "temporal"))]
    # reused steps report no statistics for blocks; computed ones report all of them
    assert all(math.isnan(pol.stats[3].get(u, "res_norm")) for u in blocks)
    assert all(pol.stats[2].get(u, "res_norm") > 0 for u in blocks)
    assert pol.stats[2].get("temporal_0", "res_rel_l1") > 0  # a cached residual existed from step 1
    assert -1 <= pol.stats[2].get("temporal_0", "cos_prev") <= 1
    frac = res.compute_fraction(pol.units)
    n_blocks = len(blocks)
    assert math.isclose(frac, (6 * n_blocks - 2 * n_blocks - 1) / (6 * n_blocks))  # steps 3, 5 reused; 1 pruned
    full, _ = generate(tiny_model, prompts, _settings(tiny_model), progress=False)
    assert not torch.allclose(video, full)  # the decisions changed the computation


def test_reuse_applies_cached_residual_to_current_input(tiny_model):
    """REUSE must add the cached residual to the *current* input, not return the stale output."""
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import torch_executor
    from qc_compile.runtime.protocols import Conditioning

    m = tiny_model.model
    g = Geometry(4, 8, 8, m.config.patch_size, 8, 8)
    ex = torch_executor(m, g)
    L, Cy = m.config.model_max_length, m.config.caption_channels
    cond = Conditioning(torch.randn(2, 1, L, Cy), torch.ones(2, L, dtype=torch.bool), torch.full((2,), 8.0))
    z1, z2 = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    ex.step(z1, torch.full((2,), 900.0), cond, {})
    res0 = ex.residuals["spatial_0"].clone()
    reuse = {u: UnitDecision(Action.REUSE) for u in ex.block_units}
    v_reuse, _ = ex.step(z2, torch.full((2,), 800.0), cond, reuse)
    # manual: embed z2, then add every cached residual in order, then final
    emb = m.run_unit("embed", {"x": z2, "timestep": torch.full((2,), 800.0), "y": cond.y, "mask": cond.mask,
                               "fps": cond.fps}, g)
    h = emb["x"]
    for u in ex.block_units:
        h = h + ex.residuals[u]
    want = m.run_unit("final", {"x": h, "t": emb["t"]}, g)["v"]
    assert torch.allclose(v_reuse, want, atol=1e-6)
    assert torch.equal(ex.residuals["spatial_0"], res0)  # reuse does not overwrite the cache
