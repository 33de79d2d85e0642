"""The equal-average-bits controls of a plan's AIGQ schedule (issue 12, item 2): same number of high steps placed
otherwise (reversed / uniform) or none, the bit accounting that shows the averages are equal, and that a replaced
schedule is what actually runs (tools/must_show_sweep.py's tier-4 rows)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

UNITS = ("embed", "spatial_0", "temporal_0", "spatial_1", "temporal_1", "final")
# D_t of a 10-step run: large at both ends, smallest in the middle (qc-ref's shape); step 0 has none
D = [None, 0.40, 0.20, 0.10, 0.06, 0.05, 0.07, 0.09, 0.15, 0.30]


def _plan(schedule, *, redundancy=D, default=("fp8_e4m3", "fp8_e4m3"), high=None):
    from qc_compile.plan import LinearPlan, Plan

    linears = {}
    for u in UNITS:
        for k in range(3 if u not in ("embed", "final") else 1):
            linears[f"{u}.lin{k}"] = LinearPlan(unit=u, weight=default[0], activation=default[1])
    prov = {"calibration": {"runtime": {"redundancy": list(redundancy)}}} if redundancy is not None else {}
    return Plan(model={"name": "t"}, linears=linears, variants={"high": high or {"*": {"weight": "bf16",
                                                                                      "activation": "bf16"}}},
                schedule=list(schedule), provenance=prov)


def _high(s):
    return [i for i, v in enumerate(s) if v != "default"]


def test_controls_keep_the_count_move_the_steps_and_keep_the_bits():
    from qc_compile.calib import act_schedule
    from qc_compile.calib import schedule_controls as sc

    d = [math.nan if x is None else x for x in D]
    sched = act_schedule.schedule_from(d, 0.3)  # what calibrate writes: step 0 and the two largest D_t
    assert _high(sched) == [0, 1, 9]
    plan = _plan(sched)
    c = sc.control_schedules(plan)
    assert _high(c["reversed"]) == [4, 5, 6]  # the three smallest D_t, never step 0
    assert _high(c["uniform"]) == [1, 5, 8]  # bin centres of 10 steps / 3
    assert _high(c["none"]) == []
    assert all(len(s) == len(sched) for s in c.values())
    assert len({tuple(_high(s)) for s in (sched, c["reversed"], c["uniform"])}) == 3
    # bits: 14 linears, 12 in blocks; a high step runs the 12 block linears at 16 bits, embed/final stay at 8
    per_high_step = (12 * 16 + 2 * 8) / 14
    want = (3 * per_high_step + 7 * 8) / 10
    bits = {k: sc.schedule_bits(plan, s) for k, s in [("plan", sched), *c.items()]}
    for k in ("plan", "reversed", "uniform"):
        assert bits[k].weight == pytest.approx(want) and bits[k].activation == pytest.approx(want)
    assert bits["none"].weight == pytest.approx(8.0) and bits["none"].mean == pytest.approx(8.0)
    # an activation-only high variant raises activation bits alone
    ah = _plan(sched, high={"*": {"activation": "bf16"}})
    b = sc.schedule_bits(ah, sc.control_schedules(ah)["reversed"])
    assert b.weight == pytest.approx(8.0) and b.activation == pytest.approx(want)


def test_controls_without_a_recorded_ranking_use_the_middle_steps():
    from qc_compile.calib import schedule_controls as sc
    from qc_compile.errors import UserError

    sched = ["high", "high", "default", "default", "default", "default", "default", "default", "default", "high"]
    assert _high(sc.control_schedules(_plan(sched, redundancy=None))["reversed"]) == [3, 4, 5]
    assert _high(sc.control_schedules(_plan(sched, redundancy=D[:5]))["reversed"]) == [3, 4, 5]  # wrong length
    with pytest.raises(UserError, match="several non-default"):
        sc.control_schedules(_plan(["high", "low"] + ["default"] * 8))
    with pytest.raises(UserError, match="no per-step schedule"):
        sc.control_schedules(_plan([]))
    # a 10-step schedule run over 20 steps: the runtime's resampling, bits still equal across placements
    plan = _plan(sched)
    c = sc.control_schedules(plan)
    b20 = [sc.schedule_bits(plan, s, 20) for s in (sched, c["reversed"], c["uniform"])]
    assert b20[0].mean == pytest.approx(b20[1].mean) and b20[0].mean > sc.schedule_bits(plan, c["none"], 20).mean


def test_executed_evaluations_count_only_computed_units_at_their_variant():
    from qc_compile.calib import schedule_controls as sc

    plan = _plan(["default"] * 2)
    steps = [{"decisions": {"spatial_0": {"action": "compute", "variant": "high"},
                            "temporal_0": {"action": "reuse", "variant": "high"}}},
             {"decisions": {"spatial_0": {"action": "prune", "variant": "default"}}}]
    ev = sc.executed_evaluations(steps, UNITS)
    assert ev[("spatial_0", "high")] == 1 and ("temporal_0", "high") not in ev and ev[("temporal_1", "default")] == 2
    assert ev[("embed", "default")] == 2 and ("spatial_0", "default") not in ev
    b = sc.average_bits(plan, ev)
    n = 3 * (1 + 1 + 2 + 2) + 2 + 2  # linear evaluations: spatial_0 once (high), temporal_0 once, others twice
    assert b.weight == pytest.approx((3 * 16 + (n - 3) * 8) / n)


@pytest.fixture(scope="module")
def fp8_work():
    from compile_helpers import calibrated

    return calibrated("fp8_e4m3")


def test_a_replaced_schedule_is_what_runs(fp8_work):
    """The sweep's control rows on a calibrated FP8 plan: the trace's high steps are the control's, the video differs
    from the plan's placement (the replaced schedule is not ignored), and the executed bits are equal."""
    import torch

    import must_show_sweep as ms
    from qc_compile.runtime import Pipeline
    from qc_compile.runtime import sweep as S

    torch.set_num_threads(1)
    controls = ms.schedule_controls(fp8_work, None)
    steps = len(controls["plan"]["schedule"])
    assert controls["reversed"]["high_steps"] != controls["plan"]["high_steps"]
    assert len(controls["reversed"]["high_steps"]) == len(controls["plan"]["high_steps"]) > 0
    cfgs = [ms.config_for("fp8", p, controls) for p in ("schedule", "schedule@reversed", "quantcache@reversed")]
    assert cfgs[1].overrides == {"schedule.steps": controls["reversed"]["schedule"]}
    assert set(cfgs[2].overrides) == {"aigq.schedule"}
    pipe = Pipeline(fp8_work)
    out = S._task(pipe, cfgs, ["a blue square moving up on a gray background"], 3, steps, None, True)
    ran = [[i for i, st in enumerate(o["trace"]["steps"]) if st["decisions"]["spatial_0"]["variant"] == "high"]
           for o in out]
    assert ran[0] == controls["plan"]["high_steps"] and ran[1] == controls["reversed"]["high_steps"]
    for i in controls["reversed"]["high_steps"]:  # quantcache: every block computed at a control step runs high
        for u, d in out[2]["trace"]["steps"][i]["decisions"].items():
            assert d["action"] != "compute" or d["variant"] == "high", (i, u)
    assert out[0]["records"][0]["psnr_db"] != out[1]["records"][0]["psnr_db"]
    bits = [ms.run_bits(pipe.plan, o["trace"]) for o in out[:2]]
    assert bits[0]["avg_bits"]["mean"] == pytest.approx(bits[1]["avg_bits"]["mean"])
    assert bits[0]["avg_bits"]["mean"] > 8.0
    assert bits[0]["avg_bits"]["mean"] == pytest.approx(controls["plan"]["bits"]["mean"])
    flat = S._task(pipe, [ms.config_for("fp8", "schedule@none", controls)], ["a blue square moving up on a gray "
                                                                             "background"], 3, steps, None, True)
    flat_bits = ms.run_bits(pipe.plan, flat[0]["trace"])["avg_bits"]["mean"]
    assert flat_bits == pytest.approx(controls["none"]["bits"]["mean"])  # FP8 blocks, bf16 embed / final linears
    assert 8.0 < flat_bits < bits[0]["avg_bits"]["mean"]


