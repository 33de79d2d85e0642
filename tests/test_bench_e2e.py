"""tools/bench_e2e.py on the CPU (tiny STDiT3, fp32): every baseline row computes the latent of the units path at full
compute (so a faster row cannot be doing less work), the result JSON follows its schema, and the peak-memory counter is
reset once per row right before that row's timed run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_e2e as E  # noqa: E402
import bench_lib as B  # noqa: E402

from qc_compile.runtime.policy import Action, UnitDecision  # noqa: E402

ROWS = ["plain_bf16_eager", "plain_bf16_compile", "plain_bf16_compile_cudagraphs", "ours_cached", "torchao_fp8_compile"]
STEPS = 3  # > the 2 warm-up steps of a non-grid row, so the grid rows' whole-grid warm-up shows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _full_grids(path: Path, depth: int = 4, steps: int = 6) -> Path:
    """A grids file whose cached grid computes every unit (so ``ours_cached`` is a full-compute units-path row)."""
    units = [f"{k}_{i}" for k in ("spatial", "temporal") for i in range(depth)]
    grid = [{u: {"action": "compute", "variant": "default"} for u in units} for _ in range(steps)]
    doc = {"depth": depth, "grids": {n: {"steps": steps, "grid": grid} for n in ("cached_30", "both_30", "both_100")}}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One quick fp32 run of the baseline rows and a full-compute units-path row, with the meter spied on."""
    tmp = tmp_path_factory.mktemp("bench")
    args = E.parse_args(["--quick", "--device", "cpu", "--dtype", "fp32", "--steps", str(STEPS), "--out", str(tmp),
                         "--stem", "e2e_test", "--grids", str(_full_grids(tmp / "grids.json")), "--rows", *ROWS])
    log: list = []
    mp = pytest.MonkeyPatch()
    real_sample, real_reset = E.sample, B.Meter.reset_peak

    def spy_sample(setup, executor, grid, steps, extrapolation=0.0):
        log.append(("sample", steps))
        return real_sample(setup, executor, grid, steps, extrapolation)

    def spy_reset(self):
        log.append("reset_peak")
        return real_reset(self)

    mp.setattr(E, "sample", spy_sample)
    mp.setattr(B.Meter, "reset_peak", spy_reset)
    try:
        doc = E.run_bench(args, keep_latents=True)
    finally:
        mp.undo()
    return args, doc, log, tmp


def test_baselines_compute_the_units_path_latent(run):
    """plain forward (eager and regionally compiled) and our runner at full compute vs StepExecutor + torch runner."""
    from qc_compile.runtime.generation import torch_executor

    args, doc, _, _ = run
    setup = E.make_setup(args)  # the same seeded model and inputs
    ref = E.sample(setup, torch_executor(setup.model, setup.g), B.full_grid(STEPS, setup.model.unit_names()),
                   STEPS).z
    latents = doc["_latents"]
    for key in ("plain_bf16_eager", "plain_bf16_compile", "plain_bf16_compile_cudagraphs", "ours_cached"):
        assert _rel(latents[key], ref) < 1e-5, key
    rows = {r["key"]: r for r in doc["rows"]}
    assert all(rows[k]["compute_fraction"] == 1.0 and rows[k]["steps"] == STEPS for k in latents)
    assert (ref - setup.z.float()).abs().mean() > 1e-2  # the loop really moved the latent


