#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here): the hybrid benchmark of issue 11 in one
# call. Builds llama-bench (CPU) from .bench/llamacpp.tar.xz while the 8B-shape F16 model is generated,
# then runs tools/bench_hybrid.py (results in $OUT/bench_hybrid.json, saved after each configuration).
#     bash tools/device/hybrid.sh [configs]      # default: hybrid:4,cpu,hybrid:8,vulkan:4,hybrid:4:15
set -o pipefail
export PYTHONUNBUFFERED=1
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD" /tmp/vkpack
export PYTHONPATH=/tmp:/tmp/site VKPACK_CACHE=/tmp/vkc
repo=$PWD
(mkdir -p /tmp/llb && cd /tmp/llb && tar xJf "$repo/.bench/llamacpp.tar.xz" && cd llama.cpp &&
  cmake -B build -G Ninja -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release > /tmp/llb/cmake.log 2>&1 &&
  cmake --build build --target llama-bench -j 12 > /tmp/llb/build.log 2>&1; echo "llama-bench build rc $?") &
python3 tools/bench_hybrid.py --work /tmp/bench --out "$OUT" --only-files 2>&1 | grep -v gguf_writer
wait
nvidia-smi --query-gpu=name --format=csv,noheader; nproc; lscpu | grep -E "Model name|L3" | cut -c1-100
python3 tools/bench_hybrid.py --work /tmp/bench --out "$OUT" --configs "${1:-hybrid:4,cpu,hybrid:8,vulkan:4,hybrid:4:15}" \
  --llama-bench /tmp/llb/llama.cpp/build/bin/llama-bench --threads "$(nproc)" 2>&1 | grep -v gguf_writer | tee "$OUT/log.txt"