def test_sweep_lists_the_control_rows_last_with_their_steps_and_bits(tmp_path, monkeypatch, fp8_work):
    import json

    import must_show_sweep as ms
    import qc_compile.runtime.sweep as sweep_mod
    import qc_compile.runtime.trace as trace_mod

    seen = []

    def task(pipe_kwargs, configs, prompts, seed, steps, size, want_trace):
        seen.append([(c.label, c.policy, c.overrides) for c in configs])
        return [{"records": [{"config": c.label, "seed": seed, "prompt": prompts[0], "psnr_db": 30.0, "ssim": 0.9,
                              "checker_ok": None, "fp_checker_ok": None, "compute_fraction": 0.5,
                              "flop_fraction": 0.5, "seconds": 1.0,
                              "avg_bits": {"weight": 9.0, "activation": 10.0, "mean": 9.5}, "high_share": 0.25}],
                 "trace": {}, "metrics": {"steps": 3}} for c in configs]

    monkeypatch.setattr(sweep_mod, "worker_pipeline", lambda kw: kw)
    monkeypatch.setattr(sweep_mod, "_task", task)
    monkeypatch.setattr(trace_mod, "plot_decisions", lambda trace, path: None)
    monkeypatch.setattr(sweep_mod, "plot_pareto", lambda result, path, title="": None)
    res = ms.main(["--fp8", str(fp8_work), "--device", "cpu", "--jobs", "1", "--prompts", "1", "--seeds", "0",
                   "--commit", "abc", "-o", str(tmp_path / "m")])
    last = seen[-1]
    assert [lab for lab, _, _ in last] == [ms.label("fp8", p) for p in ms.UNITS[-1][2]]
    assert "FP8 plan (schedule moved: reversed): quantcache" in [lab for lab, _, _ in last]
    c = res["schedule_controls"]["fp8"]
    by = {lab: ov for lab, _, ov in last}
    assert by["FP8 plan (schedule moved: uniform): schedule only (no caching)"] == {
        "schedule.steps": c["uniform"]["schedule"]}
    assert by["FP8 plan (no high steps): quantcache"] == {"aigq.schedule": c["none"]["schedule"]}
    assert by["FP8 plan: schedule only (no caching)"] == {}
    assert c["plan"]["bits"] == c["reversed"]["bits"] == c["uniform"]["bits"] != c["none"]["bits"]
    md = (tmp_path / "m" / "sweep.md").read_text()
    assert "Schedule placement at equal average bits" in md and "executed bits W / A" in md
    assert "| 9.00 / 10.00 | 25.0 |" in md
    assert ", ".join(map(str, c["reversed"]["high_steps"])) in md
    assert json.loads((tmp_path / "m" / "sweep.json").read_text())["rows"][-1]["avg_bits"]["mean"] == 9.5
