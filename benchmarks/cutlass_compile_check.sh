#!/usr/bin/env bash
# Compile the CUTLASS translation units of the cutlass and cutlass_fp4 backends with nvcc alone (no GPU, no CUDA
# torch needed) and list the kernel symbols in each cubin: the SM90 bf16 grouped GEMM for sm_90a, the two SM100
# block-scaled FP4 grouped GEMMs (nvfp4, mxfp4) for sm_100a, the SM90 fp8_block grouped GEMM. Minutes each.
#   bash benchmarks/cutlass_compile_check.sh CUTLASS_INCLUDE [OUT_DIR]
# CUTLASS_INCLUDE: the folder holding cutlass/cutlass.h (nvidia-cutlass==4.2.0.0: cutlass_library/source/include).
set -uo pipefail
inc=${1:?usage: cutlass_compile_check.sh CUTLASS_INCLUDE [OUT_DIR]}
out=${2:-${OUT:-/tmp/out}/cutlass_compile}
src=moe/backends/_cutlass
mkdir -p "$out"
compile() {  # source arch
  local name; name=$(basename "$1" .cu)
  local start=$SECONDS
  nvcc -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode=arch=compute_$2,code=sm_$2 -I "$inc" -I "$src" \
    -c "$1" -o "$out/$name.o" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name sm_$2: rc=$rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || { tail -20 "$out/$name.log"; return $rc; }
  objcopy -O binary --only-section=.nv_fatbin "$out/$name.o" "$out/$name.fatbin"
  python3 -c "import sys; d=open(sys.argv[1],'rb').read(); open(sys.argv[2],'wb').write(d[d.find(b'\x7fELF'):])" \
    "$out/$name.fatbin" "$out/$name.cubin"
  readelf -sW "$out/$name.cubin" | awk '$4 == "FUNC" {print $NF}' | grep device_kernel | c++filt | cut -c1-160
}
compile "$src/grouped_gemm_sm90.cu" 90a
compile "$src/grouped_gemm_fp8_sm90.cu" 90a
compile "$src/grouped_gemm_fp4_sm100.cu" 100a
