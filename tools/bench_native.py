"""Native kernels (runtime/native) vs. the numpy backend's f32 product, in GB/s of stored weight bytes.

For each type at decode shapes (4096x4096, an 8B layer; 576x1536, SmolLM2-135M's) and n_tok in
(1, 8, 32): the rate at which `vkp_matmul` consumes the weight as stored, on 1 thread and on all
cores; the numpy backend's product on a dequantized f32 copy (`x @ W.T`, BLAS with its own threads)
expressed in the same stored bytes; and the machine's plain memory-read rate (`vkp_bench_read`, a C
read loop from the same build) as the limit. Weights are distinct copies spread over an arena larger
than the last-level cache, visited round robin, so every call reads from DRAM as a model's layers do.

    python tools/bench_native.py                      # the table (~1-2 minutes)
    python tools/bench_native.py --json bench.json    # and the numbers as JSON
    python tools/bench_native.py --types Q4_0,Q4_K --tokens 1 --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from vkpack.pack_format.constants import row_bytes
from vkpack.runtime import native

SHAPES = ((4096, 4096), (576, 1536))
TOKENS = (1, 8, 32)
FILL = 0x2E66            # every 2-byte field reads as a finite half (0.1): scales stay sane, no NaN or denormals


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _rate(fn, min_time: float, windows: int = 2) -> float:
    """Best calls per second of `fn(i)` (i counts up) over `windows` windows of at least `min_time` s."""
    best, i = 0.0, 0
    fn(i)                                                     # warm: first-touch, thread start
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while True:
            i += 1
            n += 1
            fn(i)
            dt = time.perf_counter() - t0
            if dt >= min_time and n >= 3:
                break
        best = max(best, n / dt)
    return best


def read_bandwidth(k: native.Kernels, arena: np.ndarray, threads: int) -> float:
    """GB/s of a plain read of the whole arena."""
    return max(arena.size / _timed(lambda: k.bench_read(arena, threads)) for _ in range(3)) / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_native(k, arena, dtype, rows, cols, n_tok, threads, min_time) -> float:
    """GB/s of stored weight bytes consumed by vkp_matmul."""
    nb = rows * row_bytes(dtype, cols)
    copies = max(1, arena.size // nb)
    x = np.random.default_rng(0).standard_normal((n_tok, cols), np.float32)
    y = np.empty((n_tok, rows), np.float32)

    def call(i):
        j = i % copies
        k.matmul(dtype, arena[j * nb:(j + 1) * nb], rows, cols, x, y, threads)
    return _rate(call, min_time) * nb / 1e9


def bench_numpy(arena, rows, cols, n_tok, min_time) -> float:
    """Calls per second of the numpy backend's product: x @ W.T on an f32 copy of W (BLAS)."""
    w32 = arena.view(np.float32)
    n = rows * cols
    copies = max(1, w32.size // n)
    x = np.random.default_rng(0).standard_normal((n_tok, cols), np.float32)
    y = np.empty((n_tok, rows), np.float32)

    def call(i):
        j = i % copies
        np.matmul(x, w32[j * n:(j + 1) * n].reshape(rows, cols).T, out=y)
    return _rate(call, min_time)


def run(types, shapes, tokens, threads, arena_mib, min_time, out=sys.stdout) -> dict:
    k = native.load()
    if k is None:
        raise SystemExit(f"native kernels unavailable: {native.available()[1]}")
    arena = np.full((arena_mib << 20) // 2, FILL, np.uint16).view(np.uint8)
    f32 = np.full((arena_mib << 20) // 4, 0.01, np.float32).view(np.uint8)
    res = {"machine": {"cpu": _cpu_name(), "cores": _cores(), "arch": platform.machine(), "library": str(k.path),
                       "arena_mib": arena_mib},
           "read_gbs": {str(t): read_bandwidth(k, arena, t) for t in threads}, "native": [], "numpy": []}
    rb = res["read_gbs"]
    res["machine"]["loadavg_start"] = os.getloadavg()[0]
    print(f"{res['machine']['cpu']}, {res['machine']['cores']} cores; library {k.path.name}; arena {arena_mib} MiB; "
          f"load average {os.getloadavg()[0]:.1f} (other work on the cores skews multi-thread numbers)", file=out)
    print("plain read: " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in rb.items()), file=out)
    tmax = str(max(threads))
    head = (f"{'shape':>10} {'n_tok':>5} {'type':>5} " + " ".join(f"{f'{t}T GB/s':>9}" for t in threads)
            + f" {'% read':>6} {'numpy f32':>10} {'speedup':>7}")
    for rows, cols in shapes:
        for n_tok in tokens:
            np_rate = bench_numpy(f32, rows, cols, n_tok, min_time)
            res["numpy"].append({"rows": rows, "cols": cols, "n_tok": n_tok, "ms": 1e3 / np_rate,
                                 "f32_gbs": np_rate * rows * cols * 4 / 1e9})
            print(f"\n{head}\n{'':>10} {'':>5} {'':>5} numpy f32: {1e3 / np_rate:.3f} ms per product, "
                  f"{np_rate * rows * cols * 4 / 1e9:.1f} GB/s of f32 read", file=out)
            for dtype in types:
                nb = rows * row_bytes(dtype, cols)
                gbs = {}
                for t in threads:
                    gbs[str(t)] = bench_native(k, arena, dtype, rows, cols, n_tok, t, min_time)
                    res["native"].append({"rows": rows, "cols": cols, "n_tok": n_tok, "dtype": dtype,
                                          "threads": t, "gbs": gbs[str(t)], "ms": nb / gbs[str(t)] / 1e6})
                speedup = gbs[tmax] / (np_rate * nb / 1e9)
                rates = " ".join(f"{gbs[str(t)]:>9.1f}" for t in threads)
                print(f"{f'{rows}x{cols}':>10} {n_tok:>5} {dtype:>5} {rates}"
                      + f" {100 * gbs[tmax] / rb[tmax]:>5.0f}% {np_rate * nb / 1e9:>8.1f}GB {speedup:>6.1f}x",
                      file=out)
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}. GB/s: stored weight bytes per second; "
          "% read: the last thread count's rate over the plain read; numpy f32: the numpy backend's product "
          "time in the same stored bytes; speedup: last thread count vs numpy.", file=out)
    return res


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--types", default=",".join(native.TYPES), help="comma-separated types")
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES), help="ROWSxCOLS,...")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="n_tok values")
    ap.add_argument("--threads", default=f"1,{_cores()}", help="thread counts (the last one is compared)")
    ap.add_argument("--arena-mib", type=int, default=512, help="weight copies spread over this much memory "
                    "(larger than the last-level cache)")
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds per timing window (best of 2)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 types, small shape and arena")
    a = ap.parse_args(argv)
    types, shapes = a.types.split(","), [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    tokens, threads, arena, min_time = _ints(a.tokens), _ints(a.threads), a.arena_mib, a.min_time
    if a.quick:
        types, shapes, tokens, threads, arena, min_time = ["F16", "Q4_K"], [(64, 512)], [1, 5], [1, 2], 8, 0.01
    unknown = [t for t in types if t not in native.TYPES]
    if unknown:
        ap.error(f"unknown types {unknown}; choose from {', '.join(native.TYPES)}")
    res = run(types, shapes, tokens, threads, arena, min_time)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
