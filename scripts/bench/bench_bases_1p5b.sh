#!/usr/bin/env bash
# The quantized-bases benchmark on a random-init model with Qwen2.5-1.5B's shape
# (scripts/bench/qwen2.5-1.5b.config.json; no download): LoRA r=16 on q,k,v,o, batch 4 x
# seq 256, f32 / bf16 / int8 / nf4 bases with and without gradient checkpointing, each in
# its own process (peak RSS = VmHWM), one after another on the same machine.
#   scripts/bench/bench_bases_1p5b.sh [STEPS] [WARMUP]
# One step of this shape takes minutes on a 2-core CPU, so the default is one timed step
# and no warm-up (every configuration pays the same first-step allocations).
set -euo pipefail
cd "$(dirname "$0")/../.."
steps="${1:-1}"
warmup="${2:-0}"
model="random:scripts/bench/qwen2.5-1.5b.config.json"
cargo build --release --quiet -p pipe-train --example bench
bin=target/release/examples/bench
for cfg in "f32 none 0" "f32 nf4 0" "f32 nf4 1" "f32 none 1" "f32 int8 0" "bf16 none 0"; do
  set -- $cfg
  PIPE_BENCH_DTYPE="$1" PIPE_BENCH_BASE="$2" PIPE_BENCH_DQ=1 PIPE_BENCH_CKPT="$3" \
    "$bin" train "$model" --steps "$steps" --warmup "$warmup" --batch 4 --seq 256 --r 16
done
