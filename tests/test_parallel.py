"""One video over several processes (issue 18) on the CPU with gloo: CFG parallel, STDiT3 dynamic sequence parallel
and both, under every policy: the same decisions on every rank and as the single-process run, and the video against
the single-process one. On the CPU the sharded computation is bit-identical to the single-process one where the
CPU's GEMM is batch-invariant (every token's arithmetic is the same; only the order of the statistics' sums differs,
and no decision sits that close to a threshold here), so the tests ask for bit equality and report PSNR on failure;
where it is not (:func:`_batch_invariant_linear`), for the same decisions and 80 dB. The 40 dB bar of the issue is what GPUs (different GEMM
tilings per shard size) are held to in tests/test_parallel_gpu.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from parallel_helpers import (PROMPTS, SMALL, decisions_of, file_stem, policy_spec, run_policies,  # noqa: E402
                              run_shapes)

from qc_compile.errors import UserError  # noqa: E402
from qc_compile.runtime.parallel import ParallelConfig, launch  # noqa: E402

WHOLE_UNIT = ("none", "hlc", "srap", "aigq", "quantcache", "tdc", "dmpq", "6bit", "interval")
SUB_BLOCK = ("fora", "pab", "fbcache", "dbcache", "teacache")
# whole-unit, sub-block, both gate probes; thresholds raised so that 6 tiny steps reuse (asserted below)
QUICK = ("quantcache", "fora", "teacache:teacache.rel_l1_thresh=0.6", "fbcache:fbcache.threshold=0.6")

_SINGLE: dict = {}
ULP_PSNR_DB = 80.0  # where the CPU's GEMM is not batch-invariant (below): ULP-level rounding, amplified over the steps


def _batch_invariant_linear() -> bool:
    """Whether this CPU's ``F.linear`` gives a CFG half the same bits alone as inside the pair, at the shapes where it
    can differ: qc-ref's timestep embedder, a 2-D GEMM of 4 rows (2 prompts x CFG) against 2. CFG parallel computes
    one half per rank, so its video is bit-identical to the single-process one exactly when this holds; on some CPUs
    (seen: an AMD EPYC with AVX-512, torch 2.13; the 3-D token GEMMs were batch-invariant there) the small-M kernel
    differs with the row count and the results differ by a few ULPs, so there the decisions must still be identical
    and the videos within ``ULP_PSNR_DB`` (measured there: 93.6 dB at worst, hlc over 12 steps)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, generator=g)
    w = torch.randn(128, 256, generator=g)
    return torch.equal(torch.nn.functional.linear(x[:2], w), torch.nn.functional.linear(x, w)[:2])


def _single(spec: str, frames: int = SMALL["frames"], steps: int = SMALL["steps"]):
    key = (spec, frames, steps)
    if key not in _SINGLE:
        from qc_compile.runtime import Pipeline

        if "pipe" not in _SINGLE:
            _SINGLE["pipe"] = Pipeline.from_pretrained("qc-ref")
        name, overrides = policy_spec(spec)
        _SINGLE[key] = _SINGLE["pipe"](PROMPTS, policy=name, overrides=overrides, **dict(SMALL, frames=frames, steps=steps))
    return _SINGLE[key]


