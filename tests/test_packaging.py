"""The installed package list must cover every source folder with an __init__.py (DESIGN.md §2 mapping)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {v: k for k, v in cfg["package-dir"].items()}  # folder -> import name
    found = set()
    for top, name in dirs.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            if rel.parts and rel.parts[0] in {"runtime", "calib", "plugins"} and top == "qc_compile":
                continue
            found.add(".".join([name, *rel.parts]))
    assert found == set(cfg["packages"]), found ^ set(cfg["packages"])


def test_generic_top_level_names_are_not_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "qc_compile" or p.startswith("qc_compile.") for p in cfg["packages"])
