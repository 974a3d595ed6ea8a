#!/usr/bin/env bash
# Builds pipe with `--features cuda` on any x86-64 Linux machine, GPU or not (toolchain and
# link stubs from scripts/cuda/env.sh), and writes the gzipped binary the GPU benchmark
# carries to dist/pipe-cuda.gz.
#   scripts/build_cuda.sh           build + gzip
#   scripts/build_cuda.sh --check   also clippy-check the CUDA code paths (-D warnings)
# The target directory ($PIPE_CUDA_TARGET, default ~/.cache/pipe-cuda/target) lives outside
# the checkout so that later builds on the same machine, fresh clones included, reuse the
# compiled CUDA kernels (a cold build compiles candle's ~60 .cu files; most of the time).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cuda/env.sh
export CARGO_TARGET_DIR="${PIPE_CUDA_TARGET:-$PIPE_CUDA_HOME/target}"
t0=$(date +%s)
if [ "${1:-}" = "--check" ]; then
  cargo clippy --release --workspace --all-targets --features cuda -- -D warnings
fi
cargo build --release --features cuda --bin pipe
mkdir -p dist
# Debug info stays in the target directory; the carried binary is stripped.
strip --strip-debug -o dist/pipe-cuda.tmp "$CARGO_TARGET_DIR/release/pipe"
gzip -c -6 dist/pipe-cuda.tmp > dist/pipe-cuda.gz.tmp
rm dist/pipe-cuda.tmp
mv dist/pipe-cuda.gz.tmp dist/pipe-cuda.gz
echo "built dist/pipe-cuda.gz ($(du -h dist/pipe-cuda.gz | cut -f1)) in $(( $(date +%s) - t0 )) s"
