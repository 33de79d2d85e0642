"""qc_compile.enable(pipe): a diffusers pipeline's transformer runs through the step policies."""

from __future__ import annotations

from typing import Mapping

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers_helpers import randn, rel_err, run_wan_pipeline, tiny_cogvideox, tiny_wan, tiny_wan_pipeline  # noqa: E402

import qc_compile  # noqa: E402
from qc_compile.errors import UserError  # noqa: E402
from qc_compile.runtime.policy import Action, StepInfo, UnitDecision  # noqa: E402


class ReuseAt:
    """Test policy: reuse every block at the given steps, compute otherwise."""

    name = "reuse_at"

    def __init__(self, steps: set[int]) -> None:
        self.at = steps

    def reset(self, unit_names, num_steps) -> None:
        self.blocks = [u for u in unit_names if u.startswith("block_")]
        self.observed: list[int] = []

    def decide(self, step: StepInfo) -> Mapping[str, UnitDecision]:
        return {u: UnitDecision(Action.REUSE) for u in self.blocks} if step.index in self.at else {}

    def observe(self, step, stats) -> None:
        self.observed.append(step.index)


def _watch(transformer):
    """Per call: (step index of the pipeline's cache context, output, plain forward on the same inputs)."""
    calls = []

    def hook(module, args, kwargs, out):
        plain = type(module).forward(module, *args, **kwargs)
        calls.append((out[0] if isinstance(out, tuple) else out.sample,
                      plain[0] if isinstance(plain, tuple) else plain.sample))
    return calls, transformer.register_forward_hook(hook, with_kwargs=True)


@torch.no_grad()
def test_enable_none_is_identical_and_reuse_changes_only_reused_steps():
    pipe = tiny_wan_pipeline(seed=3)
    ref = run_wan_pipeline(pipe)
    session = qc_compile.enable(pipe, policy="none")
    assert torch.equal(run_wan_pipeline(pipe), ref)  # bit-identical through the units
    assert session.compute_fraction == 1.0 and len(session.steps) == 6
    assert qc_compile.disable(pipe) == [session]
    assert "forward" not in pipe.transformer.__dict__ and torch.equal(run_wan_pipeline(pipe), ref)

    policy = ReuseAt({2, 4})
    session = qc_compile.enable(pipe, policy=policy)
    calls, handle = _watch(pipe.transformer)
    out = run_wan_pipeline(pipe)
    handle.remove()
    qc_compile.disable(pipe)
    assert len(calls) == 12  # 6 steps x (cond, uncond)
    for i, (got, plain) in enumerate(calls):
        step = i // 2
        if step in (2, 4):
            assert rel_err(got, plain) > 1e-6, step  # a cached residual replaced the blocks' computation
        else:
            assert torch.equal(got, plain), step  # computed steps: exactly the model's own forward
    assert rel_err(out, ref) > 1e-6
    assert policy.observed == [0, 1, 2, 3, 4, 5]
    assert session.compute_fraction == pytest.approx(4 / 6)
    assert [s.decisions.get("block_0", {}).get("action") for s in session.steps] == \
        [None, None, "reuse", None, "reuse", None]


class ExtrapolatingReuseAt(ReuseAt):
    name = "reuse_at_extrapolating"
    extrapolation = 0.5


@torch.no_grad()
def test_enable_hands_the_policy_s_reuse_extrapolation_to_every_branch():
    """The executors of an enabled pipeline follow the policy (as the sampler's do): a policy that extrapolates its
    reuse changes the reused steps' output, at the pipeline's step index in each CFG branch."""
    pipe = tiny_wan_pipeline(seed=3)
    plain = ReuseAt({2, 4})
    qc_compile.enable(pipe, policy=plain)
    ref = run_wan_pipeline(pipe)
    session = qc_compile.disable(pipe)[0]
    assert all(ex.extrapolation == 0.0 for ex in session._executors.values())
    policy = ExtrapolatingReuseAt({2, 4})
    session = qc_compile.enable(pipe, policy=policy)
    out = run_wan_pipeline(pipe)
    qc_compile.disable(pipe)
    assert len(session._executors) == 2
    for ex in session._executors.values():
        assert ex.extrapolation == 0.5 and ex.step_index == 6  # one call per step in each branch
        assert all(ex._older[u][0] == 3 and ex._computed_at[u] == 5 for u in ex.block_units)  # computed 0, 1, 3, 5
    assert rel_err(out, ref) > 1e-6
    qc_compile.enable(pipe, policy="hlc")
    run_wan_pipeline(pipe)
    session = qc_compile.disable(pipe)[0]
    assert all(ex.extrapolation == 0.5 for ex in session._executors.values())


