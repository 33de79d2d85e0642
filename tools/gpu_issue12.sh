#!/usr/bin/env bash
# Issue 12's must-show sweep on one GPU, from the shipped qc-ref model to a packed result, in at most ~7 minutes.
#
#   CUDA_VISIBLE_DEVICES=1 bash tools/gpu_issue12.sh OUT_DIR [COMMIT]
#
# 1. export qc-ref once, copy the work dir four times, calibrate them in parallel on the device: bf16 uniform with
#    calibrated SRAP thresholds (the `quantcache (calibrated SRAP)` row; every calibration now chooses SRAP thresholds
#    by their measured cost, <= 0.5 dB for >= 3 points of compute, or writes never-pruning ones with the reason:
#    calib/srap.py; `--srap-thresholds` is the default, spelled out for bf16), FP8 uniform at calibrate's defaults
#    (which include per-plan HLC thresholds measured on the plan's quantized run: calib/hlc_thresholds.py),
#    AIGQ, AIGQ with --vc --predictor (the VC / DMPQ rows). A calibration that fails or passes its time limit drops its rows
#    (listed under "not run" in sweep.md), nothing else.
# 2. tools/must_show_sweep.py on the held-out captions and noise seeds 0 and 1000, all rows in priority order over
#    QC12_JOBS worker processes sharing the GPU, with a deadline: the row groups it cannot finish are listed as cut.
#    The last tier (cut first) is the FP8 plan's schedule at equal average bits: its own high steps without caching,
#    the same number moved to the least-changing steps or spread evenly, and none, with and without quantcache
#    (calib/schedule_controls.py; ~60 s more on one H200 with 10 jobs, hence QC12_TOTAL_S 420).
# 3. pack OUT_DIR into OUT_DIR.tgz (< 16 MB) and leave OUT_DIR/{sweep.json,sweep.md,pareto.png,log.txt} beside it.
#
# Overrides (CPU smoke test: QC12_DEVICE=cpu QC12_CAPTIONS=2 QC12_SEEDS=0 QC12_STEPS=4 QC12_JOBS=2):
#   QC12_DEVICE (cuda) QC12_CAPTIONS (32) QC12_SEEDS (0,1000) QC12_STEPS (model default, 30) QC12_JOBS (12)
#   QC12_TOTAL_S (420: the whole script) QC12_CALIB_S (150: each calibration) QC12_WORK (/tmp/qc12_work: work dirs,
#   not packed) QC12_CALIB_PROMPTS (calibrate's default) QC12_KEEP=1 (keep OUT_DIR unpacked too) PYTHON (python3)
#   QC12_REUSE=1 (keep QC12_WORK's work dirs that have a plan.json: re-run only the sweep and the failed calibrations)
set -u -o pipefail
OUT=${1:?usage: bash tools/gpu_issue12.sh OUT_DIR [COMMIT]}
OUT=$(realpath -m "${OUT%/}")
cd "$(dirname "$0")/.." || exit 1  # the repository root: tools/must_show_sweep.py and `pip install -e .` need it
COMMIT=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
DEV=${QC12_DEVICE:-cuda}
CAPTIONS=${QC12_CAPTIONS:-32}
SEEDS=${QC12_SEEDS:-0,1000}
STEPS=${QC12_STEPS:-}
JOBS=${QC12_JOBS:-12}
TOTAL=${QC12_TOTAL_S:-420}
CALIB_S=${QC12_CALIB_S:-150}
WORK=${QC12_WORK:-/tmp/qc12_work}
PY=${PYTHON:-python3}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - $(date +%s) + T0 )); }

mkdir -p "$OUT" || exit 1
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 QC_COMMIT="$COMMIT"
echo "gpu_issue12: out=$OUT commit=$COMMIT device=$DEV captions=$CAPTIONS seeds=$SEEDS steps=${STEPS:-default}" \
     "jobs=$JOBS budget=${TOTAL}s $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
if ! "$PY" -c "import qc_compile, sys; sys.exit(0 if qc_compile.__file__.startswith('$PWD/') else 1)" 2>/dev/null; then
  echo "installing this tree (pip -e, no deps)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
fi
QCC=("$PY" -c 'import sys; from qc_compile.cli import main; sys.argv[0] = "qc-compile"; sys.exit(main())')
STEP_ARGS=(); [ -n "$STEPS" ] && STEP_ARGS=(--steps "$STEPS")
PROMPT_ARGS=(); [ -n "${QC12_CALIB_PROMPTS:-}" ] && PROMPT_ARGS=(--num-prompts "$QC12_CALIB_PROMPTS")

# ---- 1. work dirs ---------------------------------------------------------------------------------------------------
REUSE=${QC12_REUSE:-0}  # 1: keep the work dirs of an earlier run that have a plan (re-run the sweep only)
if [ "$REUSE" = 1 ] && [ -d "$WORK/exp" ]; then
  mkdir -p "$OUT/plans"
