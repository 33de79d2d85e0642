#!/usr/bin/env bash
# Which block linears' FP8 costs qc-ref the most fidelity (issue 11's checker gap), on the GPU:
#   bash tools/gpu_fp8_roles.sh OUTDIR COMMIT
# 1. ours_fp8 (every unit computed, FP8 block plan) on the 32 tuning captions (caption seed 7, noise seed 0) with
#    each block role kept bf16 in turn (tools/bench_e2e.py --fp8-keep ROLE), plus the plain FP8 plan: PSNR / checker
#    against fp32 per role -> OUTDIR/roles_<role>.json.
# 2. ours_both and ours_fp8 with the caption-token linear (cross_attn.kv_linear) kept bf16 on the 32 held-out
#    captions x noise seeds 0/1000/2000/3000 (128 videos) -> OUTDIR/heldout_kv_bf16.json.
# Timing (H200, b493aa9): part 1 took the whole of a 600 s device call (eight bench processes, each with its own fp32
# reference and compile), so part 2 never ran there: give each part its own call (PART=1 or PART=2).
set -uo pipefail
PART=${PART:-all}
OUT=${1:?usage: bash tools/gpu_fp8_roles.sh OUTDIR COMMIT}
COMMIT=${2:-unknown}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
[ "$PART" = 2 ] || for role in none attn.qkv attn.proj cross_attn.q_linear cross_attn.kv_linear cross_attn.proj mlp.fc1 mlp.fc2; do
  keep=(); [ "$role" != none ] && keep=(--fp8-keep "$role")
  timeout 120 "$PY" tools/bench_e2e.py --fidelity --device cuda --caption-seed 7 --noise-seeds 0 --configs ours_fp8 \
    "${keep[@]}" --commit "$COMMIT" --out-fidelity "$OUT/roles_${role}.json" 2>&1 | grep -E "^ours_fp8|reference" \
    | sed "s/^/[$role] /" | cut -c1-260
done
[ "$PART" = 1 ] || timeout 240 "$PY" tools/bench_e2e.py --fidelity --device cuda --noise-seeds 0,1000,2000,3000 \
  --configs ours_both ours_fp8 --fp8-keep cross_attn.kv_linear --commit "$COMMIT" \
  --out-fidelity "$OUT/heldout_kv_bf16.json" 2>&1 | cut -c1-400
