#!/usr/bin/env bash
# Fills ./.sonic (git-ignored) with what the sonic backend needs on the GPU machine, within one call's carry
# (64 MiB with .whl and .cutlass): quack-kernels 0.3.11, nvidia-cutlass-dsl 4.4.2 and torch-c-dlpack-ext as wheels, and
# the CuTe DSL libraries (nvidia-cutlass-dsl-libs-cu13, a 78 MB wheel, 187 MB installed; its files are a
# superset of -libs-base's) repacked as libs.tar.xz (about 53 MB; xz -9e takes about 4 minutes).
# apache-tvm-ffi comes with .whl (../shared/gpu/fetch-wheels.sh --deepgemm), not twice.
# benchmarks/gpu_env.sh installs them when .sonic is carried: carry [".whl", ".sonic"].
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.sonic
mkdir -p "$dest"
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$1" "${@:2}" 2>&1 | grep -v "is ignored" || true
}
get "$dest" "quack-kernels==0.3.11" "nvidia-cutlass-dsl==4.4.2" "torch-c-dlpack-ext"
if [ ! -f "$dest/libs.tar.xz" ]; then
  tmp=$(mktemp -d)
  mkdir "$tmp/files"
  get "$tmp" "nvidia-cutlass-dsl-libs-cu13==4.4.2"
  # the archive is written beside the folder it packs, not in it (tar fails when its input changes)
  (cd "$tmp/files" && unzip -q ../*.whl && rm ../*.whl && tar -cf - . | xz -9e -T2 > ../libs.tar.xz)
  mv "$tmp/libs.tar.xz" "$dest/" && rm -rf "$tmp"
fi
ls -la "$dest"; du -sh "$dest"
