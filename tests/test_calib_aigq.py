"""Adaptive calibration (issue 4): allocation, schedule, TAP units; the CLI end to end on a tiny random-weight qc-ref
(plan validates, round-trips, build consumes it for rtx:sm120); bad input; interrupted statistics resume."""

from __future__ import annotations

import functools

import pytest
import torch
from compile_helpers import copy_of, exported, run_cli

from qc_compile.errors import UserError


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    """The calibrate command disables autograd process-wide; keep that from leaking into other test modules."""
    mode = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(mode)


def test_allocation_keeps_sensitive_layers_wide_and_meets_budget():
    from qc_compile.calib.allocate import allocate, average_bits, menu_for, parse_budget

    assert menu_for("torch") == ("int4_b128", "int6_sim", "fp8_e4m3", "bf16")
    assert "nvfp4" in menu_for("rtx:sm120") and "int6_sim" not in menu_for("rtx:sm120")
    with pytest.raises(UserError, match="--target"):
        menu_for("gpu9000")
    params = {"a": 100, "b": 100, "c": 100}
    rel = {n: {"int4_b128": 0.1, "int6_sim": 0.03, "fp8_e4m3": 0.02, "bf16": 0.0} for n in params}
    probe = {n: "int4_b128" for n in params}
    from qc_compile.plan import WEIGHT_FORMATS

    al = allocate({"a": 1.0, "b": 0.1, "c": 0.01}, params, rel, probe, 6.0)
    b = {n: WEIGHT_FORMATS[f].bits for n, f in al.formats.items()}
    assert al.avg_bits <= 6.0 + 1e-9 and b["a"] >= b["b"] >= b["c"] and b["a"] > b["c"]
    assert al.formats["c"] == "int4_b128"
    assert average_bits(al.formats, params) == pytest.approx(al.avg_bits)
    with pytest.raises(UserError, match="below what the menu can reach"):
        allocate({n: 1.0 for n in params}, params, rel, probe, 3.0)
    assert parse_budget("6", 10) == 6.0 and parse_budget("100B", 100) == 8.0
    with pytest.raises(UserError):
        parse_budget("six", 10)


def test_schedule_readings_and_tap_selection():
    from qc_compile.calib.act_schedule import schedule_from
    from qc_compile.calib.tap import select

    d = [float("nan"), 0.5, 0.1, 0.2, 0.9, 0.05]
    assert schedule_from(d, 0.5) == ["high", "high", "default", "default", "high", "default"]
    opp = schedule_from(d, 0.5, "opposite")
    assert opp[0] == "high" and opp[5] == "high" and opp[4] == "default"
    g = torch.Generator().manual_seed(0)
    feat = torch.cat([torch.randn(20, 5, generator=g), torch.randn(20, 5, generator=g) + 5])
    t = torch.cat([torch.linspace(1000, 0, 20)] * 2)
    idx, info = select(feat, t, 8, "tap")
    assert len(idx) == 8 == len(set(idx)) and info["clusters"] >= 2
    assert sum(i < 20 for i in idx) >= 2 and sum(i >= 20 for i in idx) >= 2  # both feature groups covered
    idx_u, _ = select(feat, t, 8, "uniform")
    assert len(idx_u) == 8


@functools.lru_cache(maxsize=None)
def _aigq_work():
    work = copy_of(exported(), "aigq")
    code, out = run_cli("calibrate", work, "--method", "aigq", "--budget", "6", "--steps", "2", "--num-prompts", "2",
                        "--replay-samples", "1", "--calib-samples", "4", "--predictor", "--vc", "--no-smoothing",
                        "--target", "rtx:sm120", "--quiet")
    assert code == 0, out
    return work


