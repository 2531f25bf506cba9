"""The measured rates a hybrid plan is made from, measured once per machine and cached.

Placement is arithmetic on four rates, so they are measured on the machine rather than assumed:
  link       host -> device copies (bytes/s), what streaming a pack costs;
  gpu_read   device memory read by the GPU (bytes/s), what a resident weight costs per pass;
  cpu        the native CPU product per weight type and batch size (stored bytes/s at 1, 8, 32
             tokens), what computing a weight on the CPU costs;
  sync       one CPU <-> GPU hand-over (seconds): a small download and upload, waited for;
  host_read  system memory read on every core (bytes/s): what the CPU's weights and the streamed ones
             share, since both are read from DRAM once per pass (measured on the H100 host: the CPU
             alone read the 8B model at 91 GB/s, and beside a 33 GB/s stream only at 66).

Each takes a fraction of a second. They are cached in `$VKPACK_CACHE/rates.json` (default
~/.cache/vkpack) under a key naming the CPU, its cores, the GPU and its driver, so a machine measures
once; `measure_rates(..., fresh=True)` measures again.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...pack_format.constants import row_bytes
from ..native.loader import cache_root

log = logging.getLogger(__name__)
BATCHES = (1, 8, 32)
PROBE_BYTES = 64 << 20     # the link's and the GPU's probes
GPU_COPIES = 8              # copies a submission in the GPU's probe
GPU_WARM_S = 0.2            # its warm-up
CPU_PROBE_BYTES = 512 << 20  # larger than a server's last-level cache (256 MB+ on some): read from DRAM, as layers are
FILL = 0x2E66              # every 2-byte field reads as the half 0.1: finite scales, no denormals
VERSION = 4


@dataclass
class Rates:
    """What one machine does per second (see the module docstring)."""

    link: float
    gpu_read: float
    sync: float
    cpu: dict[str, dict[int, float]] = field(default_factory=dict)   # dtype -> tokens -> bytes/s
    host_read: float = 0.0   # 0: not measured (no shared limit assumed)
    machine: str = ""

    def cpu_seconds(self, dtype: str, nbytes: int, tokens: int) -> float:
        """Seconds the native product of `tokens` tokens takes over `nbytes` stored bytes of `dtype`:
        interpolated between the measured batch sizes, linear in tokens beyond the largest."""
        by = self.cpu.get(dtype)
        if not by:  # a type not measured: the slowest type measured stands in for it
            by = min(self.cpu.values(), key=lambda b: b[min(b)]) if self.cpu else {1: 1e9}
        pts = sorted((int(b), nbytes / r) for b, r in by.items())
        if tokens <= pts[0][0]:
            return pts[0][1]
        for (b0, t0), (b1, t1) in itertools.pairwise(pts):
            if tokens <= b1:
                return t0 + (t1 - t0) * (tokens - b0) / (b1 - b0)
        b_last, t_last = pts[-1]
        return t_last * tokens / b_last

    def describe(self) -> str:
        cpu = "; ".join(f"{dt} " + ", ".join(f"{b}:{r / 1e9:.1f}" for b, r in sorted(by.items()))
                        for dt, by in sorted(self.cpu.items()))
        return (f"link {self.link / 1e9:.1f} GB/s, GPU read {self.gpu_read / 1e9:.0f} GB/s, host read "
                f"{self.host_read / 1e9:.0f} GB/s, hand-over {self.sync * 1e6:.0f} us, CPU GB/s by tokens: {cpu}")


def cache_path() -> Path:
    return cache_root() / "rates.json"


def machine_key(dev: Any, threads: int) -> str:
    """The CPU model, the threads the products use, the GPU and its driver."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dev.info
    return f"v{VERSION}|{cpu}|{threads} threads|{info.name}|driver {info.driver_version}"


def measure_rates(dev: Any, cpu_backend: Any, dtypes: set[str], fresh: bool = False) -> Rates:
    """The rates for the GPU `dev` and the native CPU backend, from the cache where it has them
    (every type in `dtypes` measured), else measured now and stored."""
    key = machine_key(dev, cpu_backend.threads)
    path = cache_path()
    cached = _read_cache(path)
    entry = None if fresh else cached.get(key)
    rates = Rates(**{**entry, "cpu": {dt: {int(b): r for b, r in by.items()} for dt, by in entry["cpu"].items()}}) \
        if entry else None
    missing = set(dtypes) - set(rates.cpu if rates else ())
    if rates is not None and not missing:
        return rates
    t0 = time.perf_counter()
    if rates is None:
        rates = Rates(link=_measure_link(dev), gpu_read=_measure_gpu_read(dev), sync=_measure_sync(dev), machine=key,
                      host_read=_measure_host_read(cpu_backend))
    for dt in sorted(missing):
        rates.cpu[dt] = {b: _measure_cpu(cpu_backend, dt, b) for b in BATCHES}
    log.info("measured this machine's rates in %.1f s: %s", time.perf_counter() - t0, rates.describe())
    cached[key] = asdict(rates)
    _write_cache(path, cached)
    return rates


