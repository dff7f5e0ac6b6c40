#!/usr/bin/env bash
# One GPU call: the GPU test suite, then the benchmark; full results under $OUT, a short table last.
# Usage on the GPU machine (repo root, wheels carried in .whl/):  bash benchmarks/gpu_suite.sh [presets] [ms]
set -uo pipefail
S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$S" .whl/*.whl && export PYTHONPATH="$S:$PWD" || exit 1
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
presets=${1:-mixtral,qwen3,dsv3}
ms=${2:-1,16,64,256,1024,4096,16384}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -m gpu -q -x -p no:cacheprovider tests ${PYTEST_ARGS:-} \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
for p in ${presets//,/ }; do
  python3 -m moe bench --preset "$p" --m "$ms" --json "$OUT/bench_$p.json" --no-progress > "$OUT/bench_$p.txt" 2>&1
  cat "$OUT/bench_$p.txt"
done
