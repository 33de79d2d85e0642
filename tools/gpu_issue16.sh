#!/usr/bin/env bash
# Issue 16 item 3 on the GPU machine: the peers' own code beside qc-compile's policies on qc-ref-wan.
#
#   bash tools/gpu_issue16.sh OUTDIR COMMIT        # in the repo root; writes 4 files into OUTDIR
#
# 1. Installs the carried wheels offline (pip --target $SITE, default /tmp/site16, first on PYTHONPATH): .whl/
#    (click, jsonschema & co, imageio, tqdm, diffusers 0.42.1, torchao 0.18.0, ...) and .whl16/ (cache-dit 1.5.3,
#    nvidia-modelopt 0.47.0 and what it imports that the device image lacks: omegaconf, pulp, pydantic,
#    pydantic-core, annotated-types, typing-inspection); then qc-compile itself (`pip install --no-deps -e .`).
#    SKIP_INSTALL=1 skips this. A library that still fails to import gives skipped rows with the reason (the
#    sweep goes on).
# 2. Builds ModelOpt's FP8 fake-quant CUDA extension first (nvcc, about a minute; ModelOpt builds it on first use)
#    and waits for it (at most 150 s): a build beside the sweep slowed the baselines' timing.
# 3. tools/peers_wan.py on all 32 held-out captions at the model's 30 steps, bf16, $REPEATS timed generations per
#    row (the slower of 2 is reported: about 100 generations in all fit the budget): qc-compile's policies first,
#    then cache-dit's DBCache, torchao / ModelOpt FP8, diffusers' hooks. Rows that
#    would end past --budget-s $BUDGET_S are recorded as skipped (with the reason); the JSON is rewritten after
#    every row, so even the hard `timeout $HARD_S` leaves the finished rows (then re-rendered with --from-json).
# 4. OUTDIR: peers_wan.json (device, commit, versions, every row), peers_wan.md (the table), peers_wan.png (Pareto
#    plots: block linear MACs and wall time vs PSNR), run.log (everything printed, with timings).
#
# About 4.5 minutes on one H200 with the defaults (the sweep's hard limit is 4.5 minutes after the build).
set -uo pipefail
OUTDIR=${1:?usage: bash tools/gpu_issue16.sh OUTDIR COMMIT}
COMMIT=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
N=${N:-32}
REPEATS=${REPEATS:-2}
BUDGET_S=${BUDGET_S:-170}
HARD_S=${HARD_S:-215}
SITE=${SITE:-/tmp/site16}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
EXTRA_ARGS=${EXTRA_ARGS:-}  # more peers_wan.py options (a CPU check of this script: --checkpoint, --steps, ...)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export QC_COMMIT="$COMMIT"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/run.log"
EXT_LOG=$(mktemp /tmp/modelopt_ext.XXXXXX)
T0=$(date +%s)
say() { echo "[gpu_issue16 +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

say "commit $COMMIT, $(date -u +%FT%TZ), device $DEVICE $DTYPE, n $N, repeats $REPEATS, budget ${BUDGET_S}s, hard limit ${HARD_S}s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$LOG" 2>&1 || say "no nvidia-smi"

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  WHEELS=$(ls .whl/*.whl .whl16/*.whl 2>/dev/null)
  [ -n "$WHEELS" ] || say "no carried wheels in .whl/ or .whl16/ (carry them); using what is installed"
  if [ -n "$WHEELS" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $WHEELS \
      >> "$LOG" 2>&1 || say "installing the carried wheels failed (see above); going on"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || say "pip install -e . failed"
fi
"$PY" - >> "$LOG" 2>&1 <<'EOF'
import importlib.metadata as md, torch  # versions without importing the peers (slow); the sweep imports them
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for d in ("diffusers", "cache-dit", "torchao", "nvidia-modelopt", "pydantic", "pulp", "omegaconf", "qc-compile"):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, "NOT INSTALLED")
EOF
say "installed"

# ModelOpt's FP8 extension, built before the sweep: an nvcc build beside the sweep took the CPU from the
# baselines' timing (launch-bound at this model size) and made every row's time ratio look better than it was
"$PY" -c "from modelopt.torch.quantization.extensions import get_cuda_ext_fp8; print('modelopt fp8 ext:', get_cuda_ext_fp8())" \
  > "$EXT_LOG" 2>&1 &
EXT_PID=$!
timeout 150 tail --pid="$EXT_PID" -f /dev/null
say "ModelOpt extension build finished or stopped waiting"

say "peers_wan.py start"
timeout -k 10 "$HARD_S" "$PY" tools/peers_wan.py --device "$DEVICE" --dtype "$DTYPE" --n "$N" --batch "$N" \
  --repeats "$REPEATS" --budget-s "$BUDGET_S" $EXTRA_ARGS --json "$OUTDIR/peers_wan.json" --md "$OUTDIR/peers_wan.md" \
  --plot "$OUTDIR/peers_wan.png" >> "$LOG" 2>&1
RC=$?
say "peers_wan.py exit code $RC"
if [ ! -f "$OUTDIR/peers_wan.png" ] && [ -f "$OUTDIR/peers_wan.json" ]; then
  say "re-rendering the table and plot from the rows that finished"
  "$PY" tools/peers_wan.py --from-json "$OUTDIR/peers_wan.json" --md "$OUTDIR/peers_wan.md" \
    --plot "$OUTDIR/peers_wan.png" > /dev/null 2>> "$LOG"
fi
if kill -0 "$EXT_PID" 2>/dev/null; then say "ModelOpt extension build still running: stopped"; kill "$EXT_PID"; fi
wait "$EXT_PID" 2>/dev/null
tail -n 5 "$EXT_LOG" >> "$LOG" 2>/dev/null
rm -f "$EXT_LOG"
say "done; files: $(ls "$OUTDIR" | tr '\n' ' ')"
exit "$RC"
