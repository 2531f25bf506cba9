"""Quick measurements of the Vulkan backend (not a test): python tools/vk_bench.py

Prints host cost per recorded dispatch, cost per replayed submit, and matvec/matmul times.
`--coop` compares the tensor-core prefill matmul with the tiled one on the Llama-3-8B shapes.
`--upload` measures host->device streaming into device memory (`measure_upload`).
`--attention` times decode attention, one-pass vs split-K (`bench_attention`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vkpack.runtime.vk import Device, Ops, Recorder, Weight


def _best(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def gpu_best(rec: Recorder, reps: int, warmup: int = 0, inner: int = 1) -> float:
    """Best GPU seconds of one of `inner` repeats recorded in `rec` (made with timestamps), over `reps`
    timed runs after `warmup` untimed ones (they bring the clocks up)."""
    for _ in range(warmup):
        rec.run()
    best = float("inf")
    for _ in range(reps):
        rec.run()
        best = min(best, rec.gpu_time_s() / inner)
    return best


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
    gpu = gpu_best(rec, reps, inner=inner)
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


COOP_SHAPES = {(4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}  # 8B layer: shape -> count


def bench_coop(dev: Device, types: list[str], T: int, reps: int, sweep: bool = False) -> None:
    """Tiled (fp32 SIMT) vs cooperative-matrix linear on the 8B shapes: GPU time and TFLOP/s."""
    tiled, coop = Ops(dev), Ops(dev)
    tiled.coop = False
    if not coop.coop:
        print(f"{dev.name}: no VK_NV_cooperative_matrix 16x16x16 f16/f32 (shapes: {dev.info.coopmat_shapes})")
        return
    print(f"coopmat shapes: {dev.info.coopmat_shapes}")
    tiles = [None, (128, 64, 32, 4, 2), (256, 64, 32, 4, 2), (128, 32, 32, 4, 1), (64, 32, 32, 2, 1),
             (64, 64, 32, 2, 2), (128, 128, 32, 4, 2)] if sweep else [None]
    for dt in types:
        layer = {"tiled": 0.0, "coop": 0.0}
        for (rows, cols), n in COOP_SHAPES.items():
            flop = 2 * rows * cols * T
            print("  tiled: ", end="")
            t0 = bench_linear(dev, tiled, dt, rows, cols, T, reps, 3, 0.3)
            best = None
            for tile in tiles:
                coop.mm_coop_tile = tile
                print(f"  coop {tile or 'default'}: ", end="")
                t = bench_linear(dev, coop, dt, rows, cols, T, reps, 10, 0.3)
                best = t if best is None else min(best, t)
            coop.mm_coop_tile = None
            layer["tiled"] += n * t0
            layer["coop"] += n * best
            print(f"{dt} {rows}x{cols} T={T}: tiled {flop / t0 / 1e12:.1f} TFLOP/s, coop {flop / best / 1e12:.1f} "
                  f"TFLOP/s ({t0 / best:.1f}x)")
        print(f"{dt}: one 8B layer's 7 matmuls at T={T}: tiled {layer['tiled'] * 1e3:.2f} ms, coop "
              f"{layer['coop'] * 1e3:.2f} ms -> 32 layers of matmuls alone: {T / (32 * layer['tiled']):.0f} vs "
              f"{T / (32 * layer['coop']):.0f} tok/s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="matrix size for the matvec")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--types", default="F16,Q8_0,Q4_0")
    ap.add_argument("--tokens", default="16", help="T values for the prefill matmul")
    ap.add_argument("--sweep", action="store_true", help="compare prefill kernels")
    ap.add_argument("--attention", action="store_true", help="decode attention, 8B shape (bench_attention)")
    ap.add_argument("--coop", action="store_true", help="tensor-core vs tiled linear on the 8B shapes")
    ap.add_argument("--coop-sweep", action="store_true", help="with --coop: also sweep Ops.mm_coop_tile")
    ap.add_argument("--upload", action="store_true", help="host->device streaming GB/s (measure_upload)")
    ap.add_argument("--upload-mib", type=int, default=1024, help="with --upload: bytes per measurement, MiB")
    ap.add_argument("--threads", type=int, default=None, help="with --upload: N (default: Device.copy_threads)")
    ap.add_argument("--slot-mib", type=int, default=None, help="with --upload: staging slot size, MiB")
    args = ap.parse_args(argv)
    with Device() as dev:
        ops = Ops(dev)
        print(f"{dev}  subgroup {dev.info.subgroup_size}  unified {dev.info.unified_memory}  "
              f"transfer queue: {dev.transfer_queue_kind}")
        if args.attention:
            bench_attention(dev, args.reps)
            return
        if args.upload:
            upload_report(dev, args.upload_mib, args.threads, min(args.reps, 3), args.slot_mib)
            return
        if args.coop:
            types = args.types.split(",") if args.types != "F16,Q8_0,Q4_0" else ["F16"]
            bench_coop(dev, types, int(args.tokens.split(",")[0]) if args.tokens != "16" else 512,
                       args.reps, args.coop_sweep)
            return
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


# ---- host -> device streaming ----

def _gbps(nbytes: int, fn, callers: int, reps: int, piece: int | None = None) -> float:
    """Best GB/s over `reps` of `callers` threads each copying a contiguous share of `nbytes`
    with fn(pos, m), in calls of at most `piece` bytes."""
    from concurrent.futures import ThreadPoolExecutor

    step = -(-nbytes // callers // 4096) * 4096
    shares = [(a, min(step, nbytes - a)) for a in range(0, nbytes, step)]

    def share(pos: int, m: int) -> None:
        p = piece or m
        for a in range(pos, pos + m, p):
            fn(a, min(p, pos + m - a))

    best = float("inf")
    with ThreadPoolExecutor(len(shares)) as ex:
        for _ in range(reps):
            t = time.perf_counter()
            for f in [ex.submit(share, a, m) for a, m in shares]:
                f.result()
            best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def _link_gbps(dev: Device, dst, nbytes: int, reps: int, chunk: int = 64 << 20, depth: int = 4) -> float:
    """vkCmdCopyBuffer from filled host staging buffers into `dst`, `depth` copies in flight."""
    from vkpack.runtime.vk.staging import Slot

    slots = [Slot(dev, "upload", min(chunk, nbytes)) for _ in range(depth)]
    try:
        for s in slots:
            s.host[:] = 7
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for i, pos in enumerate(range(0, nbytes, slots[0].size)):
                s = slots[i % depth]
                s.wait(dev)
                s.copy(dev, s.buf._buf, 0, dst._buf, pos, min(s.size, nbytes - pos))
            for s in slots:
                s.wait(dev)
            best = min(best, time.perf_counter() - t)
        return nbytes / best / 1e9
    finally:
        for s in slots:
            s.destroy(dev)


def measure_upload(dev: Device, nbytes: int = 1 << 30, threads: int | None = None, reps: int = 3) -> dict[str, float]:
    """Host -> device GB/s into device memory: the DMA link alone; `Device.upload` from a numpy
    array and `Device.upload_file` from a file in the page cache, each by 1 thread, by N threads
    (N calls at once, 1 copy thread each), by one call over N copy threads, and as the engine
    loads packs (4 callers, 32 MiB calls, N copy threads each)."""
    import os
    import tempfile

    n_threads = threads or dev.copy_threads
    block = dev.alloc_block(nbytes, "device")
    dst = dev.buffer(block, 0, nbytes)
    saved = dev.copy_threads
    out = {"link (vkCmdCopyBuffer, 4 x 64 MiB in flight)": _link_gbps(dev, dst, nbytes, reps)}
    rng = np.random.default_rng(0)
    src = np.resize(rng.integers(0, 256, 1 << 24, dtype=np.uint8), nbytes)
    src[::4093] = rng.integers(0, 256, len(src[::4093]), dtype=np.uint8)  # no period of 16 MiB
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "upload.bin")
            src.tofile(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                modes = {"upload (numpy)": lambda pos, m: dev.upload(dst, src[pos:pos + m], pos),
                         "upload_file (page cache)": lambda pos, m: dev.upload_file(dst, fd, pos, m, pos)}
                for name, fn in modes.items():
                    dev.copy_threads = 1
                    fn(0, nbytes)   # warm: slots made, file read once
                    out[f"{name}, 1 thread"] = _gbps(nbytes, fn, 1, reps)
                    out[f"{name}, {n_threads} threads"] = _gbps(nbytes, fn, n_threads, reps)
                    dev.copy_threads = n_threads
                    out[f"{name}, 1 call x {n_threads} copy threads"] = _gbps(nbytes, fn, 1, reps)
                    out[f"{name}, packs: 4 callers x 32 MiB x {n_threads} copy threads"] = _gbps(
                        nbytes, fn, 4, reps, 32 << 20)
                    for a in (0, nbytes // 2, max(0, nbytes - (1 << 20))):   # spot check
                        m = min(1 << 20, nbytes - a)
                        if dev.download(dst, m, a) != src[a:a + m].tobytes():
                            raise RuntimeError(f"{name}: bytes at {a} differ after the upload")
            finally:
                os.close(fd)
    finally:
        dev.copy_threads = saved
        dst.destroy()
        block.destroy()
    return out


def upload_report(dev: Device, mib: int, threads: int | None, reps: int, slot_mib: int | None) -> None:
    """Print `measure_upload` for each system-memory staging type (cached vs write-combined)."""
    if slot_mib:
        dev.STAGING_SLOT_BYTES = slot_mib << 20
    types = dev.info.memory_types
    cands = [t.index for t in types if t.host_visible and t.host_coherent and not t.device_local]
    cands = cands or [dev.memory_type["upload"]]
    mt = types[dev.memory_type["device"]]
    print(f"device memory: type {mt.index} (device_local {mt.device_local}, host_visible {mt.host_visible}); "
          f"copy_threads {dev.copy_threads}, slot {dev.STAGING_SLOT_BYTES >> 20} MiB, "
          f"upload type {dev.memory_type['upload']} of candidates {cands}")
    default = dev.memory_type["upload"]
    for ti in sorted(cands, key=lambda i: i != default):
        dev._close_memory()
        dev.memory_type["upload"] = ti
        print(f"staging type {ti} (cached {types[ti].host_cached}){' [default]' if ti == default else ''}:")
        for k, v in measure_upload(dev, mib << 20, threads, reps).items():
            print(f"  {k:64s} {v:6.1f} GB/s")
    dev._close_memory()
    dev.memory_type["upload"] = default


# ---- decode attention ----

def bench_attention(dev: Device, reps: int = 5, contexts: tuple[int, ...] = (512, 4096), n_ctx: int = 8192,
                    heads: tuple[int, int, int] = (32, 8, 128), inner: int = 20) -> None:
    """One decode token's attention (Llama-3-8B layer shape) at position L-1 of an n_ctx cache:
    the one-pass kernel vs split-K + merge, f16 and f32 caches; GPU time and K/V read GB/s."""
    n_heads, n_kv, hd = heads
    ops = Ops(dev)
    if ops.cpu:
        inner = 2
    rng = np.random.default_rng(0)
    q = dev.alloc(n_heads * hd * 4)
    dev.upload(q, rng.standard_normal(n_heads * hd, dtype=np.float32))
    out, pos = dev.alloc(n_heads * hd * 4), dev.alloc(16)
    sb = dev.alloc(max(16, ops.attention_scratch_bytes(1, n_heads, hd, n_ctx)))
    for f16 in (True, False):
        dt = np.float16 if f16 else np.float32
        kv = rng.standard_normal((n_ctx, n_kv * hd), dtype=np.float32).astype(dt)
        kc, vc = dev.alloc(kv.nbytes), dev.alloc(kv.nbytes)
        dev.upload(kc, kv)
        dev.upload(vc, kv[::-1].copy())
        for L in contexts:
            dev.upload(pos, np.array([L - 1], np.uint32))
            res = {}
            for name, scratch in (("one-pass", None), ("split", sb)):
                rec = Recorder(dev, timestamps=True)
                for _ in range(inner):
                    ops.attention(rec, q, kc, vc, pos, out, 1, n_heads, n_kv, hd, n_ctx, f16=f16, scratch=scratch)
                rec.finish()
                res[name] = gpu_best(rec, reps, warmup=1, inner=inner)
                rec.destroy()
            nbytes = 2 * L * n_kv * hd * kv.itemsize
            print(f"attention {'f16' if f16 else 'f32'} cache, L={L} (n_ctx {n_ctx}, splits "
                  f"{ops.attention_splits(1, n_ctx)}): one-pass {res['one-pass'] * 1e6:.1f} us, split "
                  f"{res['split'] * 1e6:.1f} us ({nbytes / res['split'] / 1e9:.0f} GB/s of K/V, "
                  f"{res['one-pass'] / res['split']:.1f}x)")
        kc.destroy()
        vc.destroy()
    for b in (q, out, pos, sb):
        b.destroy()


if __name__ == "__main__":
    main()
