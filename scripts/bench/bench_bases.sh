#!/usr/bin/env bash
# Training speed and peak memory of one LoRA step loop on frozen bases stored as f32,
# bf16, int8 and NF4, with and without gradient checkpointing: each configuration in
# its own process (peak RSS = VmHWM of that process), same machine, same run.
#   scripts/bench/bench_bases.sh [MODEL] [STEPS] [BATCH] [SEQ]
# MODEL defaults to the SmolLM2 GGUF (scripts/fetch_smollm2.sh fetches it). LoRA r=16
# on q,k,v,o; BATCH x SEQ (default 4 x 256) for every base, then batch 1 x seq 1024 with
# and without checkpointing (activation memory; PIPE_BENCH_LONG=0 skips it).
# PIPE_BENCH_CONFIGS picks configurations, DTYPE:BASE:CHECKPOINT each (base none, int8,
# nf4, or keep: the GGUF file's own blocks).
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:-gguf:models/SmolLM2-135M-Instruct.Q4_1.gguf}"
steps="${2:-3}"
batch="${3:-4}"
seqlen="${4:-256}"
cargo build --release --quiet -p pipe-train --example bench
bin=target/release/examples/bench
run() { # dtype base ckpt batch seq
  PIPE_BENCH_DTYPE="$1" PIPE_BENCH_BASE="$2" PIPE_BENCH_DQ=1 PIPE_BENCH_CKPT="$3" \
    "$bin" train "$model" --steps "$steps" --batch "$4" --seq "$5" --r 16
}
configs=${PIPE_BENCH_CONFIGS:-"f32:none:0 bf16:none:0 f32:int8:0 f32:nf4:0 f32:keep:0 f32:none:1 f32:nf4:1"}
for cfg in $configs; do
  IFS=: read -r -a parts <<< "$cfg"
  set -- "${parts[@]}"
  run "$1" "$2" "$3" "$batch" "$seqlen"
done
if [ "${PIPE_BENCH_LONG:-1}" = 1 ]; then
  for ckpt in 0 1; do
    run f32 none "$ckpt" 1 1024
  done
fi
