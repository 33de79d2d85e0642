"""SRAP's calibration chooses thresholds by their measured fidelity cost (issue 12): at defaults the thresholds it
writes never cost more than the budget when run, and where pruning is safe (a block that is nearly the identity) it
prunes that block — and only that block — with the calibrated plan at SRAP's defaults."""

from __future__ import annotations

import copy

import pytest
import torch

SMALL = dict(frames=4, height=16, width=16)
STEPS = 10
CALIB_PROMPTS = ["a red circle moving right on a black background", "a green triangle moving down on a white background"]
NEAR_IDENTITY = "spatial_2"


@pytest.fixture(scope="module")
def qc_ref():
    from qc_compile.models import load_model

    torch.set_grad_enabled(False)
    return load_model("qc-ref")  # the shipped weights


def _settings(loaded):
    from qc_compile.runtime.generation import GenerationSettings

    return GenerationSettings.defaults(loaded, steps=STEPS, seed=5, **SMALL)


def _calibrate(loaded):
    from qc_compile.calib import srap as srap_calib
    from qc_compile.calib.runtime_params import measure

    s = _settings(loaded)
    _, sig = measure(loaded, CALIB_PROMPTS, s)
    return s, srap_calib.calibrate(sig.grid, sig.prune_error, sig.evaluate)


def _run(loaded, spec: str, params: dict | None, prompt: str, seed: int):
    """(video, record) of one prompt through the public pipeline (not the calibration's own evaluator)."""
    from qc_compile.runtime import Pipeline
    from qc_compile.runtime.policies import get_policy

    pipe = Pipeline.from_pretrained("qc-ref")
    pipe.loaded = loaded
    plan = {"cache_policy": {"name": "none", "params": {"srap": params}}} if params else None
    res = pipe(prompt, policy=get_policy(spec, None, plan, seed=seed), seed=seed, steps=STEPS, **SMALL)
    return res.videos, res


def _measured_cost(loaded, s, params) -> tuple[float, list[str]]:
    """Mean PSNR drop (dB, vs full compute) of hlc+srap(params) from hlc alone on the calibration prompts, and the
    units SRAP pruned."""
    from qc_compile.calib import srap as srap_calib
    from qc_compile.metrics.fidelity import psnr

    drops, pruned = [], []
    for k, prompt in enumerate(CALIB_PROMPTS):
        seed = s.seed + k
        fp, _ = _run(loaded, "none", None, prompt, seed)
        hlc, _ = _run(loaded, "hlc", None, prompt, seed)
        q, rec = _run(loaded, "hlc+srap", params, prompt, seed)
        cap = srap_calib.PSNR_CAP
        drops.append(min(cap, psnr(hlc, fp)) - min(cap, psnr(q, fp)))
        pruned += [u for st in rec.steps for u, d in st.decisions.items() if d["action"] == "prune"]
    return sum(drops) / len(drops), pruned


@pytest.mark.slow  # ~20 s on one CPU thread: calibration with its end-to-end candidate runs, then the check runs
def test_calibrated_srap_stays_within_its_budget_on_shipped_qc_ref(qc_ref):
    from qc_compile.calib import srap as srap_calib

    s, cal = _calibrate(qc_ref)
    rep = cal.report
    assert rep["validated"] and rep["candidates"], rep  # candidates were run end to end
    for c in rep["candidates"]:  # every candidate's verdict follows from its measured numbers
        assert c["passes"] == (c["cost_db_mean"] <= rep["budget_db"] and c["cost_db_max"] <= 2 * rep["budget_db"])
    cost, pruned = _measured_cost(qc_ref, s, cal.params)
    if cal.pruning_units:
        assert rep["chosen"]["saved_points"] >= srap_calib.DEFAULT_MIN_SAVING
        assert cost <= srap_calib.DEFAULT_BUDGET_DB + 0.05, (cost, rep["chosen"])
        assert set(pruned) <= set(cal.pruning_units)
    else:  # nothing safe: the plan never prunes, and says why with the data
        assert not pruned and "reason" in rep and "dB" in rep["reason"]
        assert all(d["tau_high"] == srap_calib.NEVER for d in cal.params["units"].values())
        assert all("cos" in u for u in rep["units"].values())


@pytest.mark.slow  # ~20 s
def test_calibrated_srap_prunes_a_near_identity_block_and_only_it(qc_ref):
    """Scale one block's output projections by 1e-3 (its output ~ its input): pruning it is safe and calibrate must
    find that; the model's real blocks cost fidelity and must stay computed."""
    loaded = copy.deepcopy(qc_ref)
    b = loaded.model.block(NEAR_IDENTITY)
    for lin in (b.attn.proj, b.cross_attn.proj, b.mlp.fc2):
        lin.weight.mul_(1e-3)
        lin.bias.mul_(1e-3)
    s, cal = _calibrate(loaded)
    assert cal.pruning_units == [NEAR_IDENTITY], cal.report
    assert cal.report["ranking"][0] == NEAR_IDENTITY
    cost, pruned = _measured_cost(loaded, s, cal.params)
    assert pruned and set(pruned) == {NEAR_IDENTITY}, "SRAP never pruned with a calibrated plan at its defaults"
    assert cost <= 0.5
    # SRAP alone at its defaults with this plan prunes it too (and nothing else)
    _, rec = _run(loaded, "srap", cal.params, CALIB_PROMPTS[0], 0)
    assert {u for st in rec.steps for u, d in st.decisions.items() if d["action"] == "prune"} == {NEAR_IDENTITY}


def test_no_end_to_end_evaluation_means_no_pruning(qc_ref):
    from qc_compile.calib import srap as srap_calib
    from qc_compile.calib.runtime_params import measure

    _, sig = measure(qc_ref, CALIB_PROMPTS[:1], _settings(qc_ref))
    cal = srap_calib.calibrate(sig.grid, lambda p, st, u: 0.01, None)
    assert not cal.pruning_units and "no end-to-end" in cal.report["reason"]


def test_aigq_store_evaluator_reproduces_the_statistics_pass(qc_ref, tmp_path):
    """The AIGQ path evaluates candidates against the FP finals in its statistics store: with nothing pruned and every
    unit computed (``none``-like HLC on so few steps), the evaluator must reproduce those finals (same noise seeds,
    captions and sampler), and a pruned unit must show up as a cost and a saving."""
    from qc_compile.calib import srap as srap_calib
    from qc_compile.calib.collect import CollectSettings, collect, text_captions
    from qc_compile.calib.runtime_params import store_signals

    caps = text_captions(qc_ref, CALIB_PROMPTS)
    st = CollectSettings(steps=3, cfg=4.0, seed=3, frames=4, height=16, width=16, fps=8, shift=4.0)
    store = collect(qc_ref, caps, st, tmp_path / "stats", weights_id="w", progress=False)
    sig = store_signals(qc_ref, store, caps, st)
    base = sig.evaluate(None)
    assert len(base.psnr_db) == 2 and min(base.psnr_db) >= srap_calib.PSNR_CAP - 1e-6, base
    units = {u: {"tau_low": -1.0, "tau_high": -1.0} for u in ("temporal_1",)}  # prune whenever SRAP may act
    fid = sig.evaluate({"tau_low": 1.0, "tau_high": 1.0, "units": units, "warmup": 1, "tail": 0})
    assert fid.compute < base.compute and max(fid.psnr_db) < srap_calib.PSNR_CAP
