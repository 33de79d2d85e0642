"""Find the same-dtype copy in the compiled FP8 unit (issue 6 follow-up): profile one call with shapes and stacks."""
import sys

import torch

sys.path.insert(0, "tools")
from bench_units import build_configs, unit_inputs  # noqa: E402
from bench_lib import xl_model, xl_inputs  # noqa: E402


def main():
    torch.set_grad_enabled(False)
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
