#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here): issues 11 and 12's GPU runs as ONE
# background pipeline in its own session, so that it goes on between calls on the same warm machine and a
# call cut short loses nothing. Steps, most valuable first, each writing into /tmp/results as it ends:
#   builds of llama-bench / llama-batched-bench for CUDA and Vulkan (in parallel, from the start);
#   the Vulkan tests on the GPU (cooperative-matrix kernels lavapipe cannot run): pytest.txt;
#   the 8B shape as Q4_K_M, resident decode/prefill (ours): bench_gpu_ours.json;
#   the 8B shape in F16 and the hybrid (hybrid:4, hybrid:8, cpu) with llama.cpp CUDA at -ngl 0,7,16: bench_hybrid.json;
#   llama.cpp CUDA and Vulkan (-ngl 99) on the Q4_K_M file beside ours: bench_gpu.json;
#   1, 8, 32 sequences per step with llama-batched-bench: bench_batch.json.
#     setsid bash tools/device/pipeline.sh &        then     bash tools/device/collect.sh SECONDS
set -o pipefail
. tools/device/setup.sh dev || exit 1
R=/tmp/results
mkdir -p $R
log() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" >> $R/progress.log; }
log "pipeline start on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
for b in cuda vulkan; do
  [ -d /tmp/llb-$b ] || setsid bash tools/device/llama_build.sh $b $([ $b = cuda ] && echo 10 || echo 6) < /dev/null > /dev/null 2>&1 &
done
OUT=$R TESTS_TIMEOUT=180 bash tools/device/gpu_kernels.sh tests > $R/tests.log 2>&1; log "tests done"
python3 tools/bench_gpu.py --work /tmp/bench --out /tmp/ours --models 8b:Q4_K_M --resident yes --keep-gguf \
  --decode 128 > $R/ours.log 2>&1; cp /tmp/ours/bench_gpu.json $R/bench_gpu_ours.json; log "ours Q4_K_M done"
python3 tools/bench_hybrid.py --work /tmp/bench --out /tmp/hy --only-files > $R/f16.log 2>&1; log "F16 files done"
bash tools/device/llama_wait.sh cuda 900 >> $R/progress.log 2>&1
OUT=$R bash tools/device/hybrid.sh run > $R/hybrid.log 2>&1; log "hybrid done"
rm -f /tmp/bench/8b.gguf /tmp/bench/8b.vkpack
OUT=$R bash tools/device/gpu_kernels.sh run 8b:Q4_K_M > $R/run.log 2>&1; log "llama.cpp resident done"
OUT=$R bash tools/device/gpu_kernels.sh batch 8b:Q4_K_M > $R/batch.log 2>&1; log "batch done"
log "pipeline end"
touch $R/done
