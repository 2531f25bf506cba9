"""Where the CPU reads weights fastest: the read and F16 one-token product rates over three kinds of memory.

The hybrid's CPU steps read weights held in the GPU's pinned cache (Vulkan upload memory, allocated by
the driver); the CPU-only engine reads numpy arrays (which numpy asks the kernel to back with huge
pages); the planner's probe reads a fresh numpy buffer. On one H100 host these gave 121, 130 and 107
GB/s. This tool measures the same kernels over each kind of memory in one process, so the cause can be
told from a page-size effect, the driver's memory, or the probe itself. On the next host (4 GiB each,
F16 one-token product): numpy 108.5 GB/s, 4 KiB pages 105.1, madvised huge pages 103.3, and that
host's CPU-only decode read 105: no page-size effect; the hosts differ.

    python tools/device/memprobe.py ARCHIVE [--gib 2] [--threads N]    # JSON lines on stdout
"""

from __future__ import annotations

import argparse
import json
import mmap
import sys
from pathlib import Path

import numpy as np

from vkpack.pack_format.reader import Archive
from vkpack.runtime import vk
from vkpack.runtime.hybrid.rates import best_of
from vkpack.runtime.native.backend import NativeCpuBackend

COLS = 4096
ROW_BYTES = 2 * COLS   # F16


def anon_huge_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def measure(cpu: NativeCpuBackend, buf: np.ndarray, name: str) -> dict:
    """bench_read and a one-token F16 product over `buf` (filled with halves of 0.1 first)."""
    buf.view(np.uint16)[:] = 0x2E66
    rows = buf.size // ROW_BYTES
    w = cpu.stored_matrix("F16", buf[: rows * ROW_BYTES], rows, COLS)
    x = np.full((1, COLS), 0.01, dtype=np.float32)
    y = np.empty((1, rows), dtype=np.float32)
    cpu.matmul(w, x, y)
    cpu.kernels.bench_read(buf, cpu.threads)
    out = {"memory": name, "gib": buf.size / 2**30,
           "read_gbs": buf.size / best_of(5, lambda: cpu.kernels.bench_read(buf, cpu.threads)) / 1e9,
           "f16_matvec_gbs": rows * ROW_BYTES / best_of(5, lambda: cpu.matmul(w, x, y)) / 1e9}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", type=Path)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    n = int(args.gib * 2**30) // (2 << 20) * (2 << 20)
    thp = {k: Path(f"/sys/kernel/mm/transparent_hugepage/{k}").read_text().strip()
           for k in ("enabled", "defrag") if Path(f"/sys/kernel/mm/transparent_hugepage/{k}").exists()}
    print(json.dumps({"thp": thp, "anon_huge_kib": anon_huge_kib()}), flush=True)
    cpu = NativeCpuBackend(Archive(args.archive), threads=args.threads)

    h0 = anon_huge_kib()
    plain = np.empty(n, dtype=np.uint8)   # numpy madvises large allocations for huge pages
    plain[:] = 0
    print(json.dumps({"numpy_huge_kib": anon_huge_kib() - h0}), flush=True)
    measure(cpu, plain, "numpy")
    del plain

    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    small = np.frombuffer(m, dtype=np.uint8)
    measure(cpu, small, "anon 4k pages")
    del small
    m.close()

    m = mmap.mmap(-1, n + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    h0 = anon_huge_kib()
    raw = np.frombuffer(m, dtype=np.uint8)
    skip = (-raw.ctypes.data) % (2 << 20)
    huge = raw[skip: skip + n]
    huge[:] = 0
    print(json.dumps({"madvised_huge_kib": anon_huge_kib() - h0}), flush=True)
    measure(cpu, huge, "anon madvise huge, 2 MiB aligned")
    del huge, raw
    m.close()

    dev = vk.Device()
    try:
        from vkpack.runtime.vk.host_cache import HostPackCache
        m = min(n, 1 << 30, dev.info.max_memory_allocation_size // (2 << 20) * (2 << 20))   # one block
        hc = HostPackCache(dev, m, block_bytes=m)
        block, off = hc.reserve(m)
        view = hc.host_view(block, off, m)
        print(json.dumps({"vulkan_ptr_mod_2m": int(view.ctypes.data % (2 << 20))}), flush=True)
        measure(cpu, view, f"vulkan upload memory ({dev.info.name})")
        del view
        hc.close()
    finally:
        dev.close()


if __name__ == "__main__":
    sys.exit(main())