@torch.no_grad()
def test_enable_default_policy_on_a_pipeline_runs_and_traces():
    pipe = tiny_wan_pipeline(seed=4)
    ref = run_wan_pipeline(pipe, steps=30)
    session = qc_compile.enable(pipe)  # policy="quantcache", its defaults
    out = run_wan_pipeline(pipe, steps=30)
    run_wan_pipeline(pipe, steps=30)  # a second generation starts a new run (fresh caches and policy state)
    trace = session.trace()
    qc_compile.disable(pipe)
    assert session.runs == 2 and len(trace["steps"]) == 30
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert session.compute_fraction < 1.0  # HLC reuses on this model at its defaults
    assert rel_err(out, ref) < 0.5


# (policy, overrides that make it act on a random model within 10 steps, what must appear in the record)
KINDS = [
    ("fbcache", {"threshold": 1.0}, ("reuse", ())),                       # GATED, residual probe
    ("teacache", {"rel_l1_thresh": 1e6}, ("reuse", ())),                  # GATED, modulated-input probe
    ("dbcache", {"threshold": 1.0, "warmup": 2}, ("reuse", ())),
    ("pab", {"mlp_match": "nearest", "mlp_steps": [850]}, ("compute", ("attn", "cross"))),  # sub-block parts
    ("fora", {}, ("reuse", ("attn", "cross", "mlp"))),                    # all parts cached, re-gated
    ("srap", {"tau_low": -1.0, "tau_high": -0.5}, ("prune", ())),          # PRUNE
    ("hlc+srap", {"hlc.delta1": 10.0, "hlc.delta2": 10.0}, ("reuse", ())),
]


@pytest.mark.parametrize("policy,overrides,expect", KINDS, ids=[k[0] for k in KINDS])
@torch.no_grad()
def test_enable_runs_every_kind_of_decision_on_a_bare_transformer(policy, overrides, expect):
    """GATED (residual and modulated-input probes), sub-block parts (PAB/FORA), prune: driven through enable() on
    the transformer alone, with the step count given; each kind of decision actually happens and the transformer's
    own forward is back afterwards."""
    tr = tiny_wan(seed=5)
    y = randn(1, 5, 16, seed=6)
    z0 = randn(1, 4, 3, 8, 8, seed=7)
    plain = tr(z0, torch.tensor([999.0]), y, return_dict=False)[0]
    session = qc_compile.enable(tr, policy=policy, overrides=overrides, num_steps=10)
    z = z0
    for i in range(10):
        z = z - 0.1 * tr(z, torch.tensor([1000.0 * (1 - i / 10) - 0.5]), y, return_dict=False)[0]
    qc_compile.disable(tr)
    assert torch.isfinite(z).all()
    assert len(session.steps) == 10
    taken = {(d["action"], tuple(d.get("parts", ()))) for s in session.steps for d in s.decisions.values()}
    assert expect in taken, taken
    assert session.compute_fraction < 1.0 or expect[0] == "compute"
    assert torch.equal(tr(z0, torch.tensor([999.0]), y, return_dict=False)[0], plain)


