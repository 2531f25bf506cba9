"""Native CPU kernels: matrix-vector and small-batch matrix products on weights as stored.

The job: the numpy backend converts every weight to f32 (numpy is fast only on f32) and so reads
4-8x more bytes than the GGUF holds at decode. These kernels read the GGML blocks in place (F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K; bytes exactly as in the GGUF), decode each block
into L1 and accumulate in f32 against the activations (no int8 quantization of activations), on
OpenMP threads with the GIL released, so decode runs near the machine's memory bandwidth.

Why compiled here, on first use: one C file (kernels.c) built with the machine's own `cc -O3
-march=native` picks the host's SIMD (AVX-512, AVX2, NEON through the compiler) at compile time,
with no wheels per CPU and no runtime dispatch; the build is cached per source, flags, compiler and
architecture (loader.py). Without a compiler `load()` returns None, logs one warning, and the caller
keeps numpy. `VKPACK_NATIVE=0` turns it off.
Measured speeds and how to re-measure: `python tools/bench_native.py`.

API (another backend builds on exactly these):
    available() -> (bool, reason); load() -> Kernels | None
    matmul(dtype, w, rows, cols, x, out, threads)   # out[t, r] = x[t] . W[r]
    dequantize(dtype, w, rows, cols, out, threads)  # out = W as f32, bit-equal to runtime/cpu/dequant
"""

from .loader import (TYPES, Kernels, NativeUnavailable, available, build, cache_dir, dequantize, load,
                     matmul)

__all__ = ["TYPES", "Kernels", "NativeUnavailable", "available", "build", "cache_dir", "dequantize", "load",
           "matmul"]
