#!/usr/bin/env bash
# Builds dist/gpu/, what scripts/bench/gpu.sh needs on a GPU machine that has no Rust
# toolchain and no network (carry it there with the checkout):
#   bench.gz, parity.gz, pipe.gz   the CUDA builds (stripped, gzipped) of the benchmark
#                                  example, the parity test binary and the CLI;
#   python/bitsandbytes            bitsandbytes 0.50.2 with only its CPU and CUDA 13.0
#                                  libraries (the GPU machines run torch cu130), for the
#                                  NF4 reference, put on PYTHONPATH by gpu.sh.
# Runs on any x86-64 Linux machine, GPU or not (scripts/cuda/env.sh provides nvcc and
# link stubs). Prints the bundle's size.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/build_cuda.sh
. scripts/cuda/env.sh
export CARGO_TARGET_DIR="${PIPE_CUDA_TARGET:-$PIPE_CUDA_HOME/target}"
cargo build --release --features cuda -p pipe-train --example bench
parity="$(cargo test --release --features cuda -p pipe-train --test parity --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    d = json.loads(l)
    if d.get("reason") == "compiler-artifact" and d.get("executable") and d["target"]["name"] == "parity":
        print(d["executable"])')"
rm -rf dist/gpu.tmp
mkdir -p dist/gpu.tmp/python
pack() { strip --strip-debug -o "dist/gpu.tmp/$2" "$1" && gzip -6 "dist/gpu.tmp/$2"; }
pack "$CARGO_TARGET_DIR/release/examples/bench" bench
pack "$parity" parity
cp dist/pipe-cuda.gz dist/gpu.tmp/pipe.gz
wheels="$(mktemp -d)"
python3 -m pip download --quiet --no-deps bitsandbytes==0.50.2 -d "$wheels"
python3 - "$wheels"/bitsandbytes-*.whl dist/gpu.tmp/python <<'PY'
import re, sys, zipfile
keep = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.endswith(".so") and not keep.search(n):
            continue
        z.extract(n, sys.argv[2])
PY
rm -rf "$wheels" dist/gpu
mv dist/gpu.tmp dist/gpu
du -sh dist/gpu
ls -la dist/gpu
