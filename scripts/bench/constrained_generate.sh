#!/usr/bin/env bash
# Generation speed with and without constrained decoding, same model, prompts and machine,
# one after the other in this run: SmolLM2-135M (scripts/fetch_smollm2.sh), batch 8, 64 new
# tokens. Two schemas: scripts/bench/reply_schema.json (an answer, citations, confidence:
# rows finish at different steps, so tokens/s also reflects a smaller batch at the end) and
# scripts/bench/long_string_schema.json (a string of at least 400 characters: every row runs
# all 64 steps, as the free run does, so the ratio is the per-step cost of the masks).
# Prints the JSON lines and the ratios constrained / free of tokens per second.
#   scripts/bench/constrained_generate.sh [MODEL]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${1:-gguf:models/SmolLM2-135M-Instruct.Q4_1.gguf}"
cargo build --release --quiet -p pipe-train --example bench ${CARGO_TARGET_DIR:+--target-dir "$CARGO_TARGET_DIR"}
BIN="${CARGO_TARGET_DIR:-target}/release/examples/bench"
free=$("$BIN" generate "$MODEL" --batch 8 --new 64 --prompt-len 48)
reply=$("$BIN" generate "$MODEL" --batch 8 --new 64 --prompt-len 48 --schema scripts/bench/reply_schema.json)
long=$("$BIN" generate "$MODEL" --batch 8 --new 64 --prompt-len 48 --schema scripts/bench/long_string_schema.json)
echo "$free"
echo "$reply"
echo "$long"
python3 - "$free" "$reply" "$long" <<'PY'
import json, sys
f, r, l = (json.loads(a) for a in sys.argv[1:4])
for name, c in (("reply schema", r), ("long string", l)):
    print(f"{name}: constrained/free tokens/s {c['tokens_per_s'] / f['tokens_per_s']:.3f} "
          f"({c['tokens_per_s']:.1f} vs {f['tokens_per_s']:.1f}; {c['new_tokens']} and {f['new_tokens']} tokens)")
PY
