#!/usr/bin/env bash
# The GPU check of pipe's CUDA training core, for a GPU machine without network or Rust
# toolchain (an H100/H200 with torch, transformers and peft installed):
#   scripts/bench/gpu.sh [OUT]        (OUT defaults to $OUT, else /tmp/pipe-gpu-out)
# It needs dist/gpu/, which scripts/bench/gpu_pack.sh builds on any machine (carry it):
# the CUDA binaries (bench, parity tests, pipe) gzipped, and a trimmed bitsandbytes.
#  1. parity tests on CUDA: every family against the committed transformers/PEFT
#     fixtures, in f32 (logits 1e-4, loss 1e-5, gradients 1e-4 relative) and bf16
#     (0.1, 0.01, 0.1);
#  2. LoRA r=16 on all seven projections, seq 2048, bf16, on random-init models with the
#     shapes of Qwen2.5-0.5B and Qwen2.5-7B (scripts/bench/qwen2.5-*.config.json), dense
#     bf16 and NF4 bases: pipe, then PyTorch + PEFT (+ bitsandbytes) from the same start
#     (pipe writes the base, the initial adapter and the data with --save-init): tokens/s,
#     peak GPU memory (nvidia-smi, sampled every 100 ms, the same way for both) and the
#     loss of each of the 20 steps;
#  3. OUT/table.md with the ratios, OUT/*.json with every measurement.
# Every phase has a timeout and PIPE_GPU_BUDGET_S (default 540) bounds the whole run: a
# phase that would not fit is skipped and named in the table. Dry run on a CPU machine:
#   PIPE_GPU_DEVICE=cpu PIPE_GPU_BIN=DIR PIPE_GPU_SHAPES=tiny PIPE_GPU_SEQ=64 \
#   PIPE_GPU_STEPS=4 PIPE_GPU_DTYPE=f32 scripts/bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
root="$PWD"
out="${1:-${OUT:-/tmp/pipe-gpu-out}}"
mkdir -p "$out"
work="${PIPE_GPU_WORK:-/tmp/pipe-gpu}"
mkdir -p "$work"
device="${PIPE_GPU_DEVICE:-cuda}"
dtype="${PIPE_GPU_DTYPE:-bf16}"
steps="${PIPE_GPU_STEPS:-20}"
seq="${PIPE_GPU_SEQ:-2048}"
shapes="${PIPE_GPU_SHAPES:-0.5b 7b}"
budget="${PIPE_GPU_BUDGET_S:-540}"
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
log() { echo "[gpu.sh $(( $(date +%s) - t0 ))s] $*" | tee -a "$out/log.txt"; }
skipped=()

