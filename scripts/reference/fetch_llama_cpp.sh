#!/usr/bin/env bash
# Unpacks llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/) from the
# llama.cpp copy inside llama-cpp-python's source package, fetched from PyPI by name.
#   scripts/reference/fetch_llama_cpp.sh DEST [PYTHON]
set -euo pipefail
dest="$1"
py="${2:-python3}"
version=0.3.36
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
  "llama-cpp-python==$version" -d "$tmp"
root="llama_cpp_python-$version/vendor/llama.cpp"
tar xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp" \
  "$root/convert_hf_to_gguf.py" "$root/conversion" "$root/gguf-py"
mkdir -p "$dest"
cp -r "$tmp/$root/." "$dest/"
echo "llama.cpp converter (llama-cpp-python $version) in $dest"
