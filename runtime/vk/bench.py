"""Quick measurements of the Vulkan backend (not a test): python -m vkpack.runtime.vk.bench

Prints host cost per recorded dispatch, cost per replayed submit, and matvec/matmul times.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import Device, Ops, Recorder, Weight


def _best(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def bench_recording(dev: Device, ops: Ops, n: int = 1000) -> None:
    bufs = [dev.alloc(4096) for _ in range(4)]
    rec = Recorder(dev)
    t = time.perf_counter()
    for i in range(n):
        ops.add(rec, bufs[i % 4], bufs[(i + 1) % 4], bufs[(i + 2) % 4], 1024)
    rec.finish()
    dt = time.perf_counter() - t
    print(f"record: {dt / n * 1e6:.1f} us per dispatch (add, {n} dispatches, {rec.n_barriers} barriers)")
    one = Recorder(dev)
    ops.add(one, bufs[0], bufs[1], bufs[2], 1024)
    one.finish()
    one.run()
    per_one = _best(one.run, 200)
    rec.run()
    per_many = _best(rec.run, 10)
    print(f"replay: {per_one * 1e6:.0f} us per submit+wait of 1 dispatch; "
          f"{per_many * 1e3:.2f} ms per submit+wait of {n} dispatches ({per_many / n * 1e6:.1f} us each)")
    for r in (rec, one):
        r.destroy()
    for b in bufs:
        b.destroy()


def bench_linear(dev: Device, ops: Ops, dtype: str, rows: int, cols: int, T: int, reps: int,
                 inner: int = 1, warmup_s: float = 0.0) -> float:
    import gguf

    rng = np.random.default_rng(0)
    W = rng.standard_normal((rows, cols), dtype=np.float32)
    if dtype == "F16":
        raw = W.astype(np.float16).view(np.uint8)
    elif dtype == "F32":
        raw = W.view(np.uint8)
    elif dtype in ("Q4_K", "Q6_K"):  # gguf-py cannot quantize K-quants: random blocks with finite scales
        qt = getattr(gguf.GGMLQuantizationType, dtype)
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (rows * cols // bs, ts), dtype=np.uint8)
        for off in ((0, 2) if dtype == "Q4_K" else (208,)):
            raw[:, off:off + 2] = np.full((len(raw), 1), 0.01, np.float16).view(np.uint8)
    else:
        raw = gguf.quants.quantize(W, getattr(gguf.GGMLQuantizationType, dtype))
    wb = dev.alloc(raw.nbytes)
    dev.upload(wb, raw)
    xb, yb = dev.alloc(T * cols * 4), dev.alloc(T * rows * 4)
    dev.upload(xb, rng.standard_normal((T, cols), dtype=np.float32))
    rec = Recorder(dev, timestamps=True)
    for _ in range(inner):      # several in one command buffer: GPU time without submit overhead
        ops.linear(rec, Weight(wb, 0, dtype, rows, cols), xb, yb, T)
    rec.finish()
    t_end = time.perf_counter() + warmup_s   # GPUs drop their clocks while the host quantizes: ramp them up
    while time.perf_counter() < t_end:
        rec.run()
    wall = _best(rec.run, reps) / inner
    gpu = 1e9
    for _ in range(reps):
        rec.run()
        gpu = min(gpu, rec.gpu_time_s() / inner)
    print(f"linear {dtype} {rows}x{cols} T={T}: {gpu * 1e3:.3f} ms GPU ({raw.nbytes / gpu / 1e9:.2f} GB/s of "
          f"weights, {2 * rows * cols * T / gpu / 1e9:.1f} GFLOP/s), {wall * 1e3:.3f} ms wall per call "
          f"(x{inner} per submit)")
    rec.destroy()
    for b in (wb, xb, yb):
        b.destroy()
    return gpu


def sweep(dev: Device, n: int, types: list[str]) -> None:
    """Kernel configurations side by side (used to pick the Ops defaults on a GPU)."""
    def ops_with(**kw: object) -> Ops:
        o = Ops(dev)
        for k, v in kw.items():
            setattr(o, k, v)
        return o

    for dt in types:
        for nr, nu in ((1, 4), (2, 2), (2, 4), (4, 1), (4, 2)):
            print(f"  T=1 rows/wg={nr} units={nu}: ", end="")
            bench_linear(dev, ops_with(mm_rows=nr, mm_units=nu), dt, n, n, 1, 3, 10, 0.3)
    for T in (4, 16, 32):
        for nr, nu in ((1, 2), (2, 2), (4, 1), (4, 2)):
            print(f"  register rows/wg={nr} units={nu}: ", end="")
            bench_linear(dev, ops_with(mm_rows=nr, mm_units=nu, mm_tiled_min_tokens=1 << 30, mm_max_tokens=16),
                         "F16", n, n, T, 2, 4, 0.3)
    for T in (16, 32, 64, 256):
        for tile in ((128, 64, 8, 4), (128, 32, 8, 4), (64, 32, 4, 4), (64, 64, 8, 4)):
            print(f"  tiled {tile}: ", end="")
            bench_linear(dev, ops_with(mm_tiled_min_tokens=1, mm_tile=tile), "F16", n, n, T, 2, 4, 0.3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="matrix size for the matvec")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--types", default="F16,Q8_0,Q4_0")
    ap.add_argument("--tokens", default="16", help="T values for the prefill matmul")
    ap.add_argument("--sweep", action="store_true", help="compare prefill kernels")
    args = ap.parse_args(argv)
    with Device() as dev:
        ops = Ops(dev)
        print(f"{dev}  subgroup {dev.info.subgroup_size}  unified {dev.info.unified_memory}  "
              f"transfer queue: {dev.transfer_queue_kind}")
        bench_recording(dev, ops)
        if args.sweep:
            sweep(dev, args.n, args.types.split(","))
            return
        inner, warm = (1, 0.0) if ops.cpu else (20, 0.5)
        for dt in args.types.split(","):
            bench_linear(dev, ops, dt, args.n, args.n, 1, args.reps, inner, warm)
        for T in [int(t) for t in args.tokens.split(",") if t]:
            bench_linear(dev, ops, "F16", args.n, args.n, T, max(1, args.reps // 2), max(1, inner // 4), warm)
        W = np.random.default_rng(0).standard_normal((args.n, args.n), dtype=np.float32)
        x = np.ones(args.n, np.float32)
        t = _best(lambda: W @ x, args.reps)
        W16 = W.astype(np.float16)
        t16 = _best(lambda: W16.astype(np.float32) @ x, 2)
        print(f"numpy: f32 W @ x {t * 1e3:.2f} ms; f16 W.astype(f32) @ x {t16 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