def test_aigq_plan_validates_round_trips_and_builds_for_rtx_sm120(tmp_path):
    from qc_compile.manifest import Manifest
    from qc_compile.plan import WEIGHT_FORMATS, load_plan, save_plan
    from qc_compile.runtime.policies import plan_sections
    from qc_compile.workdir import WorkDir, read_model_info

    work = WorkDir(_aigq_work())
    info = read_model_info(work)
    plan = load_plan(work.plan_json, model_info=info)
    bits = sum(WEIGHT_FORMATS[e.weight].bits * li["in_features"] * li["out_features"]
               for li in info.linears() for e in [plan.linears[li["name"]]])
    total = sum(li["in_features"] * li["out_features"] for li in info.linears())
    assert bits / total <= 6.0 + 1e-6 and len({e.weight for e in plan.linears.values()}) >= 2
    assert len(plan.schedule) == 2 and set(plan.schedule) <= {"default", "high"}
    sec = plan_sections(plan)
    assert sec["dmpq"]["calibrated"] is True and sec["dmpq"]["threshold"] >= 0
    assert len(sec["vc"]["factors"]) == 2 and len(sec["vc"]["factors"][0]) == 3
    p2 = tmp_path / "plan.json"
    save_plan(plan, p2)
    again = load_plan(p2, model_info=info)
    assert again.to_dict() | {"sidecar": None} == plan.to_dict() | {"sidecar": None}
    for png in ("sensitivity", "allocation", "act_schedule", "predictor_fit"):
        assert (work.report_dir / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    code, out = run_cli("build", work.root, "--target", "rtx:sm120", "--quiet")
    assert code == 0, out
    t = Manifest.load(work, "rtx:sm120").target("rtx:sm120").data
    assert t["schedule"] == plan.schedule


def test_aigq_bad_input(tmp_path):
    work = exported()
    base = ["calibrate", work, "--method", "aigq", "--steps", "2", "--quiet"]
    code, out = run_cli(*base, "--budget", "2")
    assert code == 2 and "below what the menu can reach" in out, out
    code, out = run_cli(*base, "--target", "rtx:sm75")
    assert code == 2 and "rtx:sm86" in out
    f = tmp_path / "p.txt"
    f.write_text("a purple dragon flying\n")
    code, out = run_cli(*base, "--prompts", f)
    assert code == 2 and "purple" in out
    f.write_text("# only a comment\n")
    code, out = run_cli(*base, "--prompts", f)
    assert code == 2 and "no prompts" in out
    code, out = run_cli("calibrate", work, "--quiet")
    assert code == 2 and "--uniform" in out and "--method" in out


def test_statistics_resume_after_interruption(tmp_path):
    from qc_compile.calib.collect import CollectSettings, StatsStore, collect, text_captions
    from qc_compile.models import load_model

    torch.set_grad_enabled(False)
    loaded = load_model("qc-ref", random_weights=True)
    caps = text_captions(loaded, ["a red circle moving up on a black background"])
    st = CollectSettings(steps=3, cfg=4.0, seed=0, frames=4, height=16, width=16, fps=8, shift=4.0)

    class Stop(Exception):
        pass

    def stop_after_first(name):
        if name == "b000_s000":
            raise Stop

    with pytest.raises(Stop):
        collect(loaded, caps, st, tmp_path / "a", weights_id="w", progress=False, on_shard=stop_after_first)
    with pytest.raises(UserError, match="incomplete"):
        StatsStore(tmp_path / "a")
    seen = []
    collect(loaded, caps, st, tmp_path / "a", weights_id="w", progress=False, on_shard=seen.append)
    assert seen == ["b000_s001", "b000_s002"]  # finished steps are skipped
    full = collect(loaded, caps, st, tmp_path / "b", weights_id="w", progress=False)
    resumed = StatsStore(tmp_path / "a")
    for key in ("z_out", "blk/spatial_0/res_change", "lin/spatial_blocks.0.attn.qkv/amax"):
        torch.testing.assert_close(resumed.grid(key), full.grid(key), equal_nan=True)
    with pytest.raises(UserError, match="other settings"):
        collect(loaded, caps, CollectSettings(**{**st.__dict__, "steps": 4}), tmp_path / "a", weights_id="w",
                progress=False)
