#!/usr/bin/env bash
# On the lent GPU machine: build llama.cpp's llama-bench for one backend (cpu | cuda | vulkan) from
# .bench/llamacpp.tar.xz (tools/device/bundle.sh) into /tmp/llb-BACKEND/llama.cpp/build/bin/llama-bench.
# The log is /tmp/llb-BACKEND/build.log and the exit status /tmp/llb-BACKEND/rc, so a build started
# in its own session (`setsid bash tools/device/llama_build.sh cuda &`) outlives the call that began it
# and a later call on the same warm machine can wait for it (tools/device/llama_wait.sh).
#     bash tools/device/llama_build.sh cuda [jobs]
set -o pipefail
backend=$1 jobs=${2:-$(nproc)}
repo=$(cd "$(dirname "$0")/../.." && pwd)
dir=/tmp/llb-$backend
case $backend in
  cpu) flags="" ;;
  cuda) flags="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" ;;
  vulkan) flags="-DGGML_VULKAN=ON" ;;   # needs .gl/dev (headers, glslc) unpacked into /
  *) echo "llama_build.sh: backend must be cpu, cuda or vulkan" >&2; exit 2 ;;
esac
rm -rf "$dir" && mkdir -p "$dir" && cd "$dir" || exit 1
{
  tar xJf "$repo/.bench/llamacpp.tar.xz" && cd llama.cpp &&
  cmake -B build -G Ninja $flags -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release &&
  cmake --build build --target llama-bench llama-batched-bench -j "$jobs"
} > "$dir/build.log" 2>&1
echo $? > "$dir/rc"
