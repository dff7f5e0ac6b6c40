#!/usr/bin/env bash
# One GPU call for the quantized paths: the quant GPU tests, `moe tune --quant` (resumable; the files come
# back as $OUT/tuned_quant.tar) and `moe bench --quant` (each name beside bf16 from the same run).
#   PARTS=tests,tune,bench NAMES=fp8_block,... PRESETS=mixtral,... MS=1,16,64 TUNE_MS=1 TUNE_PRESETS=mixtral
#   TUNE_TIMEOUT=120 BACKENDS=triton,torch_grouped bash benchmarks/gpu_quant.sh
# MS="1,16,64,256;4096": one bench run per ';'-separated group of token counts, each under BENCH_TIMEOUT
# PARTS=ab: config A/Bs (benchmarks/config_ab.py), AB_RUNS="cases|names|variants|flags;..." e.g.
#   AB_RUNS="mixtral:1|w4a16,mxfp4||--profile;mixtral:1|w4a16|split2,split4|"
# PARTS=select: selection tables, SELECT_PRESETS / SELECT_NAMES (space-separated), SELECT_MS, SELECT_BACKENDS
# PARTS=profile: PROFILE_CASES (preset:M ...), PROFILE_BACKEND, PROFILE_NAMES (space-separated, none = bf16)
# PYTEST_M: the tests' marker expression (default "gpu and quant"); UNVERIFIED=cutlass: pytest --unverified cutlass
# MOE: the bench's command (default "python3 -m moe"; "python3 benchmarks/unverified.py sonic --" measures a
#   backend still behind its off switch, after its GPU tests passed in the same call)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
parts=",${PARTS:-tests,bench},"
names=${NAMES:-fp8_tensor,fp8_tensor_static,fp8_channel,fp8_block,int8_channel}
presets=${PRESETS:-mixtral,qwen3,dsv3,gptoss120b}
ms=${MS:-1,16,64,256,1024,4096,16384}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ $parts == *,tests,* ]]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -m "${PYTEST_M:-gpu and quant}" -q -rf --tb=short -p no:cacheprovider tests \
    ${PYTEST_K:+-k "$PYTEST_K"} ${UNVERIFIED:+--unverified "$UNVERIFIED"} > "$OUT/gpu_tests_quant.log" 2>&1
  echo "gpu tests [quant] rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests_quant.log" | cut -c1-300 | tail -25
fi
if [[ $parts == *,profile,* ]]; then  # each kernel's time: PROFILE_CASES="dsv3:1 dsv3:16384" PROFILE_BACKEND PROFILE_NAMES
  for n in ${PROFILE_NAMES:-none}; do
    timeout "${PROFILE_TIMEOUT:-90}" python3 benchmarks/profile_kernels.py ${PROFILE_CASES:-dsv3:16384} \
      --backend "${PROFILE_BACKEND:-triton}" $([ "$n" = none ] || echo "--quant $n") > "$OUT/profile_$n.txt" 2>&1
    echo "profile $n rc=$?"; grep -vE "Warning|warn" "$OUT/profile_$n.txt" | cut -c1-110 | head -40
  done
fi
if [[ $parts == *,host,* ]]; then  # host microseconds of an eager call, unquantized and quantized
  for n in none ${HOST_NAMES:-fp8_channel}; do
    python3 benchmarks/host_overhead.py --cases qwen3:1,mixtral:16 --calls 300 \
      $([ "$n" = none ] || echo "--quant $n") ${HOST_PROFILE:+--profile} > "$OUT/host_$n.txt" 2>&1
    echo "host $n"; tail -4 "$OUT/host_$n.txt"
  done
  [ -n "${HOST_PROFILE:-}" ] && grep -A22 "Ordered by" "$OUT/host_${HOST_NAMES:-fp8_channel}.txt" | head -24 | cut -c1-150
fi
if [[ $parts == *,ab,* ]]; then
  IFS=';' read -ra runs <<< "${AB_RUNS:-}"
  i=0
  for run in "${runs[@]}"; do
    IFS='|' read -r cases ab_names variants flags <<< "$run"  # not $names: the bench below reads it
    i=$((i + 1))
    timeout "${AB_TIMEOUT:-240}" python3 benchmarks/config_ab.py --cases "$cases" --quant "$ab_names" \
      --variants "$variants" $flags > "$OUT/ab_$i.txt" 2>&1
    echo "ab $i ($cases $ab_names) rc=$?"; grep -E "^  [a-z0-9]+:" "$OUT/ab_$i.txt" | cut -c1-200
    sed -n '/^case /,$p' "$OUT/ab_$i.txt"
  done
fi
if [[ $parts == *,tune,* ]]; then
  for p in ${TUNE_PRESETS:-mixtral}; do for n in ${TUNE_NAMES:-fp8_channel}; do
    timeout "${TUNE_TIMEOUT:-120}" python3 -m moe tune --preset "${p}" --quant "$n" --m "${TUNE_MS:-1}" \
      --out configs/triton ${TUNE_FORCE:+--force} 2>>"$OUT/tune.err" | tee -a "$OUT/tune.txt"
  done; done
  tar -cf "$OUT/tuned_quant.tar" configs/triton/*quant=*.json 2>/dev/null
  grep -vE "^\s*$" "$OUT/tune.err" | grep -iE "error|skip" | cut -c1-200 | sort | uniq -c | head -5
fi
if [[ $parts == *,select,* ]]; then  # backend selection tables (moe tune --backends): what auto reads
  for p in ${SELECT_PRESETS:-dsv3}; do for n in ${SELECT_NAMES:-fp8_block}; do
    timeout "${SELECT_TIMEOUT:-240}" python3 -m moe tune --preset "$p" --quant "$n" --m "${SELECT_MS:-4096,16384}" \
      --backends "${SELECT_BACKENDS:-triton,deep_gemm}" --out configs/selection 2>>"$OUT/select.err" | tee -a "$OUT/select.txt"
    echo "select $p $n rc=$?"
  done; done
  tar -cf "$OUT/selection.tar" configs/selection/*.json 2>/dev/null
  grep -iE "error|fail" "$OUT/select.err" | cut -c1-200 | sort | uniq -c | head -5
fi
if [[ $parts == *,bench,* ]]; then
  for p in ${presets//,/ }; do  # every name in one run: the bf16 rows measured once
    IFS=';' read -ra groups <<< "$ms"  # MS="1,16;4096": one run per group (a timeout loses only its own)
    for i in "${!groups[@]}"; do
      timeout "${BENCH_TIMEOUT:-300}" ${MOE:-python3 -m moe} bench --preset "$p" --m "${groups[$i]}" $([ "$names" = none ] || echo "--quant $names") \
        --backends "${BACKENDS:-triton}" --json "$OUT/bench_${p}_$i.json" --no-progress > "$OUT/bench_${p}_$i.txt" 2>&1
      echo "bench $p ${groups[$i]} rc=$?"
    done
  done
  python3 benchmarks/quant_table.py "$OUT"/bench_*.json
  [[ ${BACKENDS:-} == *,* ]] && python3 benchmarks/backend_table.py "$OUT"/bench_*.json
  [[ ${BACKENDS:-} == *auto* ]] && python3 benchmarks/auto_table.py "$OUT"/bench_*.json
fi
# one archive: the device tool brings back only a few files
arc=results_$(date +%H%M%S).tgz
tar -C "$OUT" -czf "/tmp/$arc" --exclude 'results_*.tgz' . && find "$OUT" -mindepth 1 ! -name 'results_*.tgz' -delete \
  && mv "/tmp/$arc" "$OUT/"
