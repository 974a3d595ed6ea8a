#!/usr/bin/env bash
# Oracle labelling through an OpenAI-compatible server: `pipe serve` against
# llama-cpp-python's server (PyPI `llama-cpp-python[server]`), same SmolLM2-135M-Instruct
# Q4_1 GGUF, same machine, one after the other in this run. The same N requests (a long
# shared rubric as the system message, one passage each, the rubric's JSON schema as
# response_format, greedy, at most 96 tokens) at concurrency 1, 4 and 16, each
# configuration on a freshly started server (so no configuration inherits another's
# caches; each server gets one untimed warm-up request). Prints one JSON line per run
# (scripts/bench/oracle_clients.py) and a table with the items/s ratio pipe / llama.cpp.
#
# llama-cpp-python is built from source into ~/.cache/pipe-py/llamacpp (once, ~10 min on
# 2 cores) for AVX2/AVX-512 without AMX: a native build on this VM dies with a general
# protection fault in libggml-cpu at the first request (the AMX tiles are advertised
# but not usable). Both servers run on all cores (llama.cpp: --n_threads and
# --n_threads_batch = nproc).
#   scripts/bench/serve_vs_llamacpp.sh [N]      (default 48)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-48}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$MODEL" ] || scripts/fetch_smollm2.sh
VENV=${PIPE_LLAMACPP_VENV:-$HOME/.cache/pipe-py/llamacpp}
if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  python3 -m venv "$VENV"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    "$VENV/bin/pip" install -q "llama-cpp-python[server]==0.3.36"
fi
cargo build --release -q ${CARGO_TARGET_DIR:+--target-dir "$CARGO_TARGET_DIR"}
PIPE="${CARGO_TARGET_DIR:-$PWD/target}/release/pipe"
PY="$VENV/bin/python"
WORK=$(mktemp -d)
SERVER_PID=
stop() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; fi; }
trap 'stop; rm -rf "$WORK"' EXIT
THREADS=$(nproc)

wait_ready() { # $1 = port
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server on port $1 did not start" >&2; cat "$WORK/server.log" >&2; return 1
}

echo "oracle requests through a server: $N items, $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for c in 1 4 16; do
  PORT=$((20000 + RANDOM % 20000))
  "$PIPE" serve "gguf:$MODEL" --port $PORT --max-batch 16 --device cpu > "$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  wait_ready $PORT
  "$PY" scripts/bench/oracle_clients.py "http://127.0.0.1:$PORT/v1" $c "$N" --label pipe | tee -a "$WORK/results.jsonl"
  stop
  PORT=$((20000 + RANDOM % 20000))
  "$PY" -m llama_cpp.server --model "$MODEL" --n_ctx 4096 --n_threads "$THREADS" \
    --n_threads_batch "$THREADS" --host 127.0.0.1 --port $PORT > "$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  wait_ready $PORT
  "$PY" scripts/bench/oracle_clients.py "http://127.0.0.1:$PORT/v1" $c "$N" --label llama.cpp --schema-form llama | tee -a "$WORK/results.jsonl"
  stop
done
python3 - "$WORK/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["label"], r["concurrency"]): r for r in rows}
print(f"{'concurrency':>11} | {'pipe items/s':>12} | {'llama.cpp items/s':>17} | {'ratio':>5} | "
      f"{'pipe p50/p95 s':>14} | {'llama.cpp p50/p95 s':>19} | valid pipe/llama")
for c in (1, 4, 16):
    p, l = by[("pipe", c)], by[("llama.cpp", c)]
    print(f"{c:>11} | {p['items_per_s']:>12.2f} | {l['items_per_s']:>17.2f} | "
          f"{p['items_per_s'] / l['items_per_s']:>5.2f} | {p['p50_s']:>6.2f}/{p['p95_s']:<7.2f} | "
          f"{l['p50_s']:>9.2f}/{l['p95_s']:<9.2f} | {p['valid_replies']}/{l['valid_replies']}")
PY