def test_json_follows_the_schema_and_the_md_is_written(run):
    import jsonschema

    _, doc, _, tmp = run
    written = json.loads((tmp / "e2e_test.json").read_text())
    E.validate_doc(written)
    assert [r["key"] for r in written["rows"]] == ROWS
    assert "skipped" in written["rows"][-1] and "seconds" not in written["rows"][-1]  # no torchao FP8 on a CPU
    assert written["what"] == "DiT sampling loop" and "VAE" in written["excluded"] and "T5" in written["excluded"]
    assert {"device", "torch", "triton", "commit", "date"} <= set(written["env"])
    base = min(written["rows"][1:3], key=lambda r: r["seconds"])  # the faster plain compiled row is the baseline
    assert base["speedup_vs_plain_bf16_compile"] == pytest.approx(1.0) and base["ratio_baseline"] == base["key"]
    keys = {o["key"] for o in written["overheads"]}
    assert {"cache_gib_per_unit", "compile_warmup_s.plain_bf16_compile"} <= keys
    md = (tmp / "e2e_test.md").read_text()
    assert "DiT sampling loop" in md and f"`plain_bf16_compile` ({STEPS} steps)" in md and "Overheads" in md
    bad = json.loads(json.dumps(written))
    del bad["rows"][0]["peak_gib"]  # a measured row must carry every number
    with pytest.raises(jsonschema.ValidationError):
        E.validate_doc(bad)
    bad = json.loads(json.dumps(written))
    bad["rows"][-1]["seconds"] = 1.0  # a skipped row has no time
    with pytest.raises(jsonschema.ValidationError):
        E.validate_doc(bad)
    bad = json.loads(json.dumps(written))
    del bad["env"]["commit"]
    with pytest.raises(jsonschema.ValidationError):
        E.validate_doc(bad)


def test_peak_memory_reset_once_per_row_before_its_timed_run(run):
    _, doc, log, _ = run
    measured = [r for r in doc["rows"] if "seconds" in r]
    assert log.count("reset_peak") == len(measured) == 4
    for i, ev in enumerate(log):
        if ev == "reset_peak":  # warm-up sample, reset, then the timed run of the full step count
            assert log[i - 1][0] == "sample" and log[i + 1] == ("sample", STEPS)


def test_grid_rows_warm_up_on_the_whole_grid(run):
    """A replayed grid's warm-up covers every step (every CUDA graph captured before timing); others take 2 steps."""
    _, doc, log, _ = run
    measured = [r for r in doc["rows"] if "seconds" in r]
    warmups = [log[i - 1][1] for i, ev in enumerate(log) if ev == "reset_peak"]
    assert len(warmups) == len(measured)
    grid_rows = {s.key for s in E.ROWS if s.grid is not None}
    assert any(r["key"] in grid_rows for r in measured) and any(r["key"] not in grid_rows for r in measured)
    for r, n in zip(measured, warmups):
        assert n == (STEPS if r["key"] in grid_rows else min(2, STEPS)), r["key"]
        assert r.get("warmup_steps") == (STEPS if r["key"] in grid_rows else None)


def test_meter_resets_the_cuda_counter(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: calls.append("reset"))
    m = B.Meter("cpu")
    m.reset_peak()
    assert calls == [] and m.peak_gib() is None
    m.cuda = True
    m.reset_peak()
    assert calls == ["sync", "reset"]


def test_plain_executor_refuses_to_skip_units():
    model = B.xl_model(config=E.quick_config(), device="cpu", dtype=torch.float32)
    g, z, y, mask = B.xl_inputs(model.config, valid=8, size=(17, 64, 64), device="cpu")
    ex = B.PlainExecutor(model, g)
    with pytest.raises(RuntimeError, match="computes every unit"):
        ex.step(z, torch.zeros(1), None, {"spatial_0": UnitDecision(Action.REUSE)})


def test_grid_mapping_replay_and_kernel_classes():
    acts = ["reuse", "compute", "prune", "compute"]
    grid = [{f"{k}_{i}": {"action": acts[(i + s) % 4], "variant": "default"} for k in ("spatial", "temporal")
             for i in range(4)} for s in range(3)]
    xl = B.map_grid(grid, 4, 28)
    assert len(xl) == 3 and len(xl[0]) == 56
    assert all(xl[s][f"temporal_{j}"] == grid[s][f"temporal_{j // 7}"] for s in range(3) for j in range(28))
    from qc_compile.runtime.policy import StepInfo

    units = tuple(xl[0])
    pol = B.ReplayPolicy(xl)
    pol.reset(units, 3)
    d = pol.decide(StepInfo(index=1, num_steps=3, t=500.0, dt=0.1, unit_names=units))
    assert d["spatial_0"].action is Action.COMPUTE and d["spatial_7"].action is Action.PRUNE
    assert d["spatial_21"].action is Action.REUSE
    with pytest.raises(ValueError):
        pol.reset(units, 4)
    assert B.kernel_class("pytorch_flash::flash_fwd_kernel") == "attention"
    assert B.kernel_class("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT") == "gemm"
    assert B.kernel_class("_fp8_gemm_tma") == "gemm"
    assert B.kernel_class("_producer_kernel") == "quantization"
    assert B.kernel_class("_cache_kernel") == "statistics"
    assert B.kernel_class("triton_poi_fused_add_mul_0") == "elementwise"


