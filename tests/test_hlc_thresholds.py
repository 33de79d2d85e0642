"""Per-plan HLC thresholds (issue 12, item 3's compute bar): `calibrate` raises HLC's thresholds for a quantized plan
whose quantization noise raises quantcache's compute above the unquantized model's, keeps the defaults for bf16
plans, and the runtime reads the plan's thresholds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compile_helpers import _ok, copy_of  # noqa: E402

from qc_compile.calib import hlc_thresholds as H  # noqa: E402
from qc_compile.calib.srap import Fidelity  # noqa: E402

SMALL = ["--frames", "4", "--height", "16", "--width", "16"]
STEPS = 12  # HLC acts between its warm-up (3) and tail (2): fewer steps leave nothing to cache


# ------------------------------------------------------------------ the rule, on a scripted evaluation (fast)
def _scripted(fp: float, by_factor: dict[float, tuple[float, float]]):
    """evaluate(params, quantized) -> Fidelity: the unquantized run computes ``fp``; the quantized one at factor f
    (delta / default delta) computes ``by_factor[f][0]`` at mean PSNR ``by_factor[f][1]``. Records the calls."""
    d1, _ = H.defaults()
    calls = []

    def evaluate(params, quantized):
        calls.append((params, quantized))
        if not quantized:
            return Fidelity([40.0, 40.0], fp)
        f = 1.0 if params is None else round(params["delta1"] / d1, 6)
        c, p = by_factor[f]
        return Fidelity([p, p], c)
    return evaluate, calls


def test_rule_picks_the_smallest_factor_that_reaches_the_unquantized_compute():
    ev, calls = _scripted(0.37, {1.0: (0.40, 31.0), 1.1: (0.39, 31.0), 1.25: (0.37, 30.8), 1.5: (0.33, 30.0)})
    cal = H.calibrate(ev, factors=(1.1, 1.25, 1.5))
    d1, d2 = H.defaults()
    assert cal.params == {"delta1": round(1.25 * d1, 6), "delta2": round(1.25 * d2, 6)}
    assert cal.report["chosen"]["factor"] == 1.25
    assert [c[0]["delta1"] for c in calls if c[0]] == [round(1.1 * d1, 6), round(1.25 * d1, 6)]  # stops there
    assert "x1.25" in H.summary_line(cal.report)


def test_rule_meets_the_target_within_one_unit_evaluation_per_video():
    ev, _ = _scripted(0.37, {1.0: (0.40, 31.0), 1.1: (0.373, 30.8), 1.25: (0.36, 29.0)})
    cal = H.calibrate(ev, factors=(1.1, 1.25))  # no resolution given: strict, x1.25 costs 2 dB -> defaults
    assert cal.params is None
    ev.resolution = 1 / 240  # 8 units x 30 steps: 0.417 points
    cal = H.calibrate(ev, factors=(1.1, 1.25))
    assert cal.report["chosen"]["factor"] == 1.1
    ev.resolution = 1 / 960
    assert H.calibrate(ev, factors=(1.1, 1.25)).params is None  # 0.3 points over is more than one evaluation


def test_rule_keeps_defaults_when_the_first_factor_reaching_the_target_costs_too_much():
    ev, _ = _scripted(0.37, {1.0: (0.40, 31.0), 1.1: (0.39, 30.9), 1.25: (0.36, 30.0)})
    cal = H.calibrate(ev, factors=(1.1, 1.25), budget_db=0.5)
    assert cal.params is None and "1.00 dB" in cal.report["reason"]


def test_rule_keeps_defaults_when_no_factor_reaches_the_target_or_none_is_needed():
    ev, _ = _scripted(0.37, {1.0: (0.45, 31.0), **{f: (0.44, 31.0) for f in H.DEFAULT_FACTORS}})
    cal = H.calibrate(ev)
    assert cal.params is None and "no factor" in cal.report["reason"]
    ev, calls = _scripted(0.37, {1.0: (0.37, 31.0)})
    cal = H.calibrate(ev)
    assert cal.params is None and len(calls) == 2 and "already" in cal.report["reason"]  # no extra runs


def test_plan_hlc_section_reaches_the_policy():
    from qc_compile.runtime.policies import get_policy

    plan = {"cache_policy": {"name": "none", "params": {"hlc": {"delta1": 0.2, "delta2": 0.3}}}}
    pol = get_policy("quantcache", None, plan)
    hlc = next(p for p in pol.components if p.name == "hlc")
    assert (hlc.delta1, hlc.delta2) == (0.2, 0.3)


# ------------------------------------------------------------------ end to end on the shipped qc-ref (slow)
@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("hlc") / "exported"
    _ok(["export", "qc-ref", "-o", work, "--quiet", *SMALL])  # the shipped weights
    return work


def _calibrate(src: Path, fmt: str, *extra: str) -> tuple[Path, dict, str]:
    work = copy_of(src, f"hlc-{fmt}")
    out = _ok(["calibrate", work, "--uniform", fmt, "--steps", str(STEPS), "--num-prompts", "2",
               "--no-srap-thresholds", "--quiet", *extra])
    plan = json.loads((work / "plan.json").read_text())
    return work, plan, out


def _compute(work: Path, prompts: list[str], overrides: dict | None = None) -> tuple[float, list]:
    """Mean compute fraction and decision maps of quantcache with the plan (its quantized computation) on the
    calibration prompts, through the public Pipeline (not calibrate's own evaluator)."""
    from qc_compile.runtime import Pipeline

    pipe = Pipeline(work)
    fr, maps = [], []
    for k, prompt in enumerate(prompts):
        res = pipe(prompt, policy="quantcache", overrides=overrides, seed=k, steps=STEPS)
        fr.append(res.compute_fraction)
        maps.append([{u: d["action"] for u, d in st.decisions.items()} for st in res.steps])
    return sum(fr) / len(fr), maps


@pytest.mark.slow  # ~40 s on one CPU thread: a calibration with its end-to-end plan runs, then the checks
def test_quantized_plan_whose_noise_inflates_compute_gets_larger_thresholds(small_export):
    torch.set_grad_enabled(False)
    # coarse weights everywhere (the embedders too): noise that HLC's score reads
    work, plan, out = _calibrate(small_export, "int4_b64", "--quantize-embed-final")
    rep = plan["provenance"]["calibration"]["runtime"]["hlc"]
    d1, d2 = H.defaults()
    # the noise inflates compute beyond the measurement's resolution (12 steps: 93.8% vs 91.7% unquantized)
    assert rep["baseline"]["compute_percent"] > rep["target_compute_percent"] + rep["tolerance_percent"], rep
    hlc = plan["cache_policy"]["params"]["hlc"]
    assert hlc["delta1"] > d1 and hlc["delta2"] > d2, rep
    assert rep["chosen"]["compute_percent"] <= rep["target_compute_percent"] + rep["tolerance_percent"] + 1e-9
    assert rep["chosen"]["compute_percent"] < rep["baseline"]["compute_percent"]
    assert rep["chosen"]["cost_db_mean"] <= rep["budget_db"]
    assert "HLC thresholds: delta x" in out
    # the runtime reads the plan's thresholds by default: the same compute as calibrate measured (the calibration
    # prompts, seeds settings.seed + k with settings.seed = 0), and different decisions from the defaults
    prompts = plan["provenance"]["calibration"]["prompts"]
    calibrated, maps = _compute(work, prompts)
    assert abs(100 * calibrated - rep["chosen"]["compute_percent"]) < 1e-6
    default, default_maps = _compute(work, prompts, {"hlc.delta1": d1, "hlc.delta2": d2})
    assert abs(100 * default - rep["baseline"]["compute_percent"]) < 1e-6
    assert calibrated < default and maps != default_maps


@pytest.mark.slow  # ~15 s: one bf16 calibration
def test_bf16_plan_keeps_the_default_thresholds_without_extra_runs(small_export):
    _, plan, out = _calibrate(small_export, "bf16")
    assert "hlc" not in plan["cache_policy"]["params"]
    assert "unquantized plan" in plan["provenance"]["calibration"]["runtime"]["hlc"]["skipped"]
    assert "HLC thresholds: defaults (unquantized plan" in out


def test_no_hlc_thresholds_flag_skips_the_runs(monkeypatch):
    from qc_compile.calib import runtime_params

    def boom(*a, **k):
        raise AssertionError("the HLC calibration ran despite --no-hlc-thresholds")
    monkeypatch.setattr(runtime_params, "calibrate_hlc", boom)
    opts = runtime_params.RuntimeOptions(hlc=False, srap=False, high="fp")

    class _Plan:
        linears: dict = {}
        variants: dict = {}
        cache_policy = None
    sig = runtime_params.Signals(grid=None, res_change=None, prune_error=None)
    rep = runtime_params.add_runtime_params(_Plan(), sig, opts)
    assert "hlc" not in rep
