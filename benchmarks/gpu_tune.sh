#!/usr/bin/env bash
# One GPU call: tune presets on this card (files into configs/triton, tarred into $OUT/tuned.tar), then
# benchmark them with the tuned files and, for the Triton rows, with them switched off (the heuristic).
#   [TUNE=1] [BENCH=1] [TUNE_TIMEOUT=150] bash benchmarks/gpu_tune.sh [presets] [ms]
# The tune resumes from files already in configs/triton, so a cut-off tune continues in the next call.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT/bench"
presets=${1:-mixtral,qwen3,dsv3}
ms=${2:-1,16,64,256,1024,4096,16384}
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${TUNE:-1}" = 1 ]; then
  for p in ${presets//,/ }; do
    timeout "${TUNE_TIMEOUT:-150}" python3 -m moe tune --preset "$p" --m "$ms" --out configs/triton \
      2>>"$OUT/tune.err" | tee -a "$OUT/tune.txt"
  done
  tar -cf "$OUT/tuned.tar" configs/triton/*.json  # '=' and ',' in the names cannot come back as plain files
fi
if [ "${BENCH:-1}" = 1 ]; then
  for p in ${presets//,/ }; do
    python3 -m moe bench --preset "$p" --m "$ms" --json "$OUT/bench/tuned_$p.json" --no-progress 2>&1 \
      | tee "$OUT/bench/tuned_$p.txt"
    MOE_TUNED_CONFIGS=0 python3 -m moe bench --preset "$p" --m "$ms" --backends triton \
      --json "$OUT/bench/untuned_$p.json" --no-progress > "$OUT/bench/untuned_$p.txt" 2>&1
    grep -E "triton +(eager|graph)" "$OUT/bench/untuned_$p.txt" | sed 's/^/untuned /'
  done
fi
tar -C "$OUT" -cf "$OUT/bench.tar" bench && rm -rf "$OUT/bench"
