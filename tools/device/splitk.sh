#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here): issue 12's split-K A/B, in two calls on one
# warm machine, best after tools/device/hybrid.sh (its files step builds llama.cpp for CUDA into /tmp/llb-cuda):
#     bash tools/device/splitk.sh files   # the tensor-core and split-K tests on the GPU; the 8B Q4_K_M files
#     bash tools/device/splitk.sh stream  # alone, on any machine: 1, 8, 32 clients of `vkpack serve` at
#                                         # --vram-gb 4 (tools/bench_serve.py: aggregate tok/s, TTFT), then
#                                         # tools/bench_batch.py's steps of 1, 8, 32 (with BASE=1 also split-K off)
#     bash tools/device/splitk.sh sweep "OPS" ["OPS" ...]   # resident steps of $BATCHES (default 8) sequences,
#                                         # one bench_batch run per Ops setting ("" = the defaults)
#     bash tools/device/splitk.sh run     # split-K off and on:
#                                         # tools/bench_batch.py (1, 8, 32 sequences) and
#                                         # tools/bench_gpu.py (resident prefill at 128 and 512, decode;
#                                         # and with a 64 MiB room for the slices);
#                                         # llama-batched-bench and llama-bench on the same GGUF where built
# Results: $OUT/tests.txt, $OUT/{base,split,coop8}/ (bench_batch.*), $OUT/gpu128/, $OUT/gpu512/ (bench_gpu.*).
set -o pipefail
. tools/device/setup.sh || exit 1
mkdir -p /tmp/bench
if [ "$1" = files ]; then
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  timeout 240 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_vk_coop.py tests/test_vk_ops.py \
    tests/test_vk_engine.py -k "split or coop_linear or coop_tiles or coop_matches" 2>&1 | tail -8 | tee "$OUT/tests.txt"
  python3 - <<'PY' 2>&1 | grep -v gguf_writer
import sys
from pathlib import Path
sys.path.insert(0, "tools")
import bench_gpu
bench_gpu.model_archive("8b:Q4_K_M", Path("/tmp/bench"), keep_gguf=True)
PY
  exit
fi
if [ "$1" = stream ]; then   # batched streaming (issue 12, part 3) at --vram-gb 4, split-K on and off
  nvidia-smi --query-gpu=name --format=csv,noheader
  python3 -c 'import sys; from pathlib import Path; sys.path.insert(0, "tools"); import bench_gpu
bench_gpu.model_archive("8b:Q4_K_M", Path("/tmp/bench"))' 2>&1 | grep -v gguf_writer
  timeout 240 python3 tools/bench_serve.py --models "" --archive /tmp/bench/8b-Q4_K_M.vkpack --device vulkan \
    --vram-gb 4 --clients 1,8,32 --tokens 64 --repeat 1 2>&1 | tee "$OUT/serve.txt" | grep -v "^\[bench_serve\]   "
  for v in split ${BASE:+base}; do
    ops=$([ $v = base ] && echo "mm_split_groups=0" || echo "")
    timeout 150 python3 tools/bench_batch.py --models 8b:Q4_K_M --batches 1,8,32 --vram-gb 4 --decode 16 \
      --work /tmp/bench --out "$OUT/stream_$v" --ops "$ops" 2>&1 | grep -v gguf_writer | tail -5
  done
  exit
fi
if [ "$1" = sweep ]; then   # resident batched steps, one run per Ops setting
  shift
  i=0
  for ops in "$@"; do
    i=$((i + 1))
    echo "== $ops"
    timeout 120 python3 tools/bench_batch.py --models 8b:Q4_K_M --batches "${BATCHES:-8}" --decode 32 \
      --work /tmp/bench --out "$OUT/sweep$i" --ops "$ops" 2>&1 | grep '"aggregate_tps"' | cut -c1-160
  done
  exit
fi
bin=/tmp/llb-cuda/llama.cpp/build/bin
batched=() bench=()
[ -x $bin/llama-batched-bench ] && batched=(--llama-batched cuda=$bin/llama-batched-bench)
[ -x $bin/llama-bench ] && bench=(--llama-bench cuda=$bin/llama-bench)
nvidia-smi --query-gpu=name --format=csv,noheader
# variants: base (no split-K), split (the defaults), coop8 (and 8 sequences on the tensor cores)
for v in base split coop8; do
  case $v in
    base) ops="mm_split_groups=0" ;; split) ops="" ;; coop8) ops="mm_coop_min_tokens=8" ;;
  esac
  extra=(); [ $v = split ] && extra=("${batched[@]}")
  python3 tools/bench_batch.py --models 8b:Q4_K_M --batches "${BATCHES:-1,8,32}" --decode 32 --work /tmp/bench \
    --out "$OUT/$v" --ops "$ops" "${extra[@]}" 2>&1 | grep -v gguf_writer | tail -6
done
for p in 128 512; do
  extra=(); [ $p = 512 ] && extra=("${bench[@]}")
  python3 tools/bench_gpu.py --models 8b:Q4_K_M --work /tmp/bench --out "$OUT/gpu$p" --vram-gb 1000 --skip-limits \
    --prompt $p --decode 64 --ops "mm_split_groups=0" --ops "mm_split_groups=1024" \
    --ops "mm_split_bytes=$((64 << 20))" "${extra[@]}" 2>&1 |
    grep -v gguf_writer | tail -6
done
