#!/usr/bin/env bash
# One GPU call: GPU tests (in parts), the benchmark, the HF and expert-parallel benchmarks; full results
# under $OUT, short tables last.  On the GPU machine (repo root, wheels carried in .whl/):
#   PARTS=tests,host,layer,bench,untuned,hf,hfquant,parallel TESTS=triton,torch_grouped,routing,rest bash benchmarks/gpu_suite.sh [presets] [ms]
# TESTS picks the GPU test parts (each fits one 10-minute command); TEST_TIMEOUT bounds each part.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
parts=",${PARTS:-tests,bench},"
presets=${1:-mixtral,qwen3,dsv3}
ms=${2:-1,16,64,256,1024,4096,16384}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# GPU test parts: marker expressions over the area and backend markers tests/conftest.py adds
test_part() {
  case "$1" in
    all) echo "gpu" ;;
    triton) echo "gpu and kernels and not torch_grouped" ;;
    torch_grouped) echo "gpu and kernels and torch_grouped" ;;
    routing) echo "gpu and routing" ;;
    fuzz) echo "gpu and fuzz" ;;
    quant) echo "gpu and quant" ;;
    native) echo "gpu and native" ;;
    matrix) echo "gpu and matrix" ;;
    rest) echo "gpu and not kernels and not routing and not fuzz and not quant and not native and not matrix" ;;
    *) echo "unknown test part '$1' (all, triton, torch_grouped, routing, fuzz, quant, native, matrix, rest)" >&2
       return 2 ;;
  esac
}
if [[ $parts == *,tests,* ]]; then
  tests=${TESTS:-all}
  for part in ${tests//,/ }; do
    expr=$(test_part "$part") || exit 2
    timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -m "$expr" -q -p no:cacheprovider tests ${PYTEST_K:+-k "$PYTEST_K"} \
      > "$OUT/gpu_tests_$part.log" 2>&1
    echo "gpu tests [$part] rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests_$part.log" | tail -12
  done
fi
if [[ $parts == *,parallel,* ]] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  timeout 240 torchrun --nproc-per-node 2 benchmarks/parallel_gpu.py --out "$OUT/parallel.json" \
    > "$OUT/parallel.txt" 2>&1; echo "parallel rc=$?"; tail -12 "$OUT/parallel.txt"
fi
if [[ $parts == *,hf,* ]]; then
  timeout 240 python3 benchmarks/hf_gpu.py --out "$OUT/hf.json" > "$OUT/hf.txt" 2>&1; echo "hf rc=$?"
  tail -10 "$OUT/hf.txt"
fi
if [[ $parts == *,hfquant,* ]]; then  # each model generates tens of GB of experts on the card
  for m in ${HFQUANT_MODELS:-dsv3_fp8 gptoss_mxfp4}; do  # HFQUANT_MODELS=dsv3_fp8: one a command
    timeout "${HFQUANT_TIMEOUT:-280}" python3 benchmarks/hf_quant_models.py --models "$m" --out "$OUT/hfquant_$m.json" \
      > "$OUT/hfquant_$m.txt" 2>&1; echo "hfquant $m rc=$?"; tail -8 "$OUT/hfquant_$m.txt"
  done
fi
if [[ $parts == *,host,* ]]; then
  timeout 240 python3 benchmarks/host_overhead.py > "$OUT/host.txt" 2>&1; echo "host rc=$?"; tail -8 "$OUT/host.txt"
fi
if [[ $parts == *,layer,* ]]; then
  for lp in ${LAYER_PRESET:-qwen3}; do  # LAYER_PRESET: one preset or several, space-separated
    timeout "${LAYER_TIMEOUT:-540}" python3 benchmarks/layer_profile.py --preset "$lp" --m "${LAYER_M:-16,256,1024}" \
      > "$OUT/layer_$lp.txt" 2>&1; echo "layer $lp rc=$?"; sed -n '/^| preset/,$p' "$OUT/layer_$lp.txt"
  done
fi
if [[ $parts == *,bench,* ]]; then
  # SM clock, power, temperature and the driver's clock-limit reasons while the benchmark runs
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 200 > "$OUT/smi.csv" 2>&1 & SMI=$!
  for p in ${presets//,/ }; do
    python3 -m moe bench --preset "$p" --m "$ms" --json "$OUT/bench_$p.json" --no-progress > "$OUT/bench_$p.txt" 2>&1
    cat "$OUT/bench_$p.txt"
  done
  kill $SMI 2>/dev/null
fi
if [[ $parts == *,untuned,* ]]; then  # the heuristic alone (tuned files off), for the heuristic/tuned ratios
  for p in ${presets//,/ }; do
    MOE_TUNED_CONFIGS=0 python3 -m moe bench --preset "$p" --m "$ms" --backends triton --json "$OUT/untuned_$p.json" \
      --no-progress > "$OUT/untuned_$p.txt" 2>&1
    grep -E "triton +(eager|graph)" "$OUT/untuned_$p.txt"
  done
fi
