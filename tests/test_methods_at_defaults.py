"""The seed methods act at their defaults once calibrated (issue 12): SRAP's calibration measures what SRAP reads (its
pruning at defaults: tests/test_srap_calibration.py), and a plan's per-step schedule changes the precision that is actually executed (torch and onnxruntime here;
torch-fast in tests/test_fast_executor_gpu.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from compile_helpers import built, calibrated  # noqa: E402

SMALL = dict(frames=4, height=16, width=16)
CALIB_PROMPTS = ["a red circle moving right on a black background", "a green triangle moving down on a white background"]
HELD_OUT = "a blue square moving up on a gray background"


@pytest.fixture(scope="module")
def qc_ref():
    from qc_compile.models import load_model

    return load_model("qc-ref")  # the shipped weights


@pytest.fixture(scope="module")
def measured(qc_ref):
    from qc_compile.calib.runtime_params import measure
    from qc_compile.runtime.generation import GenerationSettings

    s = GenerationSettings.defaults(qc_ref, steps=10, seed=5, **SMALL)
    torch.set_grad_enabled(False)
    _, sig = measure(qc_ref, CALIB_PROMPTS, s)
    return s, sig


def test_similarity_grid_equals_the_executors_cos_prev(qc_ref, measured):
    """Calibration measures exactly what SRAP reads at run time (both CFG rows of a one-prompt run)."""
    from qc_compile.models.stdit3 import Geometry
    from qc_compile.runtime.generation import generate, torch_executor

    s, sig = measured
    g = Geometry.for_model(qc_ref.config, s.frames, s.height, s.width)
    ex = torch_executor(qc_ref.model, g, stats="full")  # policy none alone measures nothing: ask for the statistics
    _, rec = generate(qc_ref, CALIB_PROMPTS[1:], s, progress=False, seeds=[s.seed + 1], executor=ex)
    cos = sig.grid.cos("both")[1]
    for step in (0, 4, 9):
        for j, u in enumerate(sig.grid.units[1:], start=1):
            want = rec.steps[step].stats[u]["cos_prev"]
            assert abs(float(cos[step, j]) - want) < 1e-5, (step, u)
    cond, null = sig.grid.cos("cond"), sig.grid.cos("null")
    assert not torch.allclose(cond, null)  # the branches are measured separately too


def test_srap_candidates_exclude_units_past_the_step_error_bound(measured):
    """Units whose one-step pruning error is past --srap-max-error are never candidates; the others are ranked by it
    and tried end to end (SRAP's calibrated pruning at defaults: tests/test_srap_calibration.py)."""
    from qc_compile.calib import srap as srap_calib

    _, sig = measured
    tried: list[dict] = []

    def evaluate(params):  # a stand-in whose cost grows with what is pruned: only the first candidate passes
        tried.append(params)
        n = 0 if params is None else sum(d["tau_high"] < srap_calib.NEVER for d in params["units"].values())
        return srap_calib.Fidelity([30.0 - (0.0 if n <= 1 else 5.0)], 0.5 - 0.05 * n)
    cal = srap_calib.calibrate(sig.grid, lambda p, st, u: 0.9 if u.startswith("temporal") else 0.1, evaluate,
                               max_error=0.5)
    assert cal.report["ranking"] and all(u.startswith("spatial") for u in cal.report["ranking"])
    assert len(cal.pruning_units) == 1 and cal.pruning_units[0].startswith("spatial")
    assert cal.params["units"]["temporal_1"]["tau_high"] == srap_calib.NEVER
    assert tried[0] is None and len(cal.report["candidates"]) == 3  # k=1 at both levels, k=2 fails at the first


def _schedule_runs(pipe, steps: int = 6):
    sched = pipe.plan.schedule
    assert "high" in sched and pipe.plan.variants.get("high")
    a = pipe(HELD_OUT, policy="schedule", seed=1, steps=steps)
    flat = pipe(HELD_OUT, policy="schedule", overrides={"schedule.steps": ",".join(["default"] * steps)}, seed=1,
                steps=steps)
    ran_high = [st.decisions.get("spatial_0", {}).get("variant") for st in a.steps]
    assert "high" in ran_high
    return a.videos, flat.videos


def test_uniform_plan_carries_variants_schedule_and_srap():
    from qc_compile.plan import load_plan

    work = calibrated("fp8_e4m3")
    plan = load_plan(work / "plan.json")
    # --high-variant fp (default): the schedule's high steps run the unquantized model (ablation_fp8.md)
    assert plan.variants["high"] == {"*": {"weight": "bf16", "activation": "bf16"}}
    assert len(plan.schedule) == 3 and set(plan.schedule) <= {"high", "default"} and "high" in plan.schedule
    params = plan.cache_policy["params"]
    # SRAP thresholds are calibrated by default, chosen by their measured cost (never-pruning ones with the reason)
    assert "srap" in params and params["aigq"]["post_skip"] >= 1
    rt = json.loads((work / "plan.json").read_text())["provenance"]["calibration"]["runtime"]
    assert "redundancy" in rt
    assert rt["srap"].get("chosen") or rt["srap"].get("reason") or rt["srap"].get("note")  # what and why


def test_plan_schedule_changes_executed_precision_torch():
    from qc_compile.runtime import Pipeline

    sched, flat = _schedule_runs(Pipeline(calibrated("fp8_e4m3")))
    d = float((sched - flat).norm() / flat.norm())
    assert d > 1e-4, "the schedule's high steps ran the same computation as the default variant"


def test_plan_schedule_changes_executed_precision_onnxruntime():
    from qc_compile.runtime import Pipeline

    sched, flat = _schedule_runs(Pipeline(built("fp8_e4m3", "rtx:sm89"), executor="onnxruntime"))
    d = float((sched - flat).norm() / flat.norm())
    assert d > 1e-4, "the onnxruntime runner ran the default graphs at the schedule's high steps"