# --- binaries
bin="${PIPE_GPU_BIN:-}"
if [ -z "$bin" ]; then
  bin="$work/bin"
  mkdir -p "$bin"
  for f in dist/gpu/*.gz; do
    name="$(basename "$f" .gz)"
    gunzip -c "$f" > "$bin/$name" && chmod +x "$bin/$name"
  done
fi
log "binaries: $(ls "$bin" | tr '\n' ' ')"
if [ -d dist/gpu/python ]; then
  export PYTHONPATH="$root/dist/gpu/python${PYTHONPATH:+:$PYTHONPATH}"
fi
py="${PIPE_GPU_PYTHON:-python3}"
# cuBLAS, cuRAND and NVRTC of the SONAMEs the binaries link: torch's CUDA 13 wheels ship
# them in site-packages/nvidia/cu13/lib (the driver's libcuda is on the system path).
nvlib="$("$py" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2> /dev/null || true)"
if [ -n "$nvlib" ] && [ -d "$nvlib" ]; then
  export LD_LIBRARY_PATH="$nvlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
for b in "$bin"/*; do
  missing="$(ldd "$b" 2> /dev/null | grep 'not found' | tr -s ' \t\n' ' ')"
  [ -n "$missing" ] && log "$(basename "$b"): missing libraries: $missing"
done
{
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
  "$py" -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)'
} > "$out/env.txt" 2>&1
log "$(tr '\n' ' ' < "$out/env.txt")"

# --- GPU memory: memory.used of the GPU sampled every 100 ms while a run is the only
# thing on it, minus what was used before it started (the same for pipe and PyTorch;
# it includes each process's CUDA context).
smi() { command -v nvidia-smi > /dev/null && [ "$device" = cuda ]; }
used_now() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }

# run NAME TIMEOUT CMD...: runs CMD, its last stdout line (JSON) into OUT/NAME.json with
# the peak GPU memory it added.
run() {
  local name="$1" limit="$2"
  shift 2
  if [ "$(left)" -lt "$limit" ]; then
    log "skip $name: $(left) s left, it may take $limit"
    skipped+=("$name")
    return 1
  fi
  log "start $name"
  local sampler="" base=0
  if smi; then
    base="$(used_now)"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/$name.mem" 2> /dev/null &
    sampler=$!
  fi
  timeout "$limit" "$@" > "$out/$name.stdout" 2> "$out/$name.stderr"
  local rc=$?
  [ -n "$sampler" ] && kill "$sampler" 2> /dev/null && wait "$sampler" 2> /dev/null
  local peak=null
  if [ -n "$sampler" ]; then
    peak=$(( $(sort -n "$out/$name.mem" | tail -1) - base ))
  fi
  local js
  js="$(grep '^{' "$out/$name.stdout" | tail -1)"
  if [ "$rc" -ne 0 ] || [ -z "$js" ]; then
    log "$name failed (rc $rc): $(tail -3 "$out/$name.stderr" | tr '\n' ' ')"
    skipped+=("$name (rc $rc)")
    return 1
  fi
  echo "$js" | "$py" -c 'import json,sys; d=json.load(sys.stdin); d["gpu_peak_mib"]=json.loads(sys.argv[1]); print(json.dumps(d))' "$peak" > "$out/$name.json"
  log "done $name: peak $peak MiB"
}

# --- 1. parity on the device: f32 and bf16 against the fixtures, and the chunked attention
if [ -x "$bin/parity" ]; then
  log "parity"
  PIPE_TEST_DEVICE="$device" PIPE_FIXTURES="$root/train/tests/fixtures" \
    timeout 300 "$bin/parity" --test-threads 1 --nocapture > "$out/parity.log" 2>&1
  log "parity rc=$? $(grep 'test result' "$out/parity.log" | tail -1)"
else
  skipped+=("parity (no binary)")
fi

# --- 2. the benchmark
declare -A batch_of=([0.5b]=4 [7b]=1 [tiny]=2)
declare -A limit_of=([0.5b]=240 [7b]=420 [tiny]=300)
for shape in $shapes; do
  config="scripts/bench/qwen2.5-$shape.config.json"
  [ "$shape" = tiny ] && config="scripts/bench/qwen2-tiny.config.json"
  b="${PIPE_GPU_BATCH:-${batch_of[$shape]:-1}}"
  lim="${limit_of[$shape]:-300}"
  init="$work/init-$shape"
  args=(train "random:$config:1" --steps "$steps" --batch "$b" --seq "$seq" --r 16 --targets all --warmup 0)
  # Dense base: pipe writes the start, PyTorch + PEFT train from it.
  PIPE_BENCH_DEVICE="$device" PIPE_BENCH_DTYPE="$dtype" PIPE_BENCH_BASE=none \
    run "pipe-$shape-$dtype" "$lim" "$bin/bench" "${args[@]}" --save-init "$init" &&
    run "torch-$shape-$dtype" "$lim" "$py" scripts/bench/torch_gpu_ref.py "$init" \
      --device "$device" --dtype "$([ "$dtype" = bf16 ] && echo bfloat16 || echo float32)"
  # NF4 base (double quantization, bf16 compute), same start.
  if [ -f "$init/model.safetensors" ]; then
    PIPE_BENCH_DEVICE="$device" PIPE_BENCH_DTYPE="$dtype" PIPE_BENCH_BASE=nf4 PIPE_BENCH_DQ=1 \
      run "pipe-$shape-nf4" "$lim" "$bin/bench" "${args[@]}"
    run "torch-$shape-nf4" "$lim" "$py" scripts/bench/torch_gpu_ref.py "$init" --nf4 \
      --device "$device" --dtype "$([ "$dtype" = bf16 ] && echo bfloat16 || echo float32)"
    rm -f "$init/model.safetensors"  # 15 GB for the 7B shape
  fi
done
# --- 3. the table
printf '%s\n' "${skipped[@]:-}" > "$out/skipped.txt"
"$py" - "$out" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
runs = {}
for f in glob.glob(os.path.join(out, "*.json")):
    d = json.load(open(f))
    runs[os.path.basename(f)[:-5]] = d
rows = ["| shape | base | pipe tok/s | torch+peft tok/s | speed ratio | pipe peak MiB | torch peak MiB | memory ratio | max loss Δ over the steps |",
        "|---|---|---|---|---|---|---|---|---|"]
for name in sorted(runs):
    if not name.startswith("pipe-"):
        continue
    p = runs[name]
    t = runs.get("torch-" + name[len("pipe-"):])
    shape, base = name[len("pipe-"):].rsplit("-", 1)
    pm, tm = p.get("gpu_peak_mib"), (t.get("gpu_peak_mib") if t else None)
    sp = p["steady_tokens_per_s"]
    st = t["steady_tokens_per_s"] if t else None
    dl = max(abs(a - b) for a, b in zip(p["losses"], t["losses"])) if t else None
    f = lambda v, fmt: (fmt % v) if v is not None else "—"
    rows.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        shape, base, f(sp, "%.0f"), f(st, "%.0f"), f(sp / st if st else None, "%.2f×"),
        f(pm, "%d"), f(tm, "%d"), f(pm / tm if pm and tm else None, "%.2f×"), f(dl, "%.2e")))
    if t:
        rows.append("|  | losses pipe | " + " ".join("%.4f" % x for x in p["losses"]) + " |||||||")
        rows.append("|  | losses torch | " + " ".join("%.4f" % x for x in t["losses"]) + " |||||||")
skipped = [l.strip() for l in open(os.path.join(out, "skipped.txt")) if l.strip()]
text = "\n".join(rows) + "\n\nspeed: tokens/s after the first step; memory: peak GPU memory.used while the run was alone on the GPU, minus the idle value (includes the CUDA context).\n"
if skipped:
    text += "skipped or failed: " + ", ".join(skipped) + "\n"
open(os.path.join(out, "table.md"), "w").write(text)
print(text)
EOF
log "finished"
