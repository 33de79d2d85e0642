"""Executor support for the policies (sub-block caches, in-step gates, new statistics), the sampler's post-step hook,
and reproducibility of whole runs (tiny random-weight qc-ref)."""

from __future__ import annotations

import math

import pytest
import torch

from qc_compile.models import load_model
from qc_compile.models.stdit3 import Geometry
from qc_compile.runtime.generation import torch_executor
from qc_compile.runtime.protocols import Conditioning
from qc_compile.runtime.generation import GenerationSettings, generate
from qc_compile.runtime.policies import get_policy
from qc_compile.runtime.policy import SUB_BLOCKS, Action, Gate, UnitDecision

PROMPT = "a red circle moving left on a black background"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("qc-ref", random_weights=True, seed=0)
    for p in loaded.model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return loaded


def _settings(loaded, steps=8, **kw):
    return GenerationSettings.defaults(loaded, steps=steps, frames=4, height=8, width=8, **kw)


def _executor(tiny):
    m = tiny.model
    g = Geometry(4, 8, 8, m.config.patch_size, 8, 8)
    L, Cy = m.config.model_max_length, m.config.caption_channels
    cond = Conditioning(torch.randn(2, 1, L, Cy), torch.ones(2, L, dtype=torch.bool), torch.full((2,), 8.0))
    return torch_executor(m, g), cond


def test_sub_block_path_matches_the_whole_unit_and_reuses_parts(tiny):
    ex, cond = _executor(tiny)
    z, t = torch.randn(2, 3, 4, 8, 8), torch.full((2,), 900.0)
    v_whole, _ = ex.step(z, t, cond, {})
    ex.reset()
    v_parts, stats = ex.step(z, t, cond, {u: UnitDecision(parts=()) for u in ex.block_units})
    assert torch.allclose(v_whole, v_parts, atol=1e-5)
    assert set(ex.parts["spatial_0"]) == set(SUB_BLOCKS)
    # reusing every part at the same inputs reproduces the output (PAB: gated outputs as cached)
    v_again, stats = ex.step(z, t, cond, {u: UnitDecision(parts=SUB_BLOCKS) for u in ex.block_units})
    assert torch.allclose(v_again, v_whole, atol=1e-5)
    assert (stats[1:-1, -1] == 1.0).all()  # all sub-blocks from the cache: recorded as reuse
    # a different timestep: regate (FORA) applies the current adaLN gate, PAB keeps the cached gated output
    t2 = torch.full((2,), 500.0)
    v_pab, _ = ex.step(z, t2, cond, {u: UnitDecision(parts=("attn", "mlp")) for u in ex.block_units})
    v_fora, _ = ex.step(z, t2, cond, {u: UnitDecision(parts=("attn", "mlp"), regate=True) for u in ex.block_units})
    assert not torch.allclose(v_pab, v_fora)


def test_new_statistics_are_reported(tiny):
    ex, cond = _executor(tiny)
    from qc_compile.runtime.policy import STAT_INDEX as S

    z = torch.randn(2, 3, 4, 8, 8)
    ex.step(z, torch.full((2,), 900.0), cond, {})
    _, st = ex.step(z * 0.9, torch.full((2,), 800.0), cond, {"temporal_1": UnitDecision(Action.PRUNE)})
    assert st[0, S["latent_rel_l1"]] == pytest.approx(0.1, rel=1e-4)
    row = st[1]
    for name in ("in_out_rel_l1", "motion", "in_outlier", "res_rel_l1"):
        assert row[S[name]] > 0
    assert st[4, S["action"]] == 2.0 and math.isnan(float(st[4, S["res_norm"]]))


def test_residual_gate_reuses_and_keeps_the_reference_of_the_last_full_step(tiny):
    ex, cond = _executor(tiny)
    seen = []

    def opens(v):
        seen.append(v)
        return v < 10.0

    gate = Gate("residual", opens)
    dec = {u: UnitDecision(Action.GATED, gate=gate) for u in ex.block_units[1:]}
    z = torch.randn(2, 3, 4, 8, 8)
    _, s0 = ex.step(z, torch.full((2,), 900.0), cond, dec)
    assert math.isinf(seen[0]) and (s0[2:-1, -1] == 0.0).all()  # nothing to compare with: computed
    ref = ex._gate_ref.clone()
    _, s1 = ex.step(z * 0.95, torch.full((2,), 850.0), cond, dec)
    assert 0 < seen[1] < 10 and (s1[2:-1, -1] == 1.0).all() and s1[1, -1] == 0.0  # probe computed, rest reused
    assert torch.equal(ex._gate_ref, ref)  # the reference moves only on full steps


