"""Find the same-dtype copies of the FP8 fast path: profile one compiled unit call, then one executor step of a
2+2-block XL model (``--step``), with input shapes, and list the ops that launch copy kernels.

    python tools/probe_fp8_copy.py            # units
    python tools/probe_fp8_copy.py --step     # one StepExecutor step (runner + statistics), compiled, no CUDA graphs
"""
import sys

import torch

sys.path.insert(0, "tools")
from bench_units import build_configs, unit_inputs  # noqa: E402
from bench_lib import xl_model, xl_inputs  # noqa: E402


def step_probe() -> None:
    """One step of the executor over the compiled FP8 runner: which ops copy, with what shapes."""
    from torch.profiler import ProfilerActivity, profile

    import bench_e2e as E
    from qc_compile.runtime.fast_blocks import fp8_block_plan
    from qc_compile.runtime.runners.fast import FastRunner
    from qc_compile.runtime.step_executor import StepExecutor

    args = E.parse_args(["--device", "cuda", "--depth", "2", "--steps", "2"])
    setup = E.make_setup(args)
    ex = StepExecutor(FastRunner(setup.model, setup.g, fp8_block_plan(setup.model), compile=True), setup.g)
    grid = E.full_grid(2, setup.model.unit_names())
    E.sample(setup, ex, grid, 2)  # compile + autotune
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        E.sample(setup, ex, grid, 1)
        torch.cuda.synchronize()
    print("===== one executor step, 2 spatial + 2 temporal FP8 units")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=40,
                                                             max_name_column_width=60, max_shapes_column_width=110))


def main():
    torch.set_grad_enabled(False)
    if "--step" in sys.argv:
        return step_probe()
    from torch.profiler import ProfilerActivity, profile

    model = xl_model(depth=1)
    g, z, y, mask = xl_inputs(model.config)
    x, t_mlp, yy, mm = unit_inputs(model, g, z, y, mask)
    for unit in ("spatial_0", "temporal_0"):
        cfgs = build_configs(model, unit, g, x, t_mlp, yy, mm, None)
        fn = cfgs["ours_fp8_compile"]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                     with_stack=True) as prof:
            fn()
            torch.cuda.synchronize()
        print("=====", unit)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=25,
                                                                 max_name_column_width=60, max_shapes_column_width=90))
        for evt in prof.events():
            if "copy" in evt.name or "clone" in evt.name or "contiguous" in evt.name:
                print("EVT", evt.name, evt.input_shapes, round(evt.device_time_total / 1e3, 3), "ms")
                for fr in (evt.stack or [])[:8]:
                    print("    ", fr)


main()
