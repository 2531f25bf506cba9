#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here): issue 11's hybrid benchmark, in two calls
# on the same warm machine (one call cannot hold both the model's generation and llama.cpp's CUDA build):
#     bash tools/device/hybrid.sh files        # CUDA llama-bench builds in its own session; the 8B F16 files
#     bash tools/device/hybrid.sh run [configs] [ngl]   # tools/bench_hybrid.py, then llama-bench at each -ngl
#                                                       # (SWEEP=n: bench_hybrid --sweep n; MEMPROBE=1: memprobe.py first)
# defaults: configs hybrid:4,hybrid:8,cpu; ngl 0,7,16 (the CPU alone, ~3 GiB and ~7 GiB of layers on the GPU).
# Results: $OUT/bench_hybrid.json (saved after each configuration) and $OUT/log.txt.
set -o pipefail
. tools/device/setup.sh || exit 1
if [ "$1" = files ]; then
  [ -d /tmp/llb-cuda ] || setsid bash tools/device/llama_build.sh cuda 12 < /dev/null > /dev/null 2>&1 &
  python3 tools/bench_hybrid.py --work /tmp/bench --out "$OUT" --only-files 2>&1 | grep -v gguf_writer
  sync   # the generated files' writeback would otherwise take cores from the timed runs
  exit
fi
nvidia-smi --query-gpu=name --format=csv,noheader; nproc; lscpu | grep -E "Model name|L3" | cut -c1-100
bench=()
bash tools/device/llama_wait.sh cuda 240 && bench=(--llama-bench /tmp/llb-cuda/llama.cpp/build/bin/llama-bench)
sync
# after the build: memprobe beside a compiler at 12 jobs read 50-77 GB/s where the same host's rates said 129
[ -n "${MEMPROBE:-}" ] && python3 tools/device/memprobe.py /tmp/bench/8b.vkpack --gib 4 2>&1 | tee "$OUT/memprobe.txt"
python3 tools/bench_hybrid.py --work /tmp/bench --out "$OUT" --configs "${2:-hybrid:4,hybrid:8,cpu}" \
  --llama-ngl "${3:-0,7,16}" "${bench[@]}" --threads "$(nproc)" --sweep "${SWEEP:-0}" --decode "${DECODE:-16}" 2>&1 | grep -v gguf_writer | tee "$OUT/log.txt"