def test_gated_decisions_are_recorded_as_taken(tiny):
    pol = get_policy("fbcache", {"threshold": 10.0})
    _, res = generate(tiny, [PROMPT], _settings(tiny), policy=pol, progress=False)
    rec = res.steps[3].decisions["temporal_0"]
    assert rec == {"action": "reuse", "variant": "default", "gated": True}
    assert res.steps[0].decisions["temporal_0"]["action"] == "compute"
    units = tuple(tiny.model.unit_names())
    assert res.compute_fraction(units) < 0.5


def test_teacache_probe_runs_every_step(tiny):
    pol = get_policy("teacache", {"rel_l1_thresh": 0.5})
    _, res = generate(tiny, [PROMPT], _settings(tiny), policy=pol, progress=False)
    assert len(pol.history) == 8 and math.isinf(pol.history[0]["rel_l1"])
    assert all(h["rel_l1"] > 0 for h in pol.history[1:])
    assert res.steps[-1].decisions["spatial_0"]["action"] == "compute"  # last step forced
    assert "mod_rel_l1" in res.steps[2].stats["spatial_0"]


def test_post_step_hook_variance_compensation(tiny):
    s = _settings(tiny, steps=4)
    base, _ = generate(tiny, [PROMPT], s, progress=False)
    ones, _ = generate(tiny, [PROMPT], s, policy=get_policy("vc", None, {"vc": {"factors": [[1.0] * 3] * 4}}),
                       progress=False)
    assert torch.allclose(base, ones, atol=1e-4)
    flat, _ = generate(tiny, [PROMPT], s, policy=get_policy("vc", None, {"vc": {"factors": [[1.0] * 3] * 3 +
                                                                                        [[1e-6] * 3]}}),
                       progress=False)
    # K = 0 at the last step leaves only the per-channel mean
    assert torch.allclose(flat, flat.mean(dim=(2, 3, 4), keepdim=True), atol=1e-4)
    assert not torch.allclose(base, flat, atol=1e-2)

    class Hook:
        name = "hook"
        calls: list = []

        def reset(self, units, n): pass
        def decide(self, step): return {}
        def observe(self, step, stats): pass

        def post_step(self, z, step):
            self.calls.append(step.index)
            return z

    h = Hook()
    generate(tiny, [PROMPT], s, policy=h, progress=False)
    assert h.calls == [0, 1, 2, 3]


def _decisions(res):
    return [{u: d["action"] for u, d in s.decisions.items()} for s in res.steps]


def test_same_seed_same_decisions_and_video_other_seed_differs(tiny):
    over = {"srap.tau_low": -1.0, "srap.tau_high": 1.0, "srap.p_base": 0.5, "hlc.delta1": 0.01, "hlc.delta2": 0.05}
    runs = []
    for seed in (3, 3, 4):
        pol = get_policy("quantcache", over, seed=seed)
        video, res = generate(tiny, [PROMPT], _settings(tiny, steps=10, seed=seed), policy=pol, progress=False)
        runs.append((video, _decisions(res)))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]
    assert any(a == "prune" for d in runs[0][1] for a in d.values())


@pytest.mark.parametrize("spec", ["hlc", "srap", "tdc", "6bit", "teacache", "fora", "fbcache", "dbcache", "pab",
                                  "interval", "quantcache", "aigq", "dmpq"])
def test_every_policy_runs_end_to_end(tiny, spec):
    over = {"dbcache.warmup": 2} if spec == "dbcache" else {}
    video, res = generate(tiny, [PROMPT], _settings(tiny, steps=6), policy=get_policy(spec, over), progress=False)
    assert torch.isfinite(video).all() and len(res.steps) == 6
