"""Checks for tools/gpu_issue17.sh: the carried serve packages on a machine without internet.

    python tools/serve_site_check.py record DIR...   # every wheel file in DIR matches its RECORD sha256
    python tools/serve_site_check.py libpython       # prints the directory holding this Python's libpython3.X.so
    python tools/serve_site_check.py env             # versions in use; pytriton, tritonclient and the stub's numpy
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def check_records(site: Path) -> tuple[int, int, list[str]]:
    """(files matching, files skipped as trimmed by tools/pack_serve_site.sh, mismatched or missing files)."""
    trimmed = (site / "TRIMMED.txt").read_text().split() if (site / "TRIMMED.txt").is_file() else []
    n, skipped, bad = 0, 0, []
    for record in site.glob("*.dist-info/RECORD"):
        for row in csv.reader(record.read_text().splitlines()):
            if len(row) < 2 or not row[1].startswith("sha256="):
                continue
            if any(row[0] == t or row[0].startswith(t + "/") for t in trimmed):
                skipped += 1
                continue
            rel = row[0]
            while rel.startswith("../"):  # scripts and headers: `pip install --target` puts them in DIR/bin, DIR/include
                rel = rel[3:]
            f = site / rel
            digest = (base64.urlsafe_b64encode(hashlib.sha256(f.read_bytes()).digest()).rstrip(b"=").decode()
                      if f.is_file() else None)
            n += 1
            if digest != row[1][len("sha256="):]:
                bad.append(row[0])
    return n, skipped, bad


def libpython_dir() -> str:
    so = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    for d in (sysconfig.get_config_var("LIBDIR"), Path(sys.base_prefix) / "lib", "/usr/lib/x86_64-linux-gnu",
              "/usr/local/lib", "/usr/lib64"):
        if d and (Path(d) / so).is_file():
            return str(d)
    return ""


def report_env() -> int:
    print("python", sys.version.split()[0], sys.executable)
    for d in ("torch", "numpy", "protobuf", "grpcio", "nvidia-pytriton", "tritonclient", "click", "qc-compile"):
        try:
            print(f"  {d} {md.version(d)}")
        except md.PackageNotFoundError:
            print(f"  {d} MISSING")
    import numpy

    print("numpy in use", numpy.__version__, numpy.__file__)
    import pytriton
    import tritonclient.grpc  # noqa: F401  (fails here, not in the server, if broken)
    import tritonclient.http  # noqa: F401

    stub_numpy = subprocess.run([sys.executable, "-I", "-c", "import numpy; print(numpy.__version__, numpy.__file__)"],
                                capture_output=True, text=True)
    print("numpy in isolated interpreters (Triton's stub):", (stub_numpy.stdout or stub_numpy.stderr).strip()[-300:])
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = Path(pytriton.__file__).parent / f"tritonserver/python_backend_stubs/{ver}/triton_python_backend_stub"
    ldd = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=dict(os.environ)).stdout
    missing = [line.strip() for line in ldd.splitlines() if "not found" in line]
    print(f"python backend stub for {ver}: {'present' if stub.is_file() else 'MISSING'}; unresolved libraries:",
          missing or "none")
    try:
        import torch

        print("torch cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
    except ImportError:
        print("torch MISSING")
    return 1 if missing or not stub.is_file() else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["record"]:
        status = 0
        for site in map(Path, argv[1:]):
            n, skipped, bad = check_records(site)
            print(f"RECORD check {site}: {n} files of {len(list(site.glob('*.dist-info')))} distributions match, "
                  f"{skipped} trimmed, {len(bad)} mismatched or missing {bad[:5]}")
            status |= int(bool(bad) or n == 0)
        return status
    if argv[:1] == ["libpython"]:
        print(libpython_dir())
        return 0
    if argv[:1] == ["env"]:
        return report_env()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
