"""Step policies on synthetic statistics: each rule, its thresholds, guards and parameter validation (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qc_compile.errors import UserError
from qc_compile.runtime.policy import Action, StepInfo, StepStats, UnitDecision
from qc_compile.runtime.policies import (COMBINATIONS, Compose, get_policy, merge_decisions, plan_sections,
                                         policy_names)
from qc_compile.runtime.policies.peers import TEACACHE_OPENSORA_COEFFICIENTS

UNITS = ("embed", "spatial_0", "temporal_0", "spatial_1", "temporal_1", "final")
BLOCKS = UNITS[1:-1]


def info(i, n=10, t=None):
    t = 1000.0 * (1 - i / n) if t is None else t
    return StepInfo(i, n, t, 1.0 / n, UNITS)


def stats(decisions, **per_unit):
    """Stats as the executor reports them: computed units get per_unit values (default: a small residual change)."""
    vals = {}
    for u in BLOCKS:
        d = decisions.get(u, UnitDecision())
        if d.action is Action.COMPUTE:
            vals[u] = {"res_norm": 1.0, "action": 0.0, "res_rel_l1": 0.01, "motion": 1.0, "cos_prev": 0.5,
                       "in_out_rel_l1": 0.1, "in_outlier": 5.0}
            vals[u].update(per_unit.get(u, per_unit.get("all", {})))
        else:
            vals[u] = {"action": 1.0 if d.action is Action.REUSE else 2.0}
    vals["embed"] = dict(per_unit.get("embed", {}))
    return StepStats(UNITS, vals)


def drive(policy, n=10, per_step=None):
    """Run decide/observe over n steps; returns a list of {unit: action letter}."""
    policy.reset(UNITS, n)
    rows = []
    for i in range(n):
        d = dict(policy.decide(info(i, n)))
        extra = per_step(i) if per_step else {}
        rows.append("".join({"compute": "C", "reuse": "r", "prune": "."}[d.get(u, UnitDecision()).action.value]
                            for u in BLOCKS))
        policy.observe(info(i, n), stats(d, **extra))
    return rows


def column(rows, k):
    return "".join(r[k] for r in rows)


# ------------------------------------------------------------------------------------------------------------ HLC
# The synthetic-statistics tests below pin HLC's structure (intervals 1/2/4, warm-up 2, tail 1, moreg) so that they
# test the rules, not the qc-ref-tuned defaults.
HLC_BASE = {"tau_min": 1, "tau_mid": 2, "tau_max": 4, "warmup": 2, "tail": 1, "motion": "moreg"}
def test_hlc_low_divergence_reuses_until_refresh_interval():
    pol = get_policy("hlc", HLC_BASE | {"delta1": 0.05, "delta2": 0.1, "tau_max": 3, "warmup": 2, "tail": 0, "motion": "none",
                             "align": False})
    rows = drive(pol, 12)
    # computed at 0, 1 (warmup: D measured at step 1), then every tau_max = 3 steps: refresh interval forces compute
    assert column(rows, 0) == "CCrrCrrCrrCr"


def test_hlc_decisions_change_as_threshold_crosses():
    per = lambda i: {"all": {"res_rel_l1": 0.08}}  # noqa: E731  D = 0.08 / k
    low = drive(get_policy("hlc", HLC_BASE | {"delta1": 0.05, "delta2": 0.5, "motion": "none", "tail": 0, "align": False}), 12,
                per)
    high = drive(get_policy("hlc", HLC_BASE | {"delta1": 0.01, "delta2": 0.02, "motion": "none", "tail": 0}), 12, per)
    assert column(high, 0) == "C" * 12  # D >= delta2 -> tau_min = 1
    # step 1: D = 0.08 in [delta1, delta2) -> tau_mid = 2; step 3: D = 0.08 / 2 < delta1 -> tau_max = 4
    assert column(low, 0)[:8] == "CCrCrrrC"


def test_hlc_aligned_refresh_sets_nest():
    # spatial_0 changes little (tau_max = 4), temporal_0 moderately (tau_mid = 2), spatial_1 a lot (tau_min = 1)
    per = {"spatial_0": {"res_rel_l1": 0.01}, "temporal_0": {"res_rel_l1": 0.07}, "spatial_1": {"res_rel_l1": 0.5},
           "temporal_1": {"res_rel_l1": 0.5}}

    def scaled(i):  # residual drift proportional to the gap, so the rate stays put
        return per

    pol = get_policy("hlc", HLC_BASE | {"delta1": 0.05, "delta2": 0.1, "warmup": 2, "tail": 0, "motion": "none"})
    pol.reset(UNITS, 14)
    seen = {u: "" for u in BLOCKS}
    last = {u: 0 for u in BLOCKS}
    for i in range(14):
        d = dict(pol.decide(info(i, 14)))
        for u in BLOCKS:
            a = d.get(u, UnitDecision()).action
            seen[u] += "C" if a is Action.COMPUTE else "r"
        st = {u: {"res_rel_l1": per[u]["res_rel_l1"] * max(1, i - last[u])} for u in BLOCKS}
        for u in BLOCKS:
            if seen[u][-1] == "C":
                last[u] = i
        pol.observe(info(i, 14), stats(d, **st))
    assert seen["spatial_0"] == "CCCrrrCrrrCrrr"
    assert seen["temporal_0"] == "CCCrCrCrCrCrCr"
    assert seen["spatial_1"] == "C" * 14
    for i in range(2, 14):  # every tau_max refresh is a tau_mid refresh
        if seen["spatial_0"][i] == "C":
            assert seen["temporal_0"][i] == "C"
    with pytest.raises(UserError, match="nested intervals"):
        get_policy("hlc", HLC_BASE | {"tau_max": 3})


def test_hlc_motion_term_scales_divergence():
    pol = get_policy("hlc", HLC_BASE | {"delta1": 0.05, "delta2": 0.1, "motion": "moreg", "tail": 0})
    rows = drive(pol, 8, lambda i: {"all": {"res_rel_l1": 0.04, "motion": 3.0}})  # D = 0.04 * 3 = 0.12 >= delta2
    assert column(rows, 0) == "C" * 8
    rows = drive(pol, 8, lambda i: {"all": {"res_rel_l1": 0.04, "motion": 0.5}})  # D = 0.02 < delta1
    assert "r" in column(rows, 0)
    assert pol.divergence("spatial_0", 0.1, 2, 0.5) == pytest.approx(0.05 * 0.5)


def test_hlc_tail_and_warmup_compute_and_per_unit_thresholds():
    pol = get_policy("hlc", HLC_BASE | {"delta1": 0.05, "delta2": 0.1, "tau_max": 4, "warmup": 3, "tail": 2, "motion": "none",
                             "units": {"temporal_1": {"delta1": 0.0, "delta2": 0.0}}})
    rows = drive(pol, 12)
    assert column(rows, 0)[:3] == "CCC" and column(rows, 0)[-2:] == "CC"
    assert column(rows, 3) == "C" * 12  # its thresholds are 0: always tau_min


@pytest.mark.parametrize("params,field", [({"delta1": 0.2, "delta2": 0.1}, "hlc.delta1"),
                                          ({"delta1": -1}, "hlc.delta1"), ({"tau_max": 0}, "hlc.tau_max"),
                                          ({"tau_min": 3, "tau_mid": 2}, "hlc.tau_min"), ({"motion": "x"}, "hlc.motion"),
                                          ({"warmup": 0}, "hlc.warmup"), ({"nope": 1}, "nope")])
def test_hlc_invalid_parameters(params, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        get_policy("hlc", params)


def test_hlc_reuses_only_what_was_computed_and_recomputes_after_other_policy_pruned():
    pol = get_policy("hlc", HLC_BASE | {"delta1": 0.05, "delta2": 0.1, "tau_max": 3, "warmup": 2, "tail": 0, "motion": "none",
                             "align": False})
    pol.reset(UNITS, 10)
    for i in range(2):
        d = pol.decide(info(i))
        pol.observe(info(i), stats(d))
    d = dict(pol.decide(info(2)))
    assert d["spatial_0"].action is Action.REUSE
    # step 4 would refresh; suppose SRAP pruned spatial_0 there: it stays due and is computed at step 5
    pol.observe(info(2), stats(d))
    d = dict(pol.decide(info(3)))
    pol.observe(info(3), stats(d))
    d = dict(pol.decide(info(4)))
    assert "spatial_0" not in d  # compute
    pruned = dict(d, spatial_0=UnitDecision(Action.PRUNE))
    pol.observe(info(4), stats(pruned))
    assert "spatial_0" not in dict(pol.decide(info(5)))


# ----------------------------------------------------------------------------------------------------------- SRAP
def test_srap_probability_regions_and_v_modifier():
    pol = get_policy("srap", {"tau_low": 0.9, "tau_high": 0.99, "p_base": 0.2, "delta_low": 0.1, "delta_high": 1.0,
                              "boost": 2.0, "damp": 0.5})
    assert pol.probability(0.995, None) == 1.0
    assert pol.probability(0.95, None) == 0.2
    assert pol.probability(0.5, None) == 0.0
    assert pol.probability(0.95, 0.05) == pytest.approx(0.4)  # refining: boost redundant units
    assert pol.probability(0.5, 0.05) == 0.0  # non-redundant stay unpruned
    assert pol.probability(0.995, 2.0) == pytest.approx(0.5)  # drastic change: damp
    assert pol.probability(0.95, 0.5) == 0.2


def test_srap_variation_sums_cumulative_latent_changes():
    pol = get_policy("srap", {"window": 3})
    pol.reset(UNITS, 10)
    for d in (0.1, 0.2, 0.3):
        pol.latent_changes.append(d)
    # newest first 0.3, 0.2, 0.1: ‖z_t - z_{t-1}‖ + ‖z_t - z_{t-2}‖ + ‖z_t - z_{t-3}‖ ≈ 0.3 + 0.5 + 0.6
    assert pol.variation() == pytest.approx(1.4)


def _srap_rows(seed, n=30, **kw):
    params = {"tau_low": 0.0, "tau_high": 1.0, "p_base": 0.5, "warmup": 1, "tail": 0, "seed": seed, **kw}
    return drive(get_policy("srap", params), n, lambda i: {"all": {"cos_prev": 0.5}})


def test_srap_is_reproducible_for_a_seed_and_differs_for_another():
    a, b, c = _srap_rows(1), _srap_rows(1), _srap_rows(2)
    assert a == b and a != c
    assert all(r[0] == "C" for r in a)  # the first block unit has no predecessor: never pruned
    assert any("." in r for r in a)


def test_srap_no_adjacent_prunes_and_prunes_only_known_similarity():
    rows = _srap_rows(3, p_base=1.0)
    for r in rows[1:]:
        assert ".." not in r
    rows = drive(get_policy("srap", {"tau_low": 0.0, "tau_high": 1.0, "p_base": 1.0, "warmup": 0, "tail": 0}), 3)
    assert rows[0] == "CCCC"  # nothing measured yet at step 0


def test_srap_threshold_crossing():
    hi = drive(get_policy("srap", {"tau_low": 0.9, "tau_high": 0.95, "warmup": 1, "tail": 0}), 6,
               lambda i: {"all": {"cos_prev": 0.97}})
    lo = drive(get_policy("srap", {"tau_low": 0.98, "tau_high": 0.99, "warmup": 1, "tail": 0}), 6,
               lambda i: {"all": {"cos_prev": 0.97}})
    assert any("." in r for r in hi[1:]) and not any("." in r for r in lo)


def test_srap_invalid_thresholds():
    with pytest.raises(UserError, match=r"srap\.tau_low"):
        get_policy("srap", {"tau_low": 0.99, "tau_high": 0.9})
    with pytest.raises(UserError, match=r"srap\.p_base.*\[0, 1\]"):
        get_policy("srap", {"p_base": 1.5})


# ------------------------------------------------------------------------------------------------------------ TDC
def test_tdc_skips_stable_units_at_most_max_skip_in_a_row():
    rows = drive(get_policy("tdc", {"thresh": 0.05, "acc_thresh": 1.0, "max_skip": 2, "warmup": 2, "tail": 0}), 12)
    assert column(rows, 0) == "CCrrCrrCrrC"[:11] + column(rows, 0)[11]
    assert "rrr" not in column(rows, 0)


def test_tdc_accumulated_error_guard_forces_refresh():
    pol = get_policy("tdc", {"thresh": 0.05, "acc_thresh": 0.06, "max_skip": 5, "warmup": 2, "tail": 0})
    pol.reset(UNITS, 10)
    seq, last = [], 0
    for i in range(10):
        d = dict(pol.decide(info(i)))
        act = d.get("spatial_0", UnitDecision()).action
        seq.append("C" if act is Action.COMPUTE else "r")
        gap = i - last
        if act is Action.COMPUTE:
            last = i
        # the residual drifts 0.04 per step: e = 0.04; a second skip would make E_acc = 0.08 > 0.06
        pol.observe(info(i), stats(d, all={"res_rel_l1": 0.04 * max(gap, 1)}))
    assert "".join(seq) == "CCrCrCrCrC"
    loose = get_policy("tdc", {"thresh": 0.05, "acc_thresh": 1.0, "max_skip": 5, "warmup": 2, "tail": 0})
    assert "rrr" in column(drive(loose, 10), 0)  # without the guard the run is limited by max_skip only


def test_tdc_unstable_units_are_computed_and_pdr_refreshes_high():
    rows = drive(get_policy("tdc", {"thresh": 0.05}), 8, lambda i: {"all": {"res_rel_l1": 0.2}})
    assert column(rows, 0) == "C" * 8
    pol = get_policy("tdc", {"thresh": 0.05, "acc_thresh": 1.0, "warmup": 2, "tail": 0})
    pol.reset(UNITS, 10)
    variants = []
    for i in range(6):
        d = dict(pol.decide(info(i)))
        variants.append(d.get("spatial_0", UnitDecision()).variant if d.get("spatial_0", UnitDecision()).action
                        is Action.COMPUTE else "-")
        pol.observe(info(i), stats(d, spatial_0={"in_outlier": 30.0 if i >= 3 else 5.0}))
    assert variants == ["default", "default", "-", "-", "high", "-"]
    pol.reset(UNITS, 10)
    for i in range(6):  # outlier ratio above 25 at the last computation: refresh unquantized
        d = dict(pol.decide(info(i)))
        if i == 4:
            assert d["spatial_0"].variant == "fp"
        pol.observe(info(i), stats(d, spatial_0={"in_outlier": 30.0}))


# ------------------------------------------------------------------------------------------- precision and VC
def test_aigq_direction_and_post_skip_rule():
    pol = get_policy("aigq", {"theta1": 0.02, "theta2": 0.05, "post_skip": 2})
    for rate, want in ((0.01, "low"), (0.03, "default"), (0.08, "high")):
        pol.reset(UNITS, 10)
        pol.observe(info(0), stats({}))
        pol.observe(info(1), stats({}, all={"res_rel_l1": rate}))
        assert pol.step_variant(info(2)) == want  # small change between steps -> fewer bits
    pol = get_policy("aigq", {"post_skip": 2})
    pol.reset(UNITS, 10)
    pol.observe(info(0), stats({}))
    assert "spatial_0" not in pol.decide(info(1))
    assert pol.decide(info(3))["spatial_0"].variant == "high"  # two steps skipped since step 0


def test_schedule_from_plan_and_step_mismatch():
    plan = {"schedule": ["high", "default", "low"]}
    pol = get_policy("schedule", None, plan)
    pol.reset(UNITS, 3)
    assert pol.decide(info(0, 3))["spatial_0"].variant == "high"
    assert pol.decide(info(1, 3)) == {}
    pol.reset(UNITS, 5)  # calibrated for 3 steps: resampled by relative position, first and last kept
    assert pol.step_variants == ["high", "high", "default", "low", "low"]
    assert pol.decide(info(4, 5))["spatial_0"].variant == "low"
    with pytest.raises(UserError, match="needs a precision schedule"):
        get_policy("schedule")


def test_dmpq_routes_by_predicted_error():
    pol = get_policy("dmpq", None, {"cache_policy": {"name": "dmpq", "params": {"dmpq": {"a": 2.0, "b": 0.1,
                                                                                         "threshold": 0.5}}}})
    pol.reset(UNITS, 10)
    assert pol.decide(info(0))["spatial_0"].variant == "high"  # no Γ yet
    pol.observe(info(0), stats({}, spatial_0={"in_out_rel_l1": 0.1}, temporal_0={"in_out_rel_l1": 0.3}))
    d = pol.decide(info(1))
    assert "spatial_0" not in d  # 2·0.1 + 0.1 = 0.3 <= 0.5: default (low precision)
    assert d["temporal_0"].variant == "high"  # 0.7 > 0.5
    assert pol.decide(info(3))["spatial_0"].variant == "high"  # not computed at step 2: Γ_{t-1} unknown


def test_vc_post_step_and_validation():
    import torch

    pol = get_policy("vc", None, {"vc": {"factors": [[1.0, 2.0, 0.5]] * 4}})
    pol.reset(UNITS, 4)
    z = torch.randn(2, 3, 4, 5, 5)
    out = pol.post_step(z, info(1, 4))
    mu = z.mean(dim=(2, 3, 4), keepdim=True)
    assert torch.allclose(out[:, 0], z[:, 0], atol=1e-6)
    assert torch.allclose(out[:, 1] - mu[:, 1], 2 * (z[:, 1] - mu[:, 1]), atol=1e-5)
    assert torch.allclose(out.mean(dim=(2, 3, 4)), z.mean(dim=(2, 3, 4)), atol=1e-5)  # the mean is kept
    with pytest.raises(UserError, match="4 steps but this run has 6"):
        pol.reset(UNITS, 6)
    with pytest.raises(UserError, match="needs per-step, per-channel factors"):
        get_policy("vc")
    plan = {"vc": {"tensor": "vc"}, "tensors": {"vc": np.ones((4, 3))}}
    assert plan_sections(plan)["vc"]["factors"] == [[1.0] * 3] * 4


# ----------------------------------------------------------------------------------------------------------- peers
def test_static_interval_and_fora_schedules():
    rows = drive(get_policy("interval", {"interval": 3, "tail": 1}), 10)
    assert column(rows, 0) == "CrrCrrCrrC"
    pol = get_policy("fora")
    pol.reset(UNITS, 10)
    full = [bool(pol.full_step(info(i))) for i in range(10)]
    # countdown r = 9 - i; full at i = 0 and r % 3 == 0 -> i = 0, 3, 6, 9 (the last step is always computed)
    assert [i for i, f in enumerate(full) if f] == [0, 3, 6, 9]
    d = pol.decide(info(1))
    assert d["spatial_0"].parts == ("attn", "cross", "mlp") and d["spatial_0"].regate
    assert pol.decide(info(3))["spatial_0"].parts == ()


def test_teacache_accumulates_rescaled_distance_and_resets():
    pol = get_policy("teacache", {"rel_l1_thresh": 0.1})
    pol.reset(UNITS, 8)
    poly = np.poly1d(TEACACHE_OPENSORA_COEFFICIENTS)
    assert poly(0.0) == pytest.approx(0.0484426240)
    opened = []
    for i, val in enumerate([math.inf, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0]):
        d = pol.decide(info(i, 8))
        assert all(x.action is Action.GATED and x.gate.probe == "modulated_input" for x in d.values())
        opened.append(next(iter(d.values())).gate.opens(val))
    # first step forced; 0.048 accumulates: 0.048, 0.097 (< 0.1: reuse), 0.145 -> compute and reset; 0.3 -> compute;
    # the last step is always computed
    assert opened == [False, True, True, False, True, False, True, False]
    assert pol.history[2]["acc"] == pytest.approx(2 * poly(0.0))


def test_fbcache_and_dbcache_partition_and_gate():
    pol = get_policy("fbcache")
    pol.reset(UNITS, 10)
    d = pol.decide(info(3))
    assert "spatial_0" not in d and all(d[u].action is Action.GATED for u in BLOCKS[1:])
    gate = d["temporal_0"].gate
    assert gate.probe == "residual"
    assert gate.opens(0.05) and not gate.opens(0.07) and not gate.opens(math.inf)
    db = get_policy("dbcache", {"fn": 1, "bn": 1, "warmup": 2, "max_continuous_cached_steps": 2})
    db.reset(UNITS, 10)
    assert set(db.decide(info(0))) == {"temporal_0", "spatial_1"}
    assert not db.decide(info(1))["temporal_0"].gate.opens(0.0)  # warmup: never cached (reference refreshed)
    opens = [db.decide(info(i))["temporal_0"].gate.opens(0.0) for i in range(2, 8)]
    assert opens == [True, True, False, True, True, False]  # at most 2 continuous cached steps
    with pytest.raises(UserError, match="leaves no middle units"):
        get_policy("dbcache", {"fn": 3, "bn": 1}).reset(UNITS, 10)


def test_pab_ranges_window_and_mlp_broadcast():
    pol = get_policy("pab", {"mlp_match": "nearest", "mlp_steps": [700], "mlp_blocks": [0]})
    n = 10
    pol.reset(UNITS, n)
    parts = {}
    for i in range(n):
        parts[i] = {u: d.parts for u, d in pol.decide(info(i, n)).items()}
    # t = 1000, 900, ..., 100; window (450, 930) holds steps 1..5
    assert parts[0]["spatial_0"] == () and parts[6]["spatial_0"] == ()
    assert "attn" in parts[1]["spatial_0"] and "attn" not in parts[2]["spatial_0"]  # spatial range 2
    assert "attn" in parts[2]["temporal_0"] and "attn" not in parts[4]["temporal_0"]  # temporal range 4
    assert all("cross" in parts[i]["spatial_1"] for i in (1, 2, 3, 4, 5))  # cross range 6: step 6 is out of window
    # t = 700 is step 3: saves; steps 4 and 5 reuse the MLP of block 0 (spatial and temporal), not of block 1
    assert "mlp" not in parts[3]["spatial_0"] and "mlp" in parts[4]["spatial_0"] and "mlp" in parts[5]["temporal_0"]
    assert "mlp" not in parts[6]["spatial_0"] and "mlp" not in parts[4]["spatial_1"]
    exact = get_policy("pab")  # Open-Sora's keys never occur on a uniform 10-step schedule
    exact.reset(UNITS, n)
    assert not any("mlp" in (d.parts or ()) for i in range(n) for d in exact.decide(info(i, n)).values())


# -------------------------------------------------------------------------------------------------------- registry
def test_registry_names_combinations_and_errors():
    assert {"quantcache", "6bit", "hlc", "srap", "tdc", "teacache", "fora", "fbcache", "dbcache", "pab", "none",
            "vc"} <= set(policy_names())
    qc = get_policy("quantcache")
    assert isinstance(qc, Compose) and [c.name for c in qc.components] == list(COMBINATIONS["quantcache"])
    assert [c.name for c in get_policy("hlc+srap").components] == ["hlc", "srap"]
    with pytest.raises(UserError, match="unknown policy 'bogus'"):
        get_policy("hlc+bogus")
    with pytest.raises(UserError, match="several components have"):
        get_policy("hlc+srap", {"warmup": 3})
    with pytest.raises(UserError, match="not part of this run's policy"):
        get_policy("hlc", HLC_BASE | {"srap.p_base": 0.3})
    p = get_policy("hlc+srap", {"p_base": "0.3", "hlc.delta1": "0.01"})
    assert p.components[1].p_base == 0.3 and p.components[0].delta1 == 0.01
    with pytest.raises(UserError, match=r"teacache\.rel_l1_thresh = 'abc'"):
        get_policy("teacache", {"rel_l1_thresh": "abc"})


def test_plan_parameters_then_overrides():
    plan = {"cache_policy": {"name": "quantcache", "params": {"hlc": {"delta1": 0.03, "delta2": 0.2},
                                                              "srap": {"p_base": 0.0}}}}
    p = get_policy("quantcache", {"hlc.delta1": 0.05}, plan)
    hlc, aigq, srap = p.components
    assert (hlc.delta1, hlc.delta2, srap.p_base) == (0.05, 0.2, 0.0)
    with pytest.raises(UserError, match=r"plan\.json policy\.hlc: policy 'hlc' has no parameter 'bad'"):
        get_policy("hlc", None, {"cache_policy": {"name": "hlc", "params": {"hlc": {"bad": 1}}}})
    flat = get_policy("teacache", None, {"cache_policy": {"name": "teacache", "params": {"rel_l1_thresh": 0.2}}})
    assert flat.rel_l1_thresh == 0.2


def test_merge_rules():
    c, r, p = UnitDecision(), UnitDecision(Action.REUSE), UnitDecision(Action.PRUNE)
    m = merge_decisions([{"a": c, "b": r, "c": UnitDecision(Action.COMPUTE, "low")},
                         {"a": p, "b": p, "c": UnitDecision(Action.COMPUTE, "high")}])
    assert m["a"].action is Action.PRUNE and m["b"].action is Action.REUSE and m["c"].variant == "high"
    m = merge_decisions([{"a": UnitDecision(Action.COMPUTE, "low")}, {"a": c}])
    assert m["a"].variant == "default"


def test_quantcache_combination_on_synthetic_stats():
    pol = get_policy("quantcache", {**{f"hlc.{k}": v for k, v in HLC_BASE.items()}, "hlc.delta1": 0.05, "hlc.delta2": 0.1, "hlc.motion": "none", "hlc.tail": 0,
                                    "srap.tau_low": 0.0, "srap.tau_high": 1.0, "srap.p_base": 1.0,
                                    "aigq.post_skip": 3})
    rows = drive(pol, 12, lambda i: {"all": {"cos_prev": 0.9}})
    assert column(rows, 0) == "CCCrrrCrrrCr"  # HLC: tau_max = 4 on the grid (i - warmup) % 4 == 0
    assert any("." in r for r in rows)  # SRAP prunes units HLC would compute
    pol.reset(UNITS, 12)
    for i in range(2):
        d = pol.decide(info(i, 12))
        pol.observe(info(i, 12), stats(d))
    for i in range(2, 6):
        d = pol.decide(info(i, 12))
        pol.observe(info(i, 12), stats(d))
    d = pol.decide(info(6, 12))
    assert d["spatial_0"].action is Action.COMPUTE and d["spatial_0"].variant == "high"  # post-skip refresh
