"""``compare`` picks polygraphy's TensorRT flavour before polygraphy reads it.

polygraphy reads ``POLYGRAPHY_USE_TENSORRT_RTX`` once, when ``polygraphy.config`` is first imported, and binds its
TensorRT module when ``polygraphy.backend.trt`` is imported. Each case runs in a fresh interpreter (the choice is
process-wide) with the variable removed from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from compile_helpers import built


def _py(code: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "POLYGRAPHY_USE_TENSORRT_RTX"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300, env=env)


_SELECT = """
    import sys
    import qc_compile.cli, qc_compile.compare as C
    from qc_compile.trt_compat import parse_target
    assert not any(m == "polygraphy" or m.startswith("polygraphy.") for m in sys.modules), "imported too early"
    {before}
    C.select_polygraphy_trt(parse_target(sys.argv[1]))
    from polygraphy import config
    from polygraphy.mod.trt_importer import tensorrt_module_and_version_string
    import polygraphy.backend.trt.util as U
    print("FLAVOUR", config.USE_TENSORRT_RTX, tensorrt_module_and_version_string(), U.trt.__name__)
"""


@pytest.mark.parametrize("before", ["", "import polygraphy.logger  # config read with the variable unset"])
def test_select_before_or_after_a_first_polygraphy_import(before: str) -> None:
    r = _py(_SELECT.format(before=before), "rtx:sm89")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FLAVOUR True tensorrt_rtx>=1.0 tensorrt_rtx" in r.stdout, r.stdout


def test_full_tensorrt_target_clears_a_stale_rtx_setting() -> None:
    r = _py(_SELECT.format(before="") .replace('U.trt.__name__', '"-"'), "trt",
            env_extra={"POLYGRAPHY_USE_TENSORRT_RTX": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FLAVOUR False tensorrt>=8.5 -" in r.stdout, r.stdout


def test_a_backend_already_bound_to_the_other_flavour_is_refused() -> None:
    r = _py(_SELECT.format(before="import polygraphy.backend.trt"), "rtx:sm89")
    assert r.returncode != 0 and "already bound to tensorrt" in r.stderr and "new process" in r.stderr, r.stderr


@pytest.mark.slow  # needs a built work dir (cached across the suite)
def test_compare_sets_the_flavour_before_polygraphy_is_imported() -> None:
    """The real compare: an import hook records the variable at polygraphy's first import."""
    code = """
        import importlib.abc, os, sys
        seen = []

        class Spy(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "polygraphy.config" and not seen:
                    seen.append(os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX"))
                return None

        sys.meta_path.insert(0, Spy())
        from qc_compile.compare import CompareOptions, compare_workdir
        from qc_compile.workdir import WorkDir
        report = compare_workdir(WorkDir(sys.argv[1]), CompareOptions(steps=2, e2e=False, units=["final"]), log=lambda *a: 0)
        from polygraphy import config
        print("SEEN", seen, config.USE_TENSORRT_RTX, report["target"], sorted(report["units"]))
    """
    r = _py(code, str(built("fp8_e4m3", "rtx:sm89")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SEEN ['1'] True rtx:sm89 ['final']" in r.stdout, r.stdout