else
  rm -rf "$WORK" && mkdir -p "$WORK" "$OUT/plans"
  # export needs the packages a GPU image lacks (carried as wheels): say which one is missing before anything runs
  for mod in onnx_graphsurgeon jsonschema click tqdm; do
    "$PY" -c "import $mod" 2>/dev/null || { echo "missing Python package '$mod' (carry its wheel: see .whl in the device notes)"; exit 2; }
  done
  timeout 90 "${QCC[@]}" export qc-ref -o "$WORK/exp" --quiet || { echo "export failed"; exit 1; }
  echo "[$(elapsed) s] exported"
fi
declare -A PIDS
declare -A CAL=(
  [bf16]="--uniform bf16 --srap-thresholds"
  [fp8]="--uniform fp8"
  [aigq]="--method aigq"
  [aigq_vc]="--method aigq --vc --predictor"
)
for k in bf16 fp8 aigq aigq_vc; do
  if [ "$REUSE" = 1 ] && [ -f "$WORK/$k/plan.json" ]; then (exit 0) & PIDS[$k]=$!; continue; fi
  rm -rf "${WORK:?}/$k" && cp -r "$WORK/exp" "$WORK/$k"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=3 timeout "$CALIB_S" "${QCC[@]}" calibrate "$WORK/$k" ${CAL[$k]} --device "$DEV" --quiet "${STEP_ARGS[@]}" "${PROMPT_ARGS[@]}" \
    > "$OUT/plans/calibrate_$k.log" 2>&1 &
  PIDS[$k]=$!
done
SWEEP_ARGS=()
for k in bf16 fp8 aigq aigq_vc; do
  wait "${PIDS[$k]}"; rc=$?
  echo "[$(elapsed) s] calibrate $k (${CAL[$k]}): rc=$rc; $(tail -2 "$OUT/plans/calibrate_$k.log" 2>/dev/null | tr '\n' ' ' || echo reused)"
  if [ $rc -eq 0 ] && [ -f "$WORK/$k/plan.json" ]; then
    SWEEP_ARGS+=("--${k//_/-}" "$WORK/$k")
    mkdir -p "$OUT/plans/$k" && cp "$WORK/$k/plan.json" "$OUT/plans/$k/" && cp -r "$WORK/$k/report" "$OUT/plans/$k/" 2>/dev/null
  else
    echo "  -> its rows are dropped (rc 124 = passed QC12_CALIB_S=${CALIB_S}s)"
  fi
done

# ---- 2. the sweep ---------------------------------------------------------------------------------------------------
DEADLINE=$(( $(left) - 30 ))   # 30 s: the last tasks in flight, the final table and the packing
if [ "$DEADLINE" -lt 20 ]; then DEADLINE=20; fi
echo "[$(elapsed) s] sweep: deadline ${DEADLINE}s"
SW_STEPS=(); [ -n "$STEPS" ] && SW_STEPS=(--steps "$STEPS")
timeout -k 5 $(( DEADLINE + 25 )) "$PY" tools/must_show_sweep.py "${SWEEP_ARGS[@]}" --device "$DEV" --jobs "$JOBS" \
  --prompts "$CAPTIONS" --seeds "$SEEDS" "${SW_STEPS[@]}" --deadline-s "$DEADLINE" --commit "$COMMIT" -o "$OUT" \
  > "$OUT/sweep.log" 2>&1
rc=$?
grep -v "^  call " "$OUT/sweep.log" | grep -E "row groups|done$|CUT|not run|Error|error" | tail -30
echo "[$(elapsed) s] sweep rc=$rc$( [ $rc -eq 124 ] && echo ' (killed by timeout: sweep.json holds the row groups finished before)')"
[ -f "$OUT/sweep.md" ] && sed -n '/^| policy/,/^$/p' "$OUT/sweep.md"

# ---- 3. pack --------------------------------------------------------------------------------------------------------
PARENT=$(dirname "$OUT"); NAME=$(basename "$OUT")
tar czf "$OUT.tgz" -C "$PARENT" "$NAME"
if [ "$(stat -c %s "$OUT.tgz")" -gt 16000000 ]; then  # drop the per-row first-video traces first
  tar czf "$OUT.tgz" -C "$PARENT" --exclude="$NAME/runs/*/trace.json" "$NAME"
fi
echo "[$(elapsed) s] packed $OUT.tgz ($(du -h "$OUT.tgz" | cut -f1))"
if [ "${QC12_KEEP:-0}" != "1" ]; then  # the device returns at most 8 files: the archive and the headline files
  find "$OUT" -mindepth 1 -maxdepth 1 ! -name sweep.json ! -name sweep.md ! -name pareto.png ! -name log.txt \
    -exec rm -rf {} +
fi
exit $rc
