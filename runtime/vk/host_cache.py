"""Streamed packs kept in pinned system memory, so that loading one again is a single DMA.

When a model does not fit the VRAM budget, every decode token streams most of its packs again.
Reading them from the archive (page cache -> staging -> device) is bound by the host's memory
copies (20.7 GB/s on the H100 host against a 30.6 GB/s PCIe link, docs/benchmarks.md); from
host-visible system memory the device's copy engine reads them itself at the link's rate, and no
loading thread spends its time (or the GIL) on a memcpy. llama.cpp's CUDA backend keeps the host
copy of offloaded weights in pinned memory for the same reason.

Packs are admitted on their first load until the budget is spent, then bypassed: a decode pass
walks the packs in the same order every token, and for such a loop keeping a fixed set beats
any eviction order (LRU would throw out exactly the pack needed next).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np

from . import _lib
from .errors import VulkanError
from .memory import Buffer
from .staging import Transfer

log = logging.getLogger(__name__)

BLOCK_BYTES = 1 << 30     # pinned memory is allocated in blocks of at most this many bytes
DEFAULT_SHARE = 0.5       # without --ram-gb: at most this share of the memory available at start


def default_budget(model_bytes: int) -> int:
    """Bytes to pin when the user set no RAM budget: the model, or half of the available memory
    if less (pinned pages cannot be swapped or dropped; the page cache and the OS keep the rest)."""
    avail = _available_memory()
    return model_bytes if avail is None else min(model_bytes, int(avail * DEFAULT_SHARE))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class HostPackCache:
    """Pack bytes in "upload" (host-visible system) memory under a byte budget; `used` counts
    the blocks allocated, so the budget bounds the pinned memory itself."""

    def __init__(self, dev: Any, budget: int, block_bytes: int = BLOCK_BYTES):
        self.dev, self.budget = dev, max(0, budget)
        self.block_bytes = min(block_bytes, dev.info.max_memory_allocation_size)
        self.blocks: list[Buffer] = []
        self.top = 0                       # first free byte of the last block
        self.used = 0                      # bytes of all blocks
        self.entries: dict[int, tuple[Buffer, int, int]] = {}   # pack -> (block, offset, size)
        self.full = budget <= 0
        self.hits = 0
        self._lock = threading.Lock()
        self._transfers: list[Transfer] = []
        self._all_transfers: list[Transfer] = []
        self.trace: list[tuple[float, float]] | None = None   # set to a list: (start, end) of each copy (tools)

    def lookup(self, pack: int) -> tuple[Buffer, int, int] | None:
        return self.entries.get(pack)

    def reserve(self, n: int) -> tuple[Buffer, int] | None:
        """Room for `n` bytes (a block and an offset), or None once the budget is spent."""
        align = self.dev.buffer_alignment
        with self._lock:
            if self.full:
                return None
            if self.blocks and self.top + n <= self.blocks[-1].size:
                off = self.top
                self.top = -(-(off + n) // align) * align
                return self.blocks[-1], off
            size = max(n, min(self.block_bytes, self.budget - self.used))
            if n > self.block_bytes or self.used + size > self.budget:
                self.full = True
                return None
            try:
                block = self.dev.alloc(size, "upload")
            except VulkanError as e:  # the driver's pinned-memory limit: stop admitting, stream from the file
                log.info("pinned pack cache stops at %.2f GiB: %s", self.used / 2**30, e)
                self.full = True
                return None
            self.blocks.append(block)
            self.used += size
            self.top = -(-n // align) * align
            return block, 0

    def host_view(self, block: Buffer, offset: int, n: int) -> np.ndarray:
        """Writable uint8 view of cache bytes (numpy copies and preadv into it release the GIL)."""
        return np.frombuffer(_lib.ffi.buffer(block.block.ptr + block.offset + offset, n), dtype=np.uint8)

    def commit(self, pack: int, block: Buffer, offset: int, n: int) -> None:
        """`pack`'s bytes are in place: later loads copy them from here."""
        with self._lock:
            self.entries[pack] = (block, offset, n)

    def copy_to(self, pack: int, dst: Buffer, dst_offset: int) -> None:
        """DMA `pack`'s cached bytes into `dst` at `dst_offset`; returns when they have landed."""
        block, off, n = self.entries[pack]
        with self._lock:
            t = self._transfers.pop() if self._transfers else None
        if t is None:
            t = Transfer(self.dev)
            with self._lock:
                self._all_transfers.append(t)
        t0 = time.perf_counter()
        try:
            t.copy(self.dev, block._buf, off, dst._buf, dst_offset, n)
            t.wait(self.dev)
        finally:
            if self.trace is not None:
                self.trace.append((t0, time.perf_counter()))
            with self._lock:
                self._transfers.append(t)
        self.hits += 1

    def close(self) -> None:
        """Free the pinned blocks (the device must be idle)."""
        with self._lock:
            transfers, self._all_transfers, self._transfers = self._all_transfers, [], []
            blocks, self.blocks, self.entries = self.blocks, [], {}
            self.used = self.top = 0
        for t in transfers:
            t.destroy(self.dev)
        for b in blocks:
            b.destroy()
