#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here): issue 12's GPU checks in one call.
#   1. the Vulkan tests on the real GPU (`-m "gpu or not gpu"`: the cooperative-matrix kernels of every
#      weight type, which lavapipe cannot run), into $OUT/pytest.txt;
#   2. llama.cpp's llama-bench built for CUDA and for Vulkan from .bench/llamacpp.tar.xz (in the
#      background, while our benchmark runs);
#   3. tools/bench_gpu.py on the 8B shape in the given weight types, resident, with llama-bench (-ngl 99)
#      on the same GGUF files: $OUT/bench_gpu.json and .md.
#     bash tools/device/gpu_kernels.sh [models]      # default: 8b:Q4_K_M,8b:Q8_0
set -o pipefail
export PYTHONUNBUFFERED=1
for f in .gl/*.deb .gl/dev/*.deb; do dpkg -x "$f" /; done
ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD" /tmp/vkpack
export PYTHONPATH=/tmp:/tmp/site VKPACK_CACHE=/tmp/vkc
repo=$PWD
build() {  # $1: cuda | vulkan
  local flag=$([ "$1" = cuda ] && echo "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" || echo "-DGGML_VULKAN=ON")
  mkdir -p /tmp/llb-$1 && cd /tmp/llb-$1 && tar xJf "$repo/.bench/llamacpp.tar.xz" && cd llama.cpp &&
    cmake -B build -G Ninja $flag -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release > /tmp/llb-$1/cmake.log 2>&1 &&
    cmake --build build --target llama-bench -j 8 > /tmp/llb-$1/build.log 2>&1
  echo "llama-bench $1 build rc $?"; tail -3 /tmp/llb-$1/build.log
}
(build cuda) & (build vulkan) &
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_vk_quant_types.py tests/test_vk_coop.py \
  tests/test_vk_ops.py tests/test_families.py -k "coop or vulkan or quant" -x 2>&1 | tail -15 | tee "$OUT/pytest.txt"
models=${1:-8b:Q4_K_M,8b:Q8_0}
# the GGUF files and archives first (no engine runs: nothing streams at --vram-gb 1000), while llama.cpp builds
python3 tools/bench_gpu.py --work /tmp/bench --out /tmp/gen --models "$models" --resident no --vram-gb 1000 \
  --keep-gguf --skip-limits 2>&1 | grep -v gguf_writer | tail -4
wait
bench=()
for b in cuda vulkan; do
  exe=/tmp/llb-$b/llama.cpp/build/bin/llama-bench
  [ -x "$exe" ] && bench+=(--llama-bench "$b=$exe")
done
python3 tools/bench_gpu.py --work /tmp/bench --out "$OUT" --models "$models" --resident yes --vram-gb 1000 \
  --decode 128 "${bench[@]}" 2>&1 | grep -v gguf_writer | tee "$OUT/log.txt" | tail -20
