"""Native CPU kernels: matrix-vector and small-batch matrix products on weights as stored.

The job: the numpy backend converts every weight to f32 (numpy is fast only on f32) and so reads
4-8x more bytes than the GGUF holds at decode. These kernels read the GGML blocks in place (F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K; bytes exactly as in the GGUF), decode each block
into registers and accumulate in f32 against the activations (no int8 quantization of activations),
on OpenMP threads with the GIL released. No f32 copy of a weight is ever made.

Why compiled here, on first use: one C file (kernels.c) built with the machine's own `cc -O3
-march=native` picks the host's SIMD (AVX-512, AVX2; ARM through the compiler's vectorizer) at compile
time, with no wheels per CPU and no runtime dispatch; the build is cached per source, flags, compiler
and architecture (loader.py). Measured here: the first build takes 10-12 s, a cached one 2 ms (the
`cc --version` in its key). Without a compiler `load()` returns None, logs one warning, and the caller
keeps numpy. `VKPACK_NATIVE=0` turns it off.

Decode speed, one 4096x4096 product at n_tok 1, weights cold in DRAM, GB/s of stored bytes
(tools/bench_native.py, the 2-core Xeon VM, Dec 2026, a quiet minute; a plain read: 11.3 GB/s on
1 thread, 22.3 on 2; numpy's f32 product: 20.1 GB/s of f32, i.e. 10.0 for F16's bytes):
    F32  10.5 / 22.0 (99%)    Q8_0  7.2 / 13.8 (62%)    Q4_K  2.6 / 5.1 (23%)
    F16  10.3 / 20.2 (91%)    Q4_0  4.4 /  8.4 (38%)    Q6_K  3.7 / 7.2 (32%)
    BF16 10.2 / 19.6 (88%)    Q4_1  3.9 /  7.6 (34%)    Q5_K  2.5 / 4.8, Q3_K 1.2 / 2.4, Q2_K 1.6 / 3.1
(1 thread / 2 threads, % of the 2-thread read). Floats run at the memory's speed; quantized types are
bound by decoding (vector ports 0 and 5) and scale with threads (2.0x): with more cores than this VM's
two they have room to reach the bandwidth (not measured here). Per product at n_tok 1 that is 1.1x
(F32) to 3.0x (Q4_0) faster than the numpy backend's f32 product; at n_tok 8, 2.8-6.6x.
Threads cost a fork/join per call (a few us) and, when other processes share the cores, the wait for a
descheduled thread (measured up to 0.6 ms per call here): callers pick `threads` per call.
Re-measure: `python tools/bench_native.py`.

API (another backend builds on exactly these):
    available() -> (bool, reason); load() -> Kernels | None
    matmul(dtype, w, rows, cols, x, out, threads)   # out[t, r] = x[t] . W[r]
    dequantize(dtype, w, rows, cols, out, threads)  # out = W as f32, bit-equal to runtime/cpu/dequant
"""

from .loader import (TYPES, Kernels, NativeUnavailable, available, build, cache_dir, dequantize, load,
                     matmul)

__all__ = ["TYPES", "Kernels", "NativeUnavailable", "available", "build", "cache_dir", "dequantize", "load",
           "matmul"]
