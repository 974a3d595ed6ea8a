# Sourced: makes a CUDA toolchain for building `--features cuda` on a machine without a GPU
# or a CUDA install, and exports what the build needs. Idempotent; everything lives under
# $PIPE_CUDA_HOME (default ~/.cache/pipe-cuda) and is reused by later builds.
#   . scripts/cuda/env.sh
# - nvcc 13.0 from PyPI's CUDA 13.0 wheels (13.0 exactly: the GPU machines' driver 580 cannot
#   load PTX from a newer nvcc);
# - stub libcuda/libcublas/libcublasLt/libcurand/libnvrtc with the real SONAMEs, exporting
#   every symbol cudarc declares, so the binary links here; on a GPU machine the real
#   libraries of those SONAMEs are loaded instead;
# - CUDA_COMPUTE_CAP=90 (H100/H200; there is no GPU to ask).
# The installs run in a subshell with errexit; the caller's shell options are left alone.
export PIPE_CUDA_HOME="${PIPE_CUDA_HOME:-$HOME/.cache/pipe-cuda}"
_pipe_cuda_setup() (
set -euo pipefail
_pipe_cuda_venv="$PIPE_CUDA_HOME/venv"
if [ ! -x "$_pipe_cuda_venv/bin/python" ]; then
  python3 -m venv "$_pipe_cuda_venv"
fi
_pipe_cuda_site="$("$_pipe_cuda_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CUDA_HOME="$_pipe_cuda_site/nvidia/cu13"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  "$_pipe_cuda_venv/bin/pip" install --quiet --no-deps \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
# The runtime wheel ships libcudart.so.13 only; the linker looks for libcudart.so.
if [ ! -e "$CUDA_HOME/lib/libcudart.so" ]; then
  ln -sf libcudart.so.13 "$CUDA_HOME/lib/libcudart.so"
fi
_pipe_cuda_stubs="$PIPE_CUDA_HOME/stubs"
if [ ! -e "$_pipe_cuda_stubs/libcuda.so" ]; then
  _cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -1)"
  if [ -z "$_cudarc" ]; then
    cargo fetch --quiet
    _cudarc="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)"
  fi
  mkdir -p "$_pipe_cuda_stubs"
  for spec in driver:cuda:libcuda.so.1 cublas:cublas:libcublas.so.13 \
      cublaslt:cublasLt:libcublasLt.so.13 curand:curand:libcurand.so.10 nvrtc:nvrtc:libnvrtc.so.13; do
    IFS=: read -r mod name soname <<< "$spec"
    sed -n 's/^pub unsafe fn \([A-Za-z0-9_]*\)(.*/int \1(void) { return 999; }/p' \
      "$_cudarc/src/$mod/sys/mod.rs" | sort -u > "$_pipe_cuda_stubs/$name.c"
    cc -shared -fPIC -Wl,-soname,"$soname" -o "$_pipe_cuda_stubs/$soname" "$_pipe_cuda_stubs/$name.c"
    ln -sf "$soname" "$_pipe_cuda_stubs/lib$name.so"
  done
fi
)
_pipe_cuda_setup || { echo "scripts/cuda/env.sh: setting up the CUDA toolchain failed" >&2; return 1; }
CUDA_HOME="$("$PIPE_CUDA_HOME/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
export CUDA_HOME
_pipe_cuda_stubs="$PIPE_CUDA_HOME/stubs"
export PATH="$CUDA_HOME/bin:$PATH"
export LIBRARY_PATH="$_pipe_cuda_stubs:$CUDA_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
