# Sourced by the GPU scripts (gpu_suite.sh, gpu_quant.sh, gpu_tune.sh) at the repo root on the GPU machine:
# installs the carried wheels (.whl/) into a temporary folder, puts it and the tree on PYTHONPATH, and
# makes $OUT.
S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$S" .whl/*.whl && export PYTHONPATH="$S:$PWD" || exit 1
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# sonic (benchmarks/fetch_sonic.sh): QuACK's wheels and the CuTe DSL libraries, when .sonic travels too
if [ -d .sonic ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$S" .sonic/*.whl \
    && tar -xJf .sonic/libs.tar.xz -C "$S" && export PYTHONPATH="$S/nvidia_cutlass_dsl/python_packages:$PYTHONPATH" \
    || exit 1
fi
# cutlass (benchmarks/fetch_cutlass.sh): the CUTLASS headers, when .cutlass travels
if [ -f .cutlass/include.tar.xz ]; then
  mkdir -p "$S/cutlass" && tar -xJf .cutlass/include.tar.xz -C "$S/cutlass" && export CUTLASS_HOME="$S/cutlass" || exit 1
fi