@torch.no_grad()
def test_enable_cogvideox_transformer_batched_cfg():
    tr = tiny_cogvideox(seed=8, use_rotary_positional_embeddings=True)
    y = randn(2, 7, 16, seed=9)
    z0 = randn(2, 3, 4, 8, 8, seed=10)
    a = qc_compile.models.diffusers_adapter.CogVideoXAdapter(tr)
    rope = a.rotary_embedding(a.geometry_of(z0, text_len=7))

    def loop():
        z = z0.clone()
        for t in (900, 700, 500, 300, 100):
            z = z - 0.1 * tr(z, y, torch.tensor([t, t]), image_rotary_emb=rope, return_dict=False)[0]
        return z

    ref = loop()
    qc_compile.enable(tr, policy="none", num_steps=5)
    assert torch.equal(loop(), ref)
    qc_compile.disable(tr)
    policy = ReuseAt({3})
    session = qc_compile.enable(tr, policy=policy, num_steps=5)
    out = loop()
    qc_compile.disable(tr)
    assert rel_err(out, ref) > 1e-6 and session.compute_fraction == pytest.approx(0.8)


def test_enable_refuses_double_enable_and_diffusers_hooks():
    from diffusers import FirstBlockCacheConfig

    tr = tiny_wan(seed=11)
    qc_compile.enable(tr, policy="none", num_steps=2)
    with pytest.raises(UserError, match="already enabled"):
        qc_compile.enable(tr, policy="none", num_steps=2)
    qc_compile.disable(tr)
    assert qc_compile.disable(tr) == []
    tr.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(UserError, match="diffusers hooks"):
        qc_compile.enable(tr, policy="none", num_steps=2)
    with pytest.raises(UserError, match="unknown policy"):
        qc_compile.enable(tiny_wan(seed=12), policy="nope")
    with pytest.raises(UserError, match="no `transformer`"):
        qc_compile.enable(object())


def test_quantize_fp8_swaps_block_linears_and_disable_restores_them():
    """enable(quantize="fp8"): every block nn.Linear runs W8A8 FP8 on qc-compile's kernels (output moves by FP8's
    error, not more), embed/final stay as they are, and disable() puts the original modules back bit for bit."""
    from torch import nn

    from qc_compile.runtime.fast_linear import FastLinear

    tr = tiny_wan(3, attention_head_dim=16, ffn_dim=64).eval()
    kw = dict(hidden_states=randn(1, 4, 3, 8, 8, seed=1), timestep=torch.tensor([700.0]),
              encoder_hidden_states=randn(1, 6, 16, seed=2), return_dict=False)
    linears = [m for m in tr.blocks.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        ref = tr(**kw)[0]
        session = qc_compile.enable(tr, policy="none", quantize="fp8", num_steps=1)
        assert not any(isinstance(m, nn.Linear) for m in tr.blocks.modules())
        assert sum(isinstance(m, FastLinear) for m in tr.blocks.modules()) == len(linears)
        assert isinstance(tr.proj_out, nn.Linear) and isinstance(tr.condition_embedder.time_proj, nn.Linear)
        q = tr(**kw)[0]
        assert session.trace()["settings"]["quantize"] == "fp8"
        qc_compile.disable(tr)
        back = tr(**kw)[0]
    err = rel_err(q, ref)
    assert 1e-4 < err < 0.15, err  # FP8 E4M3 moves the output, a little
    assert [m for m in tr.blocks.modules() if isinstance(m, nn.Linear)] == linears  # the same objects
    assert torch.equal(back, ref)


def test_quantize_rejects_unknown_formats():
    with pytest.raises(UserError, match="quantize='int3'"):
        qc_compile.enable(tiny_wan(0), policy="none", quantize="int3")


def test_quantize_is_all_or_nothing(monkeypatch):
    """A linear the FP8 kernels refuse mid-way leaves every block linear as it was (no half-quantized model)."""
    from torch import nn

    from qc_compile.runtime import fast_linear

    tr = tiny_wan(4, attention_head_dim=16, ffn_dim=64)
    before = [m for m in tr.blocks.modules() if isinstance(m, nn.Linear)]
    made = []
    real = fast_linear.FastLinear

    def refuse_third(*a, **k):
        made.append(1)
        if len(made) == 3:
            raise UserError("this linear cannot run FP8")
        return real(*a, **k)

    monkeypatch.setattr(fast_linear, "FastLinear", refuse_third)
    with pytest.raises(UserError, match="cannot run FP8"):
        qc_compile.enable(tr, policy="none", quantize="fp8", num_steps=1)
    assert [m for m in tr.blocks.modules() if isinstance(m, nn.Linear)] == before
