#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here): issue 12's GPU checks, in phases that
# calls on the same warm machine can split between them (the builds run in their own sessions):
#     bash tools/device/gpu_kernels.sh build    # llama-bench and llama-batched-bench for CUDA and Vulkan
#     bash tools/device/gpu_kernels.sh tests    # the Vulkan tests on the GPU (-m "gpu or not gpu": the
#                                               # cooperative-matrix kernels lavapipe cannot run): $OUT/pytest.txt
#     bash tools/device/gpu_kernels.sh files [models]   # the GGUF files and archives (default 8b:Q4_K_M,8b:Q8_0)
#     bash tools/device/gpu_kernels.sh run [models]     # tools/bench_gpu.py resident with llama-bench (-ngl 99)
#                                               # on the same GGUF files: $OUT/bench_gpu.json and .md
#     bash tools/device/gpu_kernels.sh batch [models] [vram]  # tools/bench_batch.py: 1, 8, 32 sequences per
#                                               # step (resident, or streamed at vram GiB), with llama-batched-bench
set -o pipefail
. tools/device/setup.sh dev || exit 1
models=${2:-8b:Q4_K_M,8b:Q8_0}
case $1 in
build)
  for b in cuda vulkan; do   # not again where an earlier call on this machine began it
    [ -d /tmp/llb-$b ] || setsid bash tools/device/llama_build.sh $b 8 < /dev/null > /dev/null 2>&1 &
  done ;;
tests)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_vk_quant_types.py \
    tests/test_vk_coop.py tests/test_vk_ops.py tests/test_families.py -k "coop or vulkan or quant" 2>&1 |
    tail -25 | tee "$OUT/pytest.txt" ;;
files)   # no engine runs: --resident no at --vram-gb 1000 only makes the files
  python3 tools/bench_gpu.py --work /tmp/bench --out /tmp/gen --models "$models" --resident no --vram-gb 1000 \
    --keep-gguf --skip-limits 2>&1 | grep -v gguf_writer | tail -4 ;;
run)
  bench=()
  for b in cuda vulkan; do
    bash tools/device/llama_wait.sh $b 300 && bench+=(--llama-bench "$b=/tmp/llb-$b/llama.cpp/build/bin/llama-bench")
  done
  python3 tools/bench_gpu.py --work /tmp/bench --out "$OUT" --models "$models" --resident yes --vram-gb 1000 \
    --decode 128 "${bench[@]}" 2>&1 | grep -v gguf_writer | tee "$OUT/log.txt" | tail -20 ;;
batch)
  bench=()
  for b in cuda vulkan; do
    bash tools/device/llama_wait.sh $b 300 && bench+=(--llama-batched "$b=/tmp/llb-$b/llama.cpp/build/bin/llama-batched-bench")
  done
  vram=() && [ -n "${3:-}" ] && vram=(--vram-gb "$3") && bench=()   # streamed: llama.cpp has no such mode
  python3 tools/bench_batch.py --work /tmp/bench --out "$OUT" --models "${2:-8b:Q4_K_M}" "${vram[@]}" \
    "${bench[@]}" 2>&1 | grep -v gguf_writer | tee -a "$OUT/log.txt" | tail -20 ;;
*) echo "gpu_kernels.sh: build | tests | files | run | batch" >&2; exit 2 ;;
esac