def test_committed_grids_cover_the_rows():
    """bench/results/e2e_grids.json (made by --make-grids) holds every grid a row replays, long enough, with the
    recording policy's reuse extrapolation (the replay pays it: HLC's default extrapolates)."""
    from qc_compile.runtime.policies import get_policy

    doc = json.loads(E.GRIDS_JSON.read_text())
    for spec in E.ROWS:
        if spec.grid:
            g = doc["grids"][spec.grid]
            assert len(g["grid"]) == (100 if spec.long else 30) == g["steps"]
            assert g["fp8"] == spec.fp8
            assert 0.0 < g["compute_fraction"] < 1.0
            assert g["extrapolation"] == get_policy("quantcache", g["overrides"], None).extrapolation > 0


def test_replay_hands_the_recorded_extrapolation_to_the_executor():
    from qc_compile.runtime.step_executor import StepExecutor

    grid = [{"spatial_0": {"action": "compute", "variant": "default"}}]
    assert B.ReplayPolicy(grid).extrapolation == 0.0
    pol = B.ReplayPolicy(grid, 0.5)
    ex = StepExecutor.__new__(StepExecutor)  # use_policy only reads the policy and the requested level
    ex.stats_requested, ex.stats_level = None, "full"
    ex.use_policy(pol)
    assert ex.extrapolation == 0.5 and ex.stats_level == "none"  # an all-compute grid measures nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_gpu_run_all_rows(tmp_path):
    """Every row on the GPU (tiny model, inductor, bf16): all measured, the FP8 rows (ours, torchao) near the plain
    bf16 latent, the per-block profiles and the CUDA-graph overhead present."""
    args = E.parse_args(["--quick", "--device", "cuda", "--out", str(tmp_path), "--stem", "e2e_gpu_test"])
    doc = E.run_bench(args, keep_latents=True)
    rows = {r["key"]: r for r in doc["rows"]}
    try:
        import torchao  # noqa: F401
    except ImportError:
        rows.pop("torchao_fp8_compile")
    assert all("seconds" in r and r["peak_gib"] > 0 for r in rows.values()), [r.get("error") for r in rows.values()]
    lat = doc["_latents"]
    base = lat["plain_bf16_eager"]
    assert _rel(lat["plain_bf16_compile"], base) < 2e-2
    for key in ("ours_fp8", "torchao_fp8_compile"):
        if key in rows:
            assert _rel(lat[key], base) < 0.15, key
    for key in E.PROFILE_ROWS:
        p = rows[key]["profile_per_block"]
        assert p["ms_by_class"]["gemm"] > 0 and p["wall_ms"] > 0
    assert rows["ours_fp8"]["profile_per_block"]["ms_by_class"].get("quantization", 0) > 0
    ov = {o["key"]: o for o in doc["overheads"]}
    assert ov["cuda_graph_pool_gib"]["value"] > 0 and ov["weight_quantization_s"]["value"] > 0


