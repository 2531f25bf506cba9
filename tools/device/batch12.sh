#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here): issue 12's batch checks in one call:
#     bash tools/device/batch12.sh
# GPU tests of matmul.comp's configurations and fusions; resident steps of 1, 8, 16, 32 sequences with the
# defaults and with the old matmul.comp settings (128 x 2, a barrier pair per sum); `vkpack serve` at --vram-gb 4
# with 1, 8, 32 clients (tools/bench_serve.py); a profile of a streamed 32-sequence step; more sweeps.
# Results: $OUT/sweep*/, $OUT/pstream/, $OUT/serve.txt.
set -o pipefail
. tools/device/setup.sh || exit 1
mkdir -p /tmp/bench
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 60 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_vk_fusion.py tests/test_vk_ops.py \
  -k "linear or fused or one_barrier or fusion or decode" 2>&1 | tail -2
BATCHES=1,8,16,32 bash tools/device/splitk.sh sweep "" "mm_wg=128,mm_rows=2,mm_one_barrier=False"
timeout 150 python3 tools/bench_serve.py --models "" --archive /tmp/bench/8b-Q4_K_M.vkpack --device vulkan \
  --vram-gb 4 --clients 1,8,32 --tokens 48 --repeat 1 2>&1 | tee "$OUT/serve.txt" | grep "^| \|TTFT" | tail -8
timeout 100 python3 tools/profile_gpu.py --work /tmp/bench --out "$OUT/pstream" --models 8b:Q4_K_M --batch 32 \
  --prompt 128 --decode 8 --vram-gb 4 2>&1 | grep -A14 "^## "
BATCHES=8 bash tools/device/splitk.sh sweep "mm_wg=64,mm_rows=8" "mm_wg=32,mm_rows=4"
BATCHES=16 bash tools/device/splitk.sh sweep "mm_coop_min_tokens=16" "mm_max_tokens=16,mm_rows=2"
