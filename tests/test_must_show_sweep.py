"""tools/must_show_sweep.py (issue 12's GPU sweep) without generating videos: the row groups run in priority order, a
deadline cuts the lowest-priority groups and says so, the partial table is written, and every row's worst video gets
its decision map. The generation itself is run_sweep's ``_task`` (tested with the sweep CLI); here it is replaced by a
stand-in that records what it was asked to run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import must_show_sweep as ms  # noqa: E402


def test_rows_have_unique_labels_and_valid_specs():
    from qc_compile.runtime.policies import expand

    labels = [ms.label(k, p) for _, k, ps in ms.UNITS for p in ps]
    assert len(labels) == len(set(labels))
    for _, _, ps in ms.UNITS:
        for p in ps:
            expand(p.partition("@")[0].partition("~")[0])  # raises on an unknown policy name
    tiers = [t for t, _, _ in ms.UNITS]
    assert tiers == sorted(tiers)
    must = {ms.label(k, p) for t, k, ps in ms.UNITS if t == 1 for p in ps}
    assert {"none", "hlc", "quantcache", "FP8 plan: quantcache", "AIGQ plan: quantcache",
            "FP8 plan: only (no caching)"} <= must
    assert any("+vc" in p for _, k, ps in ms.UNITS for p in ps) and any("dmpq" in p for _, _, ps in ms.UNITS
                                                                          for p in ps)


def test_variant_rows_run_their_policy_with_the_overrides():
    from qc_compile.runtime.policies import get_policy

    variants = [(k, p) for _, k, ps in ms.UNITS for p in ps if "~" in p]
    assert variants, "the rows that show a changed default's previous value are gone"
    for key, p in variants:
        cfg = ms.config_for(key, p, None)
        assert cfg.policy == p.partition("~")[0] and cfg.overrides == ms.VARIANTS[p.partition("~")[2]][0]
        pol = get_policy(cfg.policy, cfg.overrides, None, seed=0)  # raises on an unknown parameter
        assert pol.extrapolation == 0.0
    assert get_policy("hlc", {}, None, seed=0).extrapolation > 0  # the default the control row departs from


def test_deadline_cuts_lowest_priority_groups(tmp_path, monkeypatch):
    import qc_compile.runtime.sweep as sweep_mod
    import qc_compile.runtime.trace as trace_mod

    clock = [0.0]
    calls = []
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(sweep_mod, "worker_pipeline", lambda kw: kw)

    def fake_task(pipe_kwargs, configs, prompts, seed, steps, size, want_trace):
        clock[0] += 10.0  # every task takes 10 "seconds"
        calls.append((pipe_kwargs.get("work_dir", "fp"), [c.policy for c in configs], seed))
        out = []
        for j, c in enumerate(configs):
            psnr = 20.0 + j + seed / 1000  # seed 0 is every row's worst video
            rec = {"config": c.label, "seed": seed, "prompt": prompts[0], "psnr_db": psnr, "ssim": 0.9,
                   "checker_ok": True, "fp_checker_ok": True, "compute_fraction": 0.5, "flop_fraction": 0.5,
                   "seconds": 1.0}
            out.append({"records": [rec], "trace": {"seed": seed, "config": c.label}, "metrics": {"steps": steps}})
        return out

    monkeypatch.setattr(sweep_mod, "_task", fake_task)

    def fake_plot(trace, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(trace))

    monkeypatch.setattr(trace_mod, "plot_decisions", fake_plot)
    monkeypatch.setattr(sweep_mod, "plot_pareto", lambda result, path, title="": Path(path).write_bytes(b"png"))
    out = tmp_path / "m"
    # bf16 + the FP model only: units (1,bf16) (1,fp) (2,bf16 guard) (3,bf16) (3,fp), one task per tier and video
    # (2 seeds): the deadline (45 s) passes after the 5th group run: tier 1 (4 runs) finishes, the rest is cut
    res = ms.main(["--bf16", "W16", "--device", "cpu", "--jobs", "1", "--prompts", "1", "--seeds", "0,1000",
                   "--steps", "3", "--deadline-s", "45", "--commit", "abc", "-o", str(out)])
    assert [c[1] for c in calls[:4]] == [["none", "hlc", "quantcache"], list(ms.PEERS_MUST)] * 2
    assert [c[0] for c in calls[:2]] == ["W16", "fp"] and [c[2] for c in calls[:4]] == [0, 0, 1000, 1000]
    assert len(calls) == 5 and calls[4][1] == ["hlc+guard", "quantcache+guard", "hlc"]  # hlc~plain: hlc, overrides
    plain = ms.label("bf16", "hlc~plain")
    done = [r["config"] for r in res["rows"]]
    assert done == ["none", "hlc", "quantcache", *ms.PEERS_MUST, "hlc+guard (partial: 1/2 videos)",
                    "quantcache+guard (partial: 1/2 videos)", f"{plain} (partial: 1/2 videos)"]
    assert [r["videos"] for r in res["rows"]] == [2] * 7 + [1, 1, 1] and res["rows"][-1]["partial"]
    cut = {c["config"]: c["calls_done"] for c in res["cut"]}
    assert cut == {"hlc+guard": 1, "quantcache+guard": 1, plain: 1, "srap": 0, "hlc+aigq": 0, "dbcache": 0, "tdc": 0,
                   "interval": 0}
    assert "FP8 plan: quantcache" in res["not_run"] and "AIGQ+VC/DMPQ plan: hlc+dmpq" in res["not_run"]
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk["rows"] == res["rows"] and on_disk["seeds"] == [0, 1000] and on_disk["steps"] == 3
    md = (out / "sweep.md").read_text()
    assert "Cut by the time limit" in md and "hlc+guard (1/2 videos)" in md
    # the worst video (seed 0 in the stand-in) of each caching row has its decision map; the FP row none has none
    assert json.loads((out / "worst" / "quantcache" / "decisions.png").read_text())["seed"] == 0
    assert not (out / "worst" / "none").exists()
    assert (out / "runs" / "teacache" / "trace.json").is_file()


def test_process_pool_spawns_once_cuda_is_initialized(monkeypatch):
    torch = pytest.importorskip("torch")
    from qc_compile.runtime.sweep import process_pool

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with process_pool(1) as pool:
        assert pool._mp_context.get_start_method() == "spawn"


def _sleepy_task(pipe_kwargs, configs, prompts, seed, steps, size, want_trace):
    time.sleep(8.0)
    return [{"records": [{"config": c.label, "seed": seed, "prompt": prompts[0], "psnr_db": 30.0, "ssim": 0.9,
                          "checker_ok": None, "fp_checker_ok": None, "compute_fraction": 0.5, "flop_fraction": 0.5,
                          "seconds": 8.0}], "trace": {}, "metrics": {"steps": steps}} for c in configs]


def test_deadline_with_worker_processes_stops_the_running_tasks(tmp_path, monkeypatch):
    """--jobs 2 (forked workers on the CPU inherit the stand-ins): at the deadline the tasks still running are
    stopped, not waited for, and every row is either in the table or listed as cut."""
    import multiprocessing

    import qc_compile.runtime.sweep as sweep_mod
    import qc_compile.runtime.trace as trace_mod

    monkeypatch.setattr(sweep_mod, "worker_pipeline", lambda kw: kw)
    monkeypatch.setattr(sweep_mod, "_task", _sleepy_task)
    monkeypatch.setattr(trace_mod, "plot_decisions", lambda trace, path: None)
    monkeypatch.setattr(sweep_mod, "plot_pareto", lambda result, path, title="": None)
    t0 = time.time()
    res = ms.main(["--bf16", "W16", "--device", "cpu", "--jobs", "2", "--prompts", "1", "--seeds", "0,1000",
                   "--deadline-s", "2", "--commit", "abc", "-o", str(tmp_path / "m")])
    assert time.time() - t0 < 7  # waiting for the two running tasks would take 8 s
    rows = {r["config"] for r in res["rows"]}
    cut = {c["config"] for c in res["cut"]}
    labels = {ms.label(k, p) for _, k, ps in ms.UNITS if k in ("bf16", "fp") for p in ps}
    assert rows | cut == labels and not rows & cut
    assert {"srap", "dbcache", "tdc", "interval"} <= cut
    for p in multiprocessing.active_children():
        p.join(5)
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_a_failing_row_group_costs_only_that_group(tmp_path, monkeypatch):
    import qc_compile.runtime.sweep as sweep_mod
    import qc_compile.runtime.trace as trace_mod
    from qc_compile.errors import UserError

    def task(pipe_kwargs, configs, prompts, seed, steps, size, want_trace):
        if any(c.policy == "srap" for c in configs):
            raise UserError("srap: no thresholds")
        return [{"records": [{"config": c.label, "seed": seed, "prompt": prompts[0], "psnr_db": 30.0, "ssim": 0.9,
                              "checker_ok": None, "fp_checker_ok": None, "compute_fraction": 0.5,
                              "flop_fraction": 0.5, "seconds": 1.0}], "trace": {}, "metrics": {"steps": 4}}
                for c in configs]

    monkeypatch.setattr(sweep_mod, "worker_pipeline", lambda kw: kw)
    monkeypatch.setattr(sweep_mod, "_task", task)
    monkeypatch.setattr(trace_mod, "plot_decisions", lambda trace, path: None)
    monkeypatch.setattr(sweep_mod, "plot_pareto", lambda result, path, title="": None)
    res = ms.main(["--bf16", "W16", "--device", "cpu", "--jobs", "1", "--prompts", "1", "--seeds", "0",
                   "--commit", "abc", "-o", str(tmp_path / "m")])
    assert res["failed"] == {"srap": "UserError: srap: no thresholds", "hlc+aigq": "UserError: srap: no thresholds"}
    assert "interval" in {r["config"] for r in res["rows"]} and not res["cut"]
    assert "**Failed**" in (tmp_path / "m" / "sweep.md").read_text()