def _check(out: Path, config: ParallelConfig, policies, frames: int = SMALL["frames"],
           steps: int = SMALL["steps"]) -> None:
    from qc_compile.metrics.fidelity import compare_videos

    for spec in policies:
        ref, pol = _single(spec, frames, steps), file_stem(spec)
        for rank in range(config.world_size):
            rec = json.loads((out / str(rank) / f"{pol}.json").read_text())
            video = load_file(str(out / str(rank) / f"{pol}.safetensors"))["video"]
            assert rec["parallel"]["decisions_identical_across_ranks"] is True, (pol, rank)
            assert rec["parallel"]["world_size"] == config.world_size
            assert rec["decisions"] == decisions_of(ref), f"{pol}: rank {rank} decided differently from 1 process"
            psnr = min(compare_videos(a, b)["psnr_db"] for a, b in zip(video, ref.videos))
            if _batch_invariant_linear():
                assert torch.equal(video, ref.videos), f"{pol} rank {rank}: not bit-identical (PSNR {psnr:.1f} dB)"
            else:  # this CPU's GEMM rounds a CFG half differently from the pair: ULPs (same decisions, above)
                assert psnr >= ULP_PSNR_DB, f"{pol} rank {rank}: PSNR {psnr:.1f} dB < {ULP_PSNR_DB} dB"
        base = json.loads((out / "0" / f"{pol}.json").read_text())["stats"]
        for rank in range(1, config.world_size):  # the statistics every rank decided from are the same bits
            assert json.loads((out / str(rank) / f"{pol}.json").read_text())["stats"] == base


def _run(tmp_path: Path, config: ParallelConfig, policies, frames: int = SMALL["frames"],
         steps: int = SMALL["steps"]) -> None:
    launch(run_policies, (str(tmp_path), list(policies), frames, steps), config=config, device="cpu")
    _check(tmp_path, config, policies, frames, steps)


# ----------------------------------------------------------------------------------------------- fast, in CI
def test_parallel_config_for_gpus():
    assert ParallelConfig.for_gpus(1) == ParallelConfig(False, 1)
    assert ParallelConfig.for_gpus(2) == ParallelConfig(True, 1)
    assert ParallelConfig.for_gpus(4) == ParallelConfig(True, 2)
    assert ParallelConfig.for_gpus(3) == ParallelConfig(False, 3)
    assert ParallelConfig.for_gpus(4, "sequence") == ParallelConfig(False, 4)
    assert ParallelConfig.for_gpus(8).world_size == 8
    with pytest.raises(UserError, match="exactly 2"):
        ParallelConfig.for_gpus(4, "cfg")
    with pytest.raises(UserError):
        ParallelConfig.for_gpus(0)


def test_layout_split_sizes():
    from qc_compile.runtime.parallel.layout import offsets, split_sizes

    assert split_sizes(15, 2) == [8, 7] and split_sizes(30, 4) == [8, 8, 7, 7] and split_sizes(3600, 4) == [900] * 4
    assert offsets([8, 7]) == [0, 8]


def test_sequence_parallel_two_processes(tmp_path):
    """2 gloo processes, tokens split (S-layout shards, all-to-all around spatial blocks)."""
    _run(tmp_path, ParallelConfig(False, 2), QUICK)
    for spec in QUICK[1:]:  # the comparison covers cache hits (quantcache's are covered by the slow 12-step runs)
        assert _single(spec).compute_fraction < 1.0, spec


