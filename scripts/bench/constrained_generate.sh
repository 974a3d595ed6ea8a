#!/usr/bin/env bash
# Generation speed with and without constrained decoding, same model, prompts and machine,
# one after the other in this run: SmolLM2-135M (scripts/fetch_smollm2.sh), batch 8, 64 new
# tokens, under scripts/bench/reply_schema.json (an answer string, citations, confidence).
# Prints both JSON lines and the ratio constrained / free of tokens per second.
#   scripts/bench/constrained_generate.sh [MODEL]
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${1:-gguf:models/SmolLM2-135M-Instruct.Q4_1.gguf}"
cargo build --release --quiet -p pipe-train --example bench ${CARGO_TARGET_DIR:+--target-dir "$CARGO_TARGET_DIR"}
BIN="${CARGO_TARGET_DIR:-target}/release/examples/bench"
free=$("$BIN" generate "$MODEL" --batch 8 --new 64 --prompt-len 48)
cons=$("$BIN" generate "$MODEL" --batch 8 --new 64 --prompt-len 48 --schema scripts/bench/reply_schema.json)
echo "$free"
echo "$cons"
python3 - "$free" "$cons" <<'PY'
import json, sys
f, c = (json.loads(a) for a in sys.argv[1:3])
print(f"constrained/free tokens/s: {c['tokens_per_s'] / f['tokens_per_s']:.3f} "
      f"({c['tokens_per_s']:.1f} vs {f['tokens_per_s']:.1f}; {c['new_tokens']} and {f['new_tokens']} tokens)")
PY
