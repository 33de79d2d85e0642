#!/usr/bin/env bash
# Issue 17 on the GPU machine: `qc-compile serve` on qc-ref under load, with the bad-request battery.
#
#   bash tools/gpu_issue17.sh OUTDIR COMMIT        # in the repo root; writes 7 files into OUTDIR
#
# 1. Installs the serve extra offline from the carried .whl_serve/ (made here by tools/pack_serve_site.sh):
#    site_serve.tar.xz (nvidia-pytriton, tritonclient and the dependencies the device lacks, unpacked as `pip install
#    --target` does and xz-compressed to fit the 64 MiB carry limit) and site_stub.tar.xz (numpy 1.26 for Triton's
#    Python-backend stub, which mis-reads BYTES inputs under numpy 2), into $SERVE_ROOT/{site,stub} (default
#    /tmp/qc_serve); checks every file against its wheel's RECORD sha256; installs qc-compile (`pip install --no-deps
#    -e .`); then a .pth file in the interpreter's site-packages puts site first on sys.path of every process and stub
#    first on that of isolated interpreters only (the stub is one; the server keeps the device's numpy 2). The .pth
#    file is removed on exit. SKIP_INSTALL=1 skips all of this (a machine that has the serve extra, e.g. the CPU).
# 2. tools/load_test.py --bad-requests: a one-at-a-time server (--max-batch 1) and a batched one (--max-batch
#    $MAX_BATCH), each first sent every bad request (then a good one that must equal the single-request video), then
#    $REQUESTS requests at each concurrency in $CONCURRENCY; every video checked against the single-request run of its
#    seed; servers stopped with SIGTERM (graceful drain), their logs checked for "Traceback".
# 3. OUTDIR: env.txt, run.log, load_test.json, load_test.md (table with device and commit), load_test.png (latency
#    and throughput vs concurrency), load_test_server_batch1.log, load_test_server_batch$MAX_BATCH.log.
#
# Bounded: the load test stops its clients after $BUDGET_S seconds and is interrupted (servers still stopped) after
# $BUDGET_S + 30; with the defaults the whole script takes about 3-4 minutes on an H200. Exit code 0 only if every
# check passed (load_test.json "ok"); 2 if the environment could not be set up.
set -uo pipefail
OUTDIR=${1:?usage: bash tools/gpu_issue17.sh OUTDIR COMMIT}
COMMIT=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-30}
REQUESTS=${REQUESTS:-16}
CONCURRENCY=${CONCURRENCY:-1,2,4,8}
MAX_BATCH=${MAX_BATCH:-8}
BUDGET_S=${BUDGET_S:-180}
SERVE_ROOT=${SERVE_ROOT:-/tmp/qc_serve}
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
ENV_TXT="$OUTDIR/env.txt"
T0=$(date +%s)
say() { echo "[gpu_issue17 +$(( $(date +%s) - T0 ))s] $*" | tee -a "$ENV_TXT"; }

say "commit $COMMIT, $(date -u +%FT%TZ), device $DEVICE, steps $STEPS, requests $REQUESTS, concurrency $CONCURRENCY, max batch $MAX_BATCH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$ENV_TXT" 2>/dev/null \
  || say "no nvidia-smi"

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  for a in site_serve site_stub; do
    [ -f ".whl_serve/$a.tar.xz" ] || { say "missing .whl_serve/$a.tar.xz (carry .whl_serve)"; exit 2; }
  done
  rm -rf "$SERVE_ROOT" && mkdir -p "$SERVE_ROOT" && tar -xJf .whl_serve/site_serve.tar.xz -C "$SERVE_ROOT" \
    && tar -xJf .whl_serve/site_stub.tar.xz -C "$SERVE_ROOT" || { say "unpacking the serve packages failed"; exit 2; }
  "$PY" "$HERE/serve_site_check.py" record "$SERVE_ROOT/site" "$SERVE_ROOT/stub" >> "$ENV_TXT" 2>&1 \
    || { say "RECORD check failed (see env.txt)"; exit 2; }
  # PyTriton looks for its bundled libraries next to itself only when it sits in a site-packages directory.
  ln -sfn ../../nvidia_pytriton.libs "$SERVE_ROOT/site/pytriton/tritonserver/external_libs"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > /tmp/gpu_issue17_pip.log 2>&1 \
    || { say "pip install -e . failed:"; tail -5 /tmp/gpu_issue17_pip.log | tee -a "$ENV_TXT"; exit 2; }
  PTH="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/qc_serve_site.pth"
  echo "import sys; sys.path[0:0] = ['$SERVE_ROOT/stub'] * bool(sys.flags.isolated) + ['$SERVE_ROOT/site']" \
    > "$PTH" || { say "cannot write $PTH"; exit 2; }
  trap 'rm -f "$PTH"' EXIT
  say "installed the serve packages into $SERVE_ROOT ($PTH) and qc-compile (editable)"
fi

# Triton's Python-backend stub links libpython3.X.so.1.0; server.py puts sysconfig's LIBDIR first on
# LD_LIBRARY_PATH. Where the library is elsewhere (relocated Python builds), put that directory first here.
LIBPY_DIR=$("$PY" "$HERE/serve_site_check.py" libpython)
[ -n "$LIBPY_DIR" ] && export LD_LIBRARY_PATH="$LIBPY_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PY" "$HERE/serve_site_check.py" env >> "$ENV_TXT" 2>&1 \
  || { say "the serve packages do not work here (see env.txt)"; tail -8 "$ENV_TXT"; exit 2; }
say "environment checked (libpython in ${LIBPY_DIR:-NOT FOUND})"

timeout -s INT -k 20 $(( BUDGET_S + 30 )) "$PY" tools/load_test.py qc-ref --device "$DEVICE" --steps "$STEPS" \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --max-batch "$MAX_BATCH" --max-seconds "$BUDGET_S" \
  --request-timeout-s 120 --bad-requests --commit "$COMMIT" --out "$OUTDIR/load_test.json" \
  --plot "$OUTDIR/load_test.png" --md "$OUTDIR/load_test.md" 2>&1 | tee "$OUTDIR/run.log"
RC=${PIPESTATUS[0]}
for log in "$OUTDIR"/load_test_server_batch*.log; do
  [ -f "$log" ] && say "$(basename "$log"): $(grep -c Traceback "$log") traceback(s); $(grep -o 'stopped cleanly.*' "$log" | head -1)"
done
say "load test exit code $RC (0: every check passed), total $(( $(date +%s) - T0 )) s"
exit "$RC"