def test_ranks_keep_shards_of_the_caches(tmp_path):
    """Each rank's residual caches hold its CFG half and its token shard only (so the test above compares a
    genuinely split computation)."""
    cfg = ParallelConfig(True, 2)
    launch(run_shapes, (str(tmp_path),), config=cfg, device="cpu")
    single = tmp_path / "single"
    run_shapes(str(single))
    one = json.loads((single / "0" / "shapes.json").read_text())
    assert one["runner"] == "TorchRunner"
    T, S = one["T"], one["S"]
    for rank in range(cfg.world_size):
        rec = json.loads((tmp_path / str(rank) / "shapes.json").read_text())
        assert rec["runner"] == "ShardedRunner" and rec["residuals"]
        for u, shape in rec["residuals"].items():
            B, N, C = one["residuals"][u]
            assert shape == [B // 2, T * S // 2, C], (rank, u, shape)


def test_cli_run_gpus_two_on_cpu(tmp_path):
    import subprocess

    cli = [sys.executable, "-m", "qc_compile.cli"]
    res = subprocess.run(cli + ["run", "--gpus", "2", "-p", PROMPTS[0], "--policy", "teacache", "--steps", "3",
                                "--frames", "4", "--height", "16", "--width", "16", "-o", str(tmp_path / "r"),
                                "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "decisions identical across ranks: True" in res.stdout
    trace = json.loads((tmp_path / "r" / "trace.json").read_text())
    assert trace["parallel"]["world_size"] == 2 and trace["parallel"]["cfg_parallel"] is True
    assert trace["parallel"]["decisions_identical_across_ranks"] is True
    res = subprocess.run(cli + ["run", "--gpus", "3", "--parallel", "cfg", "-p", PROMPTS[0]], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "exactly 2" in res.stderr and "Traceback" not in res.stderr


def test_executor_without_shards_is_a_user_error():
    from qc_compile.runtime.parallel.mesh import Mesh
    from qc_compile.runtime.parallel.runner import ShardedRunner

    class GraphRunner:  # what the ONNX / TensorRT runners look like to the wrapper
        backend, supports, stats, unit_names = "onnxruntime", frozenset(), "torch", ("embed", "spatial_0", "final")

    mesh = Mesh(ParallelConfig(False, 2), 0, None, None, None, torch.device("cpu"))
    with pytest.raises(UserError, match="whole video"):
        ShardedRunner(GraphRunner(), None, mesh)


# ----------------------------------------------------------------------------------------------- slow
# 12 steps (as tests/test_runtime_golden.py): the adaptive policies' caches and gates act at their defaults.
GOLDEN_STEPS = 12


@pytest.mark.slow
@pytest.mark.parametrize("config", [ParallelConfig(True, 1), ParallelConfig(False, 2)], ids=["cfg2", "sp2"])
def test_two_processes_every_policy(tmp_path, config):
    _run(tmp_path, config, WHOLE_UNIT + SUB_BLOCK, steps=GOLDEN_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("config", [ParallelConfig(True, 2), ParallelConfig(False, 4), ParallelConfig(False, 3)],
                         ids=["cfg2xsp2", "sp4", "sp3-uneven"])
def test_any_number_of_processes_every_policy(tmp_path, config):
    _run(tmp_path, config, WHOLE_UNIT + SUB_BLOCK, steps=GOLDEN_STEPS)


@pytest.mark.slow
def test_eight_processes(tmp_path):
    """CFG x sequence 4 = 8 gloo processes (8 frames, so every sequence rank holds a frame in the T-layout)."""
    _run(tmp_path, ParallelConfig(True, 4), ("quantcache", "fora", "teacache:teacache.rel_l1_thresh=0.6"), frames=8)


@pytest.mark.slow
def test_bench_parallel_quick_on_gloo(tmp_path):
    """tools/bench_parallel.py's machinery (launch per GPU count, timing, comm timer, agreement, JSON/md/png)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
    import bench_parallel

    out = tmp_path / "p.json"
    # a row left behind by a launch that was killed before it wrote --out is kept
    leftover = {"config": "bf16", "frames": 4, "gpus": 1, "label": "left", "latent_frames": 4, "seconds": 9.0,
                "comm_share_mean": 0.0, "comm_share_max": 0.0, "peak_mem_gib_per_rank": [0.0],
                "decisions_identical_across_ranks": True, "compute_fraction": 1.0}
    (tmp_path / "p.partial-gpus1.jsonl").write_text(json.dumps(leftover) + "\n")
    assert bench_parallel.main(["run", "--quick", "--device", "cpu", "--gpus", "1,2", "--frames", "8",
                                "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["seconds"] for r in doc["rows"] if r["frames"] == 4] == [9.0]
    assert not list(tmp_path.glob("*.partial-*"))
    rows = {(r["config"], r["gpus"]): r for r in doc["rows"] if r["frames"] == 8}
    assert set(rows) == {("bf16", 1), ("bf16", 2), ("headline", 1), ("headline", 2)}
    for (c, n), r in rows.items():
        assert r["decisions_identical_across_ranks"] and r["weights_identical_across_ranks"] and r["latent_finite"]
        assert len(r["seconds_per_rank"]) == n and r["speedup"] > 0
        assert (r["comm_share_max"] > 0) == (n > 1)
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
