"""The bench tools' pure parts: decision-grid mapping by relative depth, replay, compute fraction, kernel classes."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_e2e  # noqa: E402

from qc_compile.runtime.policy import Action, StepInfo  # noqa: E402


def _grid():
    acts = ["reuse", "compute", "prune", "compute"]
    return [{f"{k}_{i}": {"action": acts[(i + s) % 4], "variant": "default"} for k in ("spatial", "temporal")
             for i in range(4)} for s in range(3)]


def test_map_grid_by_relative_depth_and_replay():
    grid = _grid()
    xl = bench_e2e.map_grid(grid, 4, 28)
    assert len(xl) == 3 and len(xl[0]) == 56
    for s in range(3):
        for j in range(28):
            assert xl[s][f"temporal_{j}"] == grid[s][f"temporal_{j // 7}"]
    units = [f"{k}_{i}" for k in ("spatial", "temporal") for i in range(28)]
    assert bench_e2e.compute_fraction(xl, units) == bench_e2e.compute_fraction(grid, list(grid[0])) == 0.5
    pol = bench_e2e.ReplayPolicy(xl)
    pol.reset(tuple(units), 3)
    d = pol.decide(StepInfo(index=1, num_steps=3, t=500.0, dt=0.1, unit_names=tuple(units)))
    assert d["spatial_0"].action is Action.COMPUTE and d["spatial_7"].action is Action.PRUNE
    assert d["spatial_21"].action is Action.REUSE


def test_kernel_classes():
    assert bench_e2e.kernel_class("pytorch_flash::flash_fwd_kernel") == "attention"
    assert bench_e2e.kernel_class("sm90_xmma_gemm_e4m3bf16_bf16f32") == "gemm (bf16 and fp8)"
    assert bench_e2e.kernel_class("nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT") == "gemm (bf16 and fp8)"
    assert bench_e2e.kernel_class("triton_poi_fused_add_mul_0") == "inductor fused"
    assert bench_e2e.kernel_class("elementwise_kernel") == "other elementwise/copy"
