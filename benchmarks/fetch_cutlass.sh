#!/usr/bin/env bash
# Fills ./.cutlass (git-ignored) with the CUTLASS/CuTe C++ headers the cutlass backend compiles against on the
# GPU machine: nvidia-cutlass 4.2.0.0's cutlass_library/source/include, repacked as include.tar.xz (about 1 MB
# instead of the 6 MB wheel, so it fits one call's carry beside .whl and .sonic).
# benchmarks/gpu_env.sh unpacks it and sets CUTLASS_HOME when .cutlass is carried: carry [".whl", ".cutlass"].
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cutlass
mkdir -p "$dest"
if [ ! -f "$dest/include.tar.xz" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "nvidia-cutlass==4.2.0.0" 2>&1 | grep -v "is ignored" || true
  (cd "$tmp" && unzip -q ./*.whl 'cutlass_library/source/include/*' \
    && tar -cf - -C cutlass_library/source include | xz -9 -T2 > include.tar.xz)
  mv "$tmp/include.tar.xz" "$dest/" && rm -rf "$tmp"
fi
ls -la "$dest"; du -sh "$dest"
