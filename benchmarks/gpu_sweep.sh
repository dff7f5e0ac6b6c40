#!/usr/bin/env bash
# GPU tests, then a config sweep of the Triton backend on chosen presets/token counts.
set -uo pipefail
S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$S" .whl/*.whl && export PYTHONPATH="$S:$PWD" || exit 1
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider tests ${PYTEST_ARGS:-} \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
for spec in "$@"; do  # preset:m1,m2,...
  python3 -m moe.backends.triton.tuning --preset "${spec%%:*}" --m "${spec#*:}" --json "$OUT/sweep_${spec%%:*}.json" 2>>"$OUT/sweep.err"
done
