"""The runtime never imports the compiler (DESIGN.md §2, issue 10): no module of ``runtime/`` — neither when it is
imported nor when a backend loads and runs a work dir — brings ``qc_compile.build``, ``qc_compile.export``,
``qc_compile.passes`` or onnx-graphsurgeon into the process. Each check runs in a fresh interpreter, so what another
test imported does not hide or fake a result.

``STILL_IMPORTS_COMPILER`` names the load paths that still go through the compiler (strict xfail: an entry that
starts passing fails the suite until it is removed from the list).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from compile_helpers import built, calibrated, exported  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_PY = ("def forbidden():\n    import sys\n    return sorted(n for n in sys.modules if n in "
                "('qc_compile.build', 'qc_compile.export', 'onnx_graphsurgeon') or n == 'qc_compile.passes' "
                "or n.startswith('qc_compile.passes.'))\n")


def runtime_modules() -> list[str]:
    out = []
    for p in sorted((ROOT / "runtime").rglob("*.py")):
        parts = p.relative_to(ROOT / "runtime").with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        out.append(".".join(("qc_compile", "runtime") + parts))
    return out


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", FORBIDDEN_PY + code], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    if proc.returncode != 0:  # not an AssertionError: the strict xfails below accept only the import check
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_runtime_modules_imports_no_compiler():
    mods = runtime_modules()
    assert len(mods) > 20 and "qc_compile.runtime.runners.onnxruntime" in mods
    got = _run("import importlib, json\nseen, blame = set(), {}\n"
               f"for m in {mods!r}:\n"
               "    importlib.import_module(m)\n"
               "    new = set(forbidden()) - seen\n"
               "    if new: blame[m] = sorted(new)\n"
               "    seen |= new\n"
               "print(json.dumps(blame))")
    assert got == {}, f"runtime modules that import the compiler: {got}"


# (case, python that loads and runs it; WORK is the work dir)
LOAD_CASES = {
    "torch-plan": ("fp8_e4m3", None,
                   "from qc_compile.runtime import Pipeline\nPipeline(WORK)(P, steps=1, seed=0)"),
    "onnxruntime-fp": (None, None,  # exported only (no plan, no build): the FP graphs; a plan without a build is
                       # refused by every executor (issue 14)
                       "from qc_compile.runtime import Pipeline\n"
                       "Pipeline(WORK, executor='onnxruntime')(P, steps=1, seed=0)"),
    "onnxruntime-q-fp8": ("fp8_e4m3", "rtx:sm89",
                          "from qc_compile.runtime import Pipeline\n"
                          "Pipeline(WORK, executor='onnxruntime')(P, steps=1, seed=0)"),
    "onnxruntime-q-nvfp4": ("nvfp4", "rtx:sm120",
                            "from qc_compile.runtime import Pipeline\n"
                            "Pipeline(WORK, executor='onnxruntime')(P, steps=1, seed=0)"),
    "tensorrt": ("fp8_e4m3", "rtx:sm89",
                 f"sys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom test_trt_executor import FakeTrt\n"
                 "from qc_compile.runtime.runners.tensorrt import TrtRunner\n"
                 "TrtRunner.from_workdir(WORK, 'rtx:sm89', trt=FakeTrt(Path(WORK), 'rtx:sm89'), device='cpu', "
                 "check_runnable=False)"),
}
STILL_IMPORTS_COMPILER: dict[str, str] = {}  # every load path is clean (runners read qc_compile.manifest)


def _case(name: str):
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=STILL_IMPORTS_COMPILER[name])] \
        if name in STILL_IMPORTS_COMPILER else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_case(n) for n in LOAD_CASES])
def test_loading_and_running_a_work_dir_imports_no_compiler(name):
    fmt, target, code = LOAD_CASES[name]
    work = built(fmt, target) if target else calibrated(fmt) if fmt else exported()
    got = _run("import json, sys\nfrom pathlib import Path\n"
               f"WORK = {str(work)!r}\nP = ['a red circle moving right on a black background']\n"
               + code + "\nprint(json.dumps(forbidden()))")
    assert got == [], f"{name} imported {got}"


PACKAGE_DIRS = {"qc_compile": ROOT / "qc_compile", "qc_compile.runtime": ROOT / "runtime",
                "qc_compile.calib": ROOT / "calib", "qc_compile.plugins": ROOT / "plugins"}


def static_imports() -> dict[str, set[str]]:
    """Module -> the qc_compile modules it imports anywhere in its body (function-level imports included)."""
    import ast

    mods: dict[str, Path] = {}
    for pkg, base in PACKAGE_DIRS.items():
        for p in base.rglob("*.py"):
            if ".venv" in p.parts or (pkg == "qc_compile" and p.relative_to(base).parts[0] in ("runtime", "calib")):
                continue
            parts = p.relative_to(base).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            mods[".".join((pkg,) + parts)] = p
    graph: dict[str, set[str]] = {}
    for name, p in mods.items():
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            found |= {t for t in targets if t in mods}
            if isinstance(node, ast.ImportFrom) and node.module in mods:  # from pkg import submodule
                found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
        graph[name] = found - {name}
    return graph


def test_commands_form_no_import_cycle():
    """The CLI commands sit on top: a command imports library modules, never another command that imports it back
    (the old calibrate <-> calibrate_aigq cycle); the calibration inputs live in calib/inputs.py."""
    graph = static_imports()
    assert "qc_compile.calib.inputs" in graph["qc_compile.commands.calibrate_aigq"]
    cmds = [m for m in graph if m.startswith("qc_compile.commands.")]
    for a in cmds:
        for b in graph[a]:
            if b.startswith("qc_compile.commands.") and b != "qc_compile.commands":
                assert a not in graph.get(b, set()), f"{a} <-> {b} import each other"
    for m in graph:  # nothing below the CLI imports a command
        if not m.startswith(("qc_compile.commands", "qc_compile.cli")):
            bad = {b for b in graph[m] if b.startswith("qc_compile.commands") or b == "qc_compile.cli"}
            assert not bad, f"{m} imports the CLI: {sorted(bad)}"
