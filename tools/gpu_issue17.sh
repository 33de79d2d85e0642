#!/usr/bin/env bash
# Issue 17 on the GPU machine: `qc-compile serve` on qc-ref under load, with the bad-request battery.
#
#   bash tools/gpu_issue17.sh OUTDIR COMMIT        # in the repo root; writes at most 7 files into OUTDIR
#
# 1. Installs the serve extra offline from .whl_serve/site_serve.tar.xz (made here by tools/pack_serve_site.sh: the
#    wheels of nvidia-pytriton, tritonclient and their dependencies the device lacks, unpacked as `pip install
#    --target` does and xz-compressed to fit the 64 MiB carry limit) into $SITE_SERVE (default /tmp/site_serve),
#    checks every file against the wheels' RECORD sha256, and puts it first on PYTHONPATH; then qc-compile itself
#    (`pip install --no-deps -e .`). SKIP_INSTALL=1 skips both (a machine that has the serve extra, e.g. the CPU).
# 2. tools/load_test.py --bad-requests: a one-at-a-time server (--max-batch 1) and a batched one (--max-batch
#    $MAX_BATCH), each first sent every bad request (then a good one that must equal the single-request video), then
#    $REQUESTS requests at each concurrency in $CONCURRENCY; every video checked against the single-request run of its
#    seed; servers stopped with SIGTERM (graceful drain), their logs checked for "Traceback".
# 3. OUTDIR: env.txt, run.log, load_test.json, load_test.md (table with device and commit), load_test.png (latency
#    and throughput vs concurrency), load_test_server_batch1.log, load_test_server_batch$MAX_BATCH.log.
#
# Bounded: the load test stops its clients after $BUDGET_S seconds and is interrupted (servers still stopped) after
# $BUDGET_S + 40; with the defaults the whole script takes about 3-4 minutes on an H200. Exit code 0 only if every
# check passed (load_test.json "ok").
set -uo pipefail
OUTDIR=${1:?usage: bash tools/gpu_issue17.sh OUTDIR COMMIT}
COMMIT=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-30}
REQUESTS=${REQUESTS:-32}
CONCURRENCY=${CONCURRENCY:-1,2,4,8}
MAX_BATCH=${MAX_BATCH:-8}
BUDGET_S=${BUDGET_S:-150}
SITE=${SITE_SERVE:-/tmp/site_serve}
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
ENV_TXT="$OUTDIR/env.txt"
T0=$(date +%s)
say() { echo "[gpu_issue17 +$(( $(date +%s) - T0 ))s] $*" | tee -a "$ENV_TXT"; }

say "commit $COMMIT, $(date -u +%FT%TZ), device $DEVICE, steps $STEPS, requests $REQUESTS, concurrency $CONCURRENCY, max batch $MAX_BATCH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$ENV_TXT" 2>&1 || say "no nvidia-smi"

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  [ -f .whl_serve/site_serve.tar.xz ] || { say "missing .whl_serve/site_serve.tar.xz (carry .whl_serve)"; exit 2; }
  rm -rf "$SITE" && mkdir -p "$SITE" && tar -xJf .whl_serve/site_serve.tar.xz -C "$SITE" --strip-components=1 \
    || { say "unpacking the serve packages failed"; exit 2; }
  "$PY" - "$SITE" >> "$ENV_TXT" 2>&1 <<'EOF' || { say "RECORD check failed (see env.txt)"; exit 2; }
import base64, csv, hashlib, sys
from pathlib import Path
site, n, bad = Path(sys.argv[1]), 0, []
for record in site.glob("*.dist-info/RECORD"):
    for row in csv.reader(record.read_text().splitlines()):
        if len(row) >= 2 and row[1].startswith("sha256="):
            f = site / row[0]
            digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_bytes()).digest()).rstrip(b"=").decode() \
                if f.is_file() else None
            n += 1
            if digest != row[1][7:]:
                bad.append(row[0])
print(f"RECORD check: {n} files of {len(list(site.glob('*.dist-info')))} distributions, {len(bad)} mismatched {bad[:5]}")
sys.exit(1 if bad else 0)
EOF
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > /tmp/gpu_issue17_pip.log 2>&1 \
    || { say "pip install -e . failed:"; tail -5 /tmp/gpu_issue17_pip.log | tee -a "$ENV_TXT"; exit 2; }
  say "installed the serve packages into $SITE and qc-compile (editable)"
fi

# What the server will run with; the Python-backend stub must find this interpreter's libpython (server.py puts its
# LIBDIR first on LD_LIBRARY_PATH, as here).
"$PY" - >> "$ENV_TXT" 2>&1 <<'EOF'
import importlib.metadata as md, os, subprocess, sys, sysconfig
from pathlib import Path
print("python", sys.version.split()[0], sys.executable)
for d in ("torch", "numpy", "protobuf", "grpcio", "nvidia-pytriton", "tritonclient", "click", "qc-compile"):
    try:
        print(f"  {d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"  {d} MISSING")
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))
import pytriton, tritonclient.grpc, tritonclient.http  # noqa: F401  (fails here, not in the server, if broken)
libdir, so = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
print("libpython", Path(libdir or "", so or "?"), "exists" if so and (Path(libdir) / so).is_file() else "MISSING")
stub = Path(pytriton.__file__).parent / f"tritonserver/python_backend_stubs/{sys.version_info[0]}.{sys.version_info[1]}/triton_python_backend_stub"
env = dict(os.environ, LD_LIBRARY_PATH=":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p))
missing = [l.strip() for l in subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env).stdout.splitlines() if "not found" in l]
print("python backend stub", stub.name, "for", stub.parent.name, "unresolved libraries:", missing or "none")
EOF
[ $? -eq 0 ] || { say "the serve packages do not import (see env.txt)"; tail -5 "$ENV_TXT"; exit 2; }
say "environment checked"

timeout -s INT -k 30 $(( BUDGET_S + 40 )) "$PY" tools/load_test.py qc-ref --device "$DEVICE" --steps "$STEPS" \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --max-batch "$MAX_BATCH" --max-seconds "$BUDGET_S" \
  --request-timeout-s 120 --bad-requests --commit "$COMMIT" --out "$OUTDIR/load_test.json" \
  --plot "$OUTDIR/load_test.png" --md "$OUTDIR/load_test.md" 2>&1 | tee "$OUTDIR/run.log"
RC=${PIPESTATUS[0]}
for log in "$OUTDIR"/load_test_server_batch*.log; do
  [ -f "$log" ] && say "$(basename "$log"): $(grep -c Traceback "$log") traceback(s); $(grep -o 'stopped cleanly.*' "$log" | head -1)"
done
say "load test exit code $RC (0: every check passed), total $(( $(date +%s) - T0 )) s"
exit "$RC"
