#!/usr/bin/env bash
# On the lent GPU machine (after tools/device/bundle.sh here, and the SPIR-V to compare against in
# .bench/old_spv: `git show REV:shaders/X.spv` for each X): the quantized decode kernels against those
# of REV, each result in /tmp/kqres as it ends. It runs in its own session, so that it goes on between
# calls on one warm machine; a call copies what is there:
#     setsid bash tools/device/kquant.sh > /tmp/kq.log 2>&1 &
#     for i in $(seq 110); do [ -f /tmp/kqres/done ] && break; sleep 5; done; cp -r /tmp/kqres/. $OUT/
# Steps:
#   the Vulkan tests of the kernels on the GPU: tests.txt;
#   matrix-vector sweeps per weight type (tools/sweep_matvec.py), this tree's SPIR-V and REV's: sweep_*.txt;
#   the 8B shape as Q4_K_M, resident (tools/bench_gpu.py): REV's SPIR-V (with the settings of 9855da6), then this tree's with
#   shaders/matvec_k.comp off and on, and llama.cpp's llama-bench -ngl 99 (CUDA, and Vulkan where it
#   builds) on the same GGUF: bench_old.json, bench_gpu.json; between them tools/profile_gpu.py's GPU time per
#   kernel for 1, 8 and 32 sequences: profile.log.
set -o pipefail
. tools/device/setup.sh dev || exit 1
OUT=/tmp/kqres
mkdir -p $OUT
types=${1:-Q4_K,Q6_K,Q4_0,Q8_0}
LLAMA=${LLAMA:-cuda vulkan}   # LLAMA="" skips llama.cpp (no builds beside the runs); OLD_SWEEPS=0 skips REV's sweeps
for b in $LLAMA; do
  [ -d /tmp/llb-$b ] || setsid bash tools/device/llama_build.sh $b $([ $b = cuda ] && echo 10 || echo 6) \
    < /dev/null > /dev/null 2>&1 &
done
mkdir -p /tmp/new_spv && cp shaders/*.spv /tmp/new_spv/
use_old() { cp .bench/old_spv/*.spv shaders/ && export VKPACK_SHADER_AUTOBUILD=0; }
use_new() { cp /tmp/new_spv/*.spv shaders/ && unset VKPACK_SHADER_AUTOBUILD; }
sweep() { python3 tools/sweep_matvec.py --shape 8b --layers 4 --wg 128 --mm-rows 1,2 --mm-units 1 "$@" 2>&1 |
  grep -v "^$"; }

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -m "gpu or not gpu" -p no:cacheprovider tests/test_vk_ops.py \
  tests/test_vk_quant_types.py -k "matvec_k or accumulate or kquant or linear" 2>&1 | tail -5 > "$OUT/tests.txt"
for t in ${types//,/ }; do sweep --dtype "$t" > "$OUT/sweep_new_$t.txt"; done
use_old
[ "${OLD_SWEEPS:-1}" = 0 ] || for t in ${types//,/ }; do sweep --dtype "$t" --kquant "" > "$OUT/sweep_old_$t.txt"; done
python3 tools/bench_gpu.py --work /tmp/bench --out /tmp/kq_old --models 8b:Q4_K_M --resident yes --keep-gguf \
  --decode 128 --ops "mv_kquant={},mv_unfused={'Q4_K':(128,1,1),'Q6_K':(128,2,1),'Q8_0':(128,2,2),'Q4_0':(128,2,1)}" \
  2>&1 | grep -v gguf_writer > "$OUT/bench_old.log"
cp /tmp/kq_old/bench_gpu.json "$OUT/bench_old.json"
use_new
timeout 240 python3 tools/profile_gpu.py --work /tmp/bench --out /tmp/kq_prof --models 8b:Q4_K_M --batch 1,8,32 \
  --prompt 128 --decode 16 2>&1 | grep -v gguf_writer > "$OUT/profile.log"
bench=()
for b in $LLAMA; do
  bash tools/device/llama_wait.sh $b $([ $b = cuda ] && echo 420 || echo 60) >> "$OUT/llama.txt" 2>&1 &&
    bench+=(--llama-bench "$b=/tmp/llb-$b/llama.cpp/build/bin/llama-bench")
done
python3 tools/bench_gpu.py --work /tmp/bench --out /tmp/kq_new --models 8b:Q4_K_M --resident yes --keep-gguf \
  --skip-limits --decode 128 --ops "mv_kquant={}" --ops "unfused_max_tokens=8" "${bench[@]}" 2>&1 |
  grep -v gguf_writer > "$OUT/bench_new.log"
cp /tmp/kq_new/bench_gpu.json /tmp/kq_new/bench_gpu.md "$OUT/" 2>/dev/null
echo done > "$OUT/done"