def test_fidelity_attaches_by_configuration(run, tmp_path):
    """Each row gets the fidelity entry of its configuration (eager and compiled share plain_bf16's)."""
    _, _, _, tmp = run
    res = tmp_path / "e2e.json"
    res.write_text((tmp / "e2e_test.json").read_text())
    entry = {"steps": STEPS, "psnr_db": 31.0, "psnr_db_min": 30.0, "ssim": 0.9, "checker": 0.5,
             "checker_reference": 0.5, "checker_drop_points": 0.0, "compute_fraction": 1.0, "videos": 1}
    fid = tmp_path / "fid.json"
    fid.write_text(json.dumps({"configs": {"plain_bf16": entry, "ours_cached": {**entry, "psnr_db": 35.0}}}))
    E.attach_fidelity(res, fid)
    rows = {r["key"]: r for r in json.loads(res.read_text())["rows"]}
    assert rows["plain_bf16_eager"]["fidelity"]["config"] == rows["plain_bf16_compile"]["fidelity"]["config"]
    assert rows["ours_cached"]["fidelity"]["psnr_db"] == 35.0


@pytest.mark.slow
def test_fidelity_mode_writes_every_configuration(tmp_path):
    """--fidelity on qc-ref (1 caption, 1 step): PSNR/SSIM/checker per configuration; torchao skipped on a CPU."""
    out = tmp_path / "fid.json"
    E.main(["--fidelity", "--device", "cpu", "--captions", "1", "--steps", "1", "--long-steps", "2",
            "--configs", "plain_bf16", "ours_fp8", "ours_both_100", "torchao_fp8", "--out-fidelity", str(out)])
    c = json.loads(out.read_text())["configs"]
    assert c["plain_bf16"]["psnr_db"] > c["ours_fp8"]["psnr_db"] > 15.0  # bf16 closer to fp32 than FP8
    assert c["ours_both_100"]["steps"] == 2 and 0 < c["ours_both_100"]["compute_fraction"] <= 1
    assert "skipped" in c["torchao_fp8"] or "psnr_db" in c["torchao_fp8"]
    doc = json.loads(out.read_text())  # without --plan: the uncalibrated FP8 block plan, described, no file or hash
    assert doc["plan"]["path"] is None and "sha256" not in doc["plan"] and "ours_fp8_schedule" not in c
    assert set(c["ours_fp8"]) >= {"psnr_db", "ssim", "checker", "compute_fraction", "policy", "variants"}


