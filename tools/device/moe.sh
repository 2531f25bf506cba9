#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here): issue 14's MoE benchmark, in two calls on the
# same warm machine (one call cannot hold both the model's generation and llama.cpp's CUDA build):
#     bash tools/device/moe.sh files            # CUDA llama-bench builds in its own session; the Q4_0 GGUF
#                                               # (17.2 GB, Qwen3-30B-A3B's shapes) and its archive (~17.3 GB)
#     bash tools/device/moe.sh run [budgets] [bench_moe.py options]   # tools/bench_moe.py: the vulkan and
#                                               # hybrid backends at --vram-gb 4,8; then llama-bench where built
# Disk: GGUF + archive ~35 GB of the 64 GB; `files` refuses to start with less than 40 GB free in /tmp.
# Results: $OUT/bench_moe.json and .md (saved after each configuration) and $OUT/log.txt.
set -o pipefail
. tools/device/setup.sh || exit 1
if [ "$1" = files ]; then
  [ -d /tmp/llb-cuda ] || setsid bash tools/device/llama_build.sh cuda 12 < /dev/null > /dev/null 2>&1 &
  mkdir -p /tmp/bench
  free=$(df --output=avail -BG /tmp | tail -1 | tr -dc 0-9)
  if [ ! -f /tmp/bench/qwen3moe-30b-a3b-Q4_0.vkpack ] && [ "$free" -lt 40 ]; then
    echo "moe.sh: ${free} GB free in /tmp, 40 needed:"; du -sh /tmp/* 2>/dev/null | sort -h | tail -5; exit 1
  fi
  python3 tools/bench_moe.py --work /tmp/bench --out "$OUT" --only-files 2>&1 | grep -v gguf_writer
  df -h /tmp | tail -1
  exit
fi
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader; nproc; lscpu | grep -E "Model name|L3" | cut -c1-100
bench=()
[ -d /tmp/llb-cuda ] && bash tools/device/llama_wait.sh cuda 240 && bench=(--llama-bench /tmp/llb-cuda/llama.cpp/build/bin/llama-bench)
python3 tools/bench_moe.py --work /tmp/bench --out "$OUT" --device vulkan,hybrid --budgets "${2:-4,8}" "${bench[@]}" \
  --threads "$(nproc)" "${@:3}" 2>&1 | grep -v gguf_writer | tee "$OUT/log.txt"