def store_rates(rates: Rates) -> None:
    """Replace the cached rates of `rates.machine` (a calibration from measured passes)."""
    path = cache_path()
    cached = _read_cache(path)
    cached[rates.machine] = asdict(rates)
    _write_cache(path, cached)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    """Written whole to a temporary file, then renamed: a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the measured rates in %s (%s)", path, e)


def best_of(n: int, fn: Any) -> float:
    """The shortest of `n` timed calls of `fn` (seconds): the machine's rate, not its noise."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure_link(dev: Any) -> float:
    """A streamed pack's way to the GPU: one DMA from the pinned pack cache (vk/host_cache.py) where
    the device is not written in place, else an upload through staging (unified memory: a memcpy)."""
    from ..vk.host_cache import HostPackCache

    n = min(PROBE_BYTES, dev.info.max_memory_allocation_size // 4)
    buf = dev.alloc(n, "device")
    cache = None
    try:
        if not dev._in_place(dev.memory_type["device"]):
            cache = HostPackCache(dev, n)
            room = cache.reserve(n)
            if room is not None:
                cache.host_view(room[0], room[1], n)[:] = 7
                cache.commit(0, room[0], room[1], n)
                return n / best_of(3, lambda: cache.copy_to(0, buf, 0))
        data = np.full(n, 7, dtype=np.uint8)
        return n / best_of(3, lambda: dev.upload(buf, data))
    finally:
        if cache is not None:
            cache.close()
        buf.destroy()


def _measure_gpu_read(dev: Any) -> float:
    """A device-to-device copy reads and writes each byte: twice the bytes over its time. GPU_COPIES copies
    a submission (one alone was mostly the submission's own latency), after GPU_WARM_S of warm-up (an
    idle GPU's clocks ramp: measured on a fresh H100, one copy best of 3 read 222 GB/s, where passes
    read weights at over 2 TB/s)."""
    from ..vk.recorder import Recorder

    n = min(4 * PROBE_BYTES, dev.info.max_memory_allocation_size // 4)
    src, dst = dev.alloc(n, "device"), dev.alloc(n, "device")
    rec = Recorder(dev, label="rates")
    try:
        for _ in range(GPU_COPIES):
            rec.copy(src, dst)
        rec.finish()
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < GPU_WARM_S:
            rec.run()
        return 2 * n * GPU_COPIES / best_of(5, rec.run)
    finally:
        rec.destroy()
        src.destroy()
        dst.destroy()


def _measure_sync(dev: Any) -> float:
    """One hand-over of a pass's activation row: up and back down, each waited for."""
    buf = dev.alloc(1 << 16, "device")
    try:
        row = np.zeros(4096, dtype=np.float32)

        def once() -> None:
            dev.upload(buf, row)
            dev.download(buf, row.nbytes)

        once()
        return best_of(5, once)
    finally:
        buf.destroy()


def _measure_host_read(cpu_backend: Any) -> float:
    """A plain read of CPU_PROBE_BYTES on the backend's threads (the kernels' read loop)."""
    buf = np.ones(CPU_PROBE_BYTES, dtype=np.uint8)
    kernels = cpu_backend.kernels
    kernels.bench_read(buf, cpu_backend.threads)
    return buf.size / best_of(3, lambda: kernels.bench_read(buf, cpu_backend.threads))


def _measure_cpu(cpu_backend: Any, dtype: str, tokens: int) -> float:
    """Stored bytes per second of the backend's product of `tokens` tokens (the product the backend runs
    for that batch) on a weight of 4096-wide rows: CPU_PROBE_BYTES of them for one token (memory bound:
    from DRAM), PROBE_BYTES for more (compute bound: a smaller weight keeps the probe short)."""
    cols = 4096
    rb = row_bytes(dtype, cols)
    rows = max(1, (CPU_PROBE_BYTES if tokens == 1 else PROBE_BYTES) // rb)
    data = np.full(rows * rb // 2, FILL, dtype=np.uint16).view(np.uint8)
    w = cpu_backend.stored_matrix(dtype, data, rows, cols)
    x = np.full((tokens, cols), 0.01, dtype=np.float32)
    y = np.empty((tokens, rows), dtype=np.float32)
    cpu_backend.matmul(w, x, y)
    return rows * rb / best_of(3, lambda: cpu_backend.matmul(w, x, y))