def test_interrupted_run_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """The JSON is rewritten after every row: an interrupt during row k+1 leaves a valid document with k rows."""
    args = E.parse_args(["--quick", "--device", "cpu", "--dtype", "fp32", "--steps", "1", "--out", str(tmp_path),
                         "--stem", "e2e_int", "--grids", str(_full_grids(tmp_path / "grids.json", steps=2)),
                         "--no-compile", "--compile-backend", "eager", "--warmup-steps", "1",
                         "--rows", "plain_bf16_eager", "plain_bf16_compile", "ours_cached"])
    real, calls = E.measure, []

    def measure(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(E, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        E.run_bench(args)
    doc = json.loads((tmp_path / "e2e_int.json").read_text())
    E.validate_doc(doc)
    assert [r["key"] for r in doc["rows"]] == ["plain_bf16_eager", "plain_bf16_compile"]
    assert all(r["seconds"] > 0 for r in doc["rows"]) and doc["complete"] is False
    assert doc["rows_planned"] == ["plain_bf16_eager", "plain_bf16_compile", "ours_cached"]
    assert any(o["key"] == "compile_warmup_s.plain_bf16_compile" for o in doc["overheads"])
    assert "`plain_bf16_compile`" in (tmp_path / "e2e_int.md").read_text()
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the row where the 8-bit attention cannot run")
def test_the_sage_row_is_skipped_with_its_reason_without_cuda(tmp_path) -> None:
    """An optional backend that cannot run here is a skipped row naming why, not an error that hides the others."""
    assert E.main(["--quick", "--rows", "ours_fp8", "ours_fp8_sage", "--out", str(tmp_path), "--stem", "s"]) == 0
    rows = {r["key"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert rows["ours_fp8"]["seconds"] > 0 and "error" not in rows["ours_fp8"]
    assert "needs a CUDA GPU" in rows["ours_fp8_sage"]["skipped"] and "seconds" not in rows["ours_fp8_sage"]


def test_ratios_divide_by_the_strongest_plain_compiled_row() -> None:
    """Our rows are CUDA-graphed: where the CUDA-graphed plain row (mode='reduce-overhead') is faster than the plain
    compiled one, it is the baseline (like with like); the 100-step rows keep their own baseline."""
    rows = [{"key": "plain_bf16_compile", "seconds": 10.0}, {"key": "plain_bf16_compile_cudagraphs", "seconds": 9.0},
            {"key": "ours_fp8", "seconds": 6.0}, {"key": "plain_bf16_compile_100", "seconds": 30.0},
            {"key": "ours_both_100", "seconds": 6.0}]
    E.add_ratios_and_fidelity(rows, None)
    by = {r["key"]: r for r in rows}
    assert by["ours_fp8"]["ratio_baseline"] == "plain_bf16_compile_cudagraphs"
    assert by["ours_fp8"]["speedup_vs_plain_bf16_compile"] == pytest.approx(1.5)
    assert by["ours_both_100"]["ratio_baseline"] == "plain_bf16_compile_100"
    assert by["ours_both_100"]["speedup_vs_plain_bf16_compile"] == pytest.approx(5.0)
    rows[1]["seconds"] = 12.0  # graphs slower here: the plain compiled row stays the baseline
    E.add_ratios_and_fidelity(rows, None)
    assert rows[2]["ratio_baseline"] == "plain_bf16_compile" and rows[2]["speedup_vs_plain_bf16_compile"] == 10 / 6


PLAN = Path(__file__).resolve().parents[1] / "bench" / "results" / "must_show_h200" / "plans" / "fp8.plan.json"


@pytest.mark.slow
def test_fidelity_with_a_calibrated_plan_runs_its_schedule_and_records_it(tmp_path):
    """--plan: the configurations use the calibrated plan and its per-step schedule (an all-`high` schedule makes
    ours_fp8_schedule the bf16 fast path: closer to fp32 than FP8 every step), and the file's sha256 is recorded."""
    import hashlib

    d = json.loads(PLAN.read_text())
    d["schedule"] = ["high"] * len(d["schedule"])
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(d))
    out = tmp_path / "fid.json"
    assert E.main(["--fidelity", "--device", "cpu", "--captions", "1", "--steps", "2", "--plan", str(plan),
                   "--configs", "ours_fp8", "ours_fp8_schedule", "ours_cached", "--out-fidelity", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["plan"]["sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    c = doc["configs"]
    assert c["ours_fp8_schedule"]["policy"] == "schedule"
    assert c["ours_fp8_schedule"]["variants"] == ["high"], c
    assert "high" not in c["ours_cached"]["variants"], c  # the bf16 row's policy does not read the FP8 plan
    assert c["ours_fp8_schedule"]["psnr_db"] > c["ours_fp8"]["psnr_db"] + 3.0, c


@pytest.mark.parametrize("make, says", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("{not json"), "plan"),
    (lambda p: p.write_text(PLAN.read_text().replace('"name": "qc-ref"', '"name": "opensora-v1.2"', 1)),
     "opensora-v1.2"),
])
def test_fidelity_refuses_a_bad_plan_before_sampling(tmp_path, capsys, make, says):
    plan, out = tmp_path / "plan.json", tmp_path / "fid.json"
    make(plan)
    assert E.main(["--fidelity", "--device", "cpu", "--captions", "1", "--steps", "1", "--plan", str(plan),
                   "--configs", "ours_fp8", "--out-fidelity", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(plan) in err and says in err and "Traceback" not in err, err
    assert not out.exists()


def test_plan_is_refused_outside_fidelity_and_grids(tmp_path):
    with pytest.raises(SystemExit) as e:
        E.parse_args(["--quick", "--plan", str(PLAN), "--out", str(tmp_path)])
    assert e.value.code == 2


@pytest.mark.slow
def test_make_grids_with_a_calibrated_plan_records_its_schedule(tmp_path, capsys):
    """--make-grids --plan: the FP8 grids follow the plan's per-step schedule (all `high` here: every computed unit
    of both_30 runs `high`), the bf16 grid does not, and the plan's sha256 is in the file; a bad plan exits 2."""
    import hashlib

    d = json.loads(PLAN.read_text())
    d["schedule"] = ["high"] * len(d["schedule"])
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(d))
    out = tmp_path / "grids.json"
    assert E.main(["--make-grids", "--device", "cpu", "--steps", "3", "--long-steps", "4", "--grid-prompts", "1",
                   "--grids", str(out), "--plan", str(plan)]) == 0
    doc = json.loads(out.read_text())
    assert doc["plan"]["sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    for name, want in (("both_30", {"high"}), ("both_100", {"high"}), ("cached_30", {"default"})):
        used = {c["variant"] for step in doc["grids"][name]["grid"] for c in step.values() if c["action"] == "compute"}
        assert used == want, name
    (tmp_path / "bad.json").write_text("{not json")
    assert E.main(["--make-grids", "--device", "cpu", "--steps", "3", "--grids", str(tmp_path / "g2.json"),
                   "--plan", str(tmp_path / "bad.json")]) == 2
    assert "bad.json" in capsys.readouterr().err and not (tmp_path / "g2.json").exists()


def test_make_grids_set_overrides_the_30_step_fp8_grid_only(tmp_path):
    """--set reaches the both_30 grid (here: step 0 `high`, no post-skip coupling) and is recorded; the bf16 grid keeps
    the defaults."""
    out = tmp_path / "grids.json"
    assert E.main(["--make-grids", "--device", "cpu", "--steps", "3", "--long-steps", "4", "--grid-prompts", "1",
                   "--grids", str(out), "--set", "aigq.schedule=high,default,default",
                   "aigq.post_skip=null"]) == 0
    grids = json.loads(out.read_text())["grids"]
    assert grids["both_30"]["overrides"] == {"aigq.schedule": "high,default,default", "aigq.post_skip": "null"}
    assert grids["cached_30"]["overrides"] == {}
    first = {c["variant"] for c in grids["both_30"]["grid"][0].values() if c["action"] == "compute"}
    later = {c["variant"] for step in grids["both_30"]["grid"][1:] for c in step.values() if c["action"] == "compute"}
    assert first == {"high"} and later <= {"default"}


def test_fidelity_noise_seeds_and_set(tmp_path):
    """--noise-seeds runs every caption once per seed (checker over all of them) and --set reaches ours_both."""
    out = tmp_path / "fid.json"
    assert E.main(["--fidelity", "--device", "cpu", "--captions", "1", "--steps", "2", "--noise-seeds", "0,1000",
                   "--caption-seed", "7", "--configs", "ours_both", "--set", "aigq.post_skip=null",
                   "--variant", "ps2", "aigq.post_skip=2", "--out-fidelity", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["noise_seeds"] == [0, 1000] and doc["caption_seed"] == 7
    c = doc["configs"]["ours_both"]
    assert c["videos"] == 2 and c["overrides"] == {"aigq.post_skip": "null"}
    for cfg in doc["configs"].values():  # each video whose checker verdict differs from fp32's is listed
        n_changed = round(abs(cfg["checker"] - cfg["checker_reference"]) * cfg["videos"])
        assert len(cfg["checker_changed"]) >= n_changed
        assert all({"caption", "noise_seed", "reference_ok", "ok"} <= set(c) for c in cfg["checker_changed"])
    v = doc["configs"]["ours_both~ps2"]
    assert v["overrides"] == {"aigq.post_skip": "2"}
    assert sum(v["variant_counts"].values()) > 0 and set(v["variant_counts"]) == set(v["variants"])


def test_bad_noise_seeds_and_overrides_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        E.main(["--fidelity", "--device", "cpu", "--noise-seeds", "0,x"])
    assert e.value.code == 2 and "--noise-seeds" in capsys.readouterr().err
    assert E.main(["--make-grids", "--device", "cpu", "--steps", "2", "--grids", str(tmp_path / "g.json"),
                   "--set", "aigq.post_skip"]) == 2
    assert "key=value" in capsys.readouterr().err and not (tmp_path / "g.json").exists()
