#!/usr/bin/env bash
# On the GPU machine: install the package (no deps, offline), run the GPU kernel tests, then the linear benchmark.
# Logs and results go under $OUT (the device tool brings them back). Usage: COMMIT=<sha> bash tools/gpu_kernels_check.sh [bench args]
set -o pipefail
OUT=${OUT:-/tmp/qc_out}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { echo "pip install failed"; tail -5 "$OUT/pip.log"; }
python3 -c "import qc_compile.plugins.ops as o; print('cuda kernels registered:', o.CUDA_KERNELS_REGISTERED)" | tee -a "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -rfE -p no:cacheprovider tests/test_plugins_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  timeout "${BENCH_TIMEOUT:-400}" python3 tools/bench_linear.py --out "$OUT/bench" --commit "${COMMIT:-unknown}" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^  " | tail -60
fi
