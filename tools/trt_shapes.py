"""Print the optimisation-profile flags for one unit of a work dir, for building or timing its Q/DQ graph outside
qc-compile: ``trtexec`` (``--minShapes/--optShapes/--maxShapes``) or ``polygraphy run`` (``--trt-min-shapes ...``).

The shapes are the ones ``qc-compile build`` uses (``qc_compile.build.profile_shapes``: batch 1 / min(2, max) / max,
every other dimension fixed by the export geometry; ``--plugins`` adds ``cached_residual`` to block units).

    python tools/trt_shapes.py WORK spatial_0 --max-batch 2 [--plugins] [--polygraphy]
"""

from __future__ import annotations

import argparse

from qc_compile.build import profile_shapes
from qc_compile.workdir import WorkDir, read_model_info


def flags(work: str, unit: str, max_batch: int, plugins: bool, polygraphy: bool) -> str:
    info = read_model_info(WorkDir(work))
    shapes = profile_shapes(info.unit(unit)["inputs"], max_batch, plugins=plugins)
    if polygraphy:
        return " ".join(f"--trt-{k}-shapes " + " ".join(f"{n}:[{','.join(map(str, s[i]))}]"
                                                        for n, s in shapes.items())
                        for i, k in enumerate(("min", "opt", "max")))
    return " ".join(f"--{k}Shapes=" + ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items())
                    for i, k in enumerate(("min", "opt", "max")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work")
    ap.add_argument("unit")
    ap.add_argument("--max-batch", type=int, default=2)
    ap.add_argument("--plugins", action="store_true")
    ap.add_argument("--polygraphy", action="store_true")
    a = ap.parse_args()
    print(flags(a.work, a.unit, a.max_batch, a.plugins, a.polygraphy))


if __name__ == "__main__":
    main()
