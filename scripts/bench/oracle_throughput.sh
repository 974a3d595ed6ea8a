#!/usr/bin/env bash
# Oracle throughput (items/s) of batch_label on SmolLM2-135M-Instruct (Q4_1 GGUF):
# the local backend at batch sizes 1, 4, 16, and the openai backend against
# `pipe serve` (same model, --max-batch 16) at concurrency 1, 4, 16. Every
# configuration labels the same N records with an empty memo (its own store), so
# nothing is reused; items/s is batch_label's own metric (model loading excluded).
#   scripts/bench/oracle_throughput.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-48}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MODEL" ] || scripts/fetch_smollm2.sh
cargo build --release -q
PIPE=$PWD/target/release/pipe
WORK=$(mktemp -d)
trap 'kill $SERVE_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
SERVE_PID=

pipeline() { # $1 = oracle flow mapping body
  cat > "$WORK/bench.yaml" <<YAML
name: oracle_bench
workdir: $PWD
stages:
  build_data:
    uses: build_data
    with:
      sources:
        - {format: jsonl, name: trivia, path: examples/data/oracle/trivia.jsonl, fields: {id: qid, question: q, answers: gold}}
        - {format: hotpotqa, path: examples/data/raw/hotpot_dev_distractor.json}
        - {format: nq_open, path: examples/data/raw/NQ-open.dev.jsonl}
        - {format: popqa, path: examples/data/raw/popQA.tsv}
      corpus: examples/data/oracle/passages.jsonl
      evidence_k: 3
      max_reject_rate: 0.4
  batch_label:
    uses: batch_label
    inputs: {corpus: build_data.records}
    with:
      limit: $N
      batch_size: 16
      oracle: {template: prompts/oracle_answer.j2, returns: {answer: string}, reply_prefix: '{"answer": "', max_new_tokens: 32, retries: 0, $1}
YAML
}

measure() { # $1 = label
  local cache="$WORK/cache-$RANDOM$RANDOM"
  "$PIPE" --cache "$cache" run "$WORK/bench.yaml" --no-progress >/dev/null 2>&1
  local ips
  ips=$("$PIPE" --cache "$cache" show batch_label --pipeline oracle_bench 2>/dev/null | awk '/metric +items_per_s/ {print $4}')
  printf '%-32s %8.2f items/s\n' "$1" "$ips"
}

echo "oracle throughput, $N items, $(nproc) CPUs"
for b in 1 4 16; do
  pipeline "backend: local, model: \"gguf:$MODEL\", device: cpu, batch_size: $b"
  measure "local batch_size=$b"
done
# A fresh server per configuration: pipe serve answers a repeated Idempotency-Key from
# its cache, and every configuration asks the same prompts.
for c in 1 4 16; do
  PORT=$((20000 + RANDOM % 20000))
  "$PIPE" serve "gguf:$MODEL" --port $PORT --max-batch 16 --device cpu > "$WORK/serve.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 100); do grep -q listening "$WORK/serve.log" && break; sleep 0.2; done
  pipeline "backend: openai, model: smollm2, base_url: \"http://127.0.0.1:$PORT/v1\", concurrency: $c, timeout_s: 300"
  measure "openai→pipe serve concurrency=$c"
  kill $SERVE_PID; wait $SERVE_PID 2>/dev/null || true
done
