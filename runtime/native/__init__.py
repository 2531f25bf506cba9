"""Native CPU kernels: matrix-vector and small-batch matrix products on weights as stored.

The job: the numpy backend converts every weight to f32 (numpy is fast only on f32) and so reads
4-8x more bytes than the GGUF holds at decode. These kernels read the GGML blocks in place (F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ4_NL, IQ4_XS; bytes exactly as in the GGUF), decode each block
into registers and accumulate in f32 against the activations (no int8 quantization of activations),
on OpenMP threads with the GIL released. No f32 copy of a weight is ever made.

Why compiled here, on first use: one C file (kernels.c) built with the machine's own `cc -O3
-march=native` picks the host's SIMD (AVX-512, AVX2; ARM through the compiler's vectorizer) at compile
time, with no wheels per CPU and no runtime dispatch; the build is cached per source, flags, compiler
and architecture (loader.py). Measured here: the first build takes 10-12 s, a cached one 2 ms (the
`cc --version` in its key). Without a compiler `load()` returns None, logs one warning, and the caller
keeps numpy. `VKPACK_NATIVE=0` turns it off.

Decode speed, one 4096x4096 product at n_tok 1, weights cold in DRAM, GB/s of stored bytes
(tools/bench_native.py, the 2-core Xeon VM, Dec 2026, a quiet minute; a plain read: 14.9 GB/s on
1 thread, 29.5 on 2 that minute):
    F16  13.8 / 24.8 (84%)    Q8_0 11.8 / 21.0 (71%)    Q4_K  8.3 / 15.4 (52%)
    Q4_0  8.8 / 15.2 (52%)    Q4_1  8.8 / 15.5 (53%)    Q6_K  9.2 / 16.5 (56%)    Q5_K 3.6 / 6.8
(1 thread / 2 threads, % of the 2-thread read). Before fast512.h (AVX-512 row kernels on a prepared x
for Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, with a 3 KiB prefetch distance) the same table read Q4_K 23%,
Q6_K 32%, Q4_0 38%, Q4_1 34% of a 22.3 GB/s read; interleaved A/B runs of the two builds: Q4_K 2.6x,
Q6_K 1.7x, Q4_1 1.6x, Q8_0 1.15x at 1-2 tokens. The other types use the generic tile() drivers.
Prefill (16 tokens and more) runs gemm.h: 130-146 GFLOP/s a thread on the Q4_K/Q6_K shapes of a
2048-wide model in the engine (1-thread peak 155-169), 1.2-3x the dequantize + BLAS path it replaces;
its attention and SwiGLU run in ops.h on the same threads (docs/benchmarks.md, CPU section, says what
each change bought).
Threads cost a fork/join per call (a few us) and, when other processes share the cores, the wait for a
descheduled thread: with another process busy on one of the two cores, Q4_K_M decode fell from ~19 to
~1 tok/s on 2 threads (GOMP's default spin-waiting; 8 with OMP_WAIT_POLICY=passive, 9 on 1 thread, and
llama.cpp fell alike): callers pick `threads` per call.
Re-measure: `python tools/bench_native.py`.

API (another backend builds on exactly these):
    available() -> (bool, reason); load() -> Kernels | None
    matmul(dtype, w, rows, cols, x, out, threads)   # out[t, r] = x[t] . W[r]
    dequantize(dtype, w, rows, cols, out, threads)  # out = W as f32, bit-equal to runtime/cpu/dequant
    Kernels.attention(...), Kernels.swiglu(...)     # prefill ops (AVX-512; False elsewhere: keep numpy)
"""

from .loader import (TYPES, Kernels, NativeUnavailable, available, build, cache_dir, dequantize, load,
                     matmul)

__all__ = ["TYPES", "Kernels", "NativeUnavailable", "available", "build", "cache_dir", "dequantize", "load",
           "matmul"]
