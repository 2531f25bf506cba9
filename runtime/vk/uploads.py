"""Packs into device memory: the tier's blocks, the three ways a pack's bytes get there, and what the kernels read.

Packs are uploaded as stored (quantized blocks included) into the device tier's blocks, one big
VkBuffer per block, and the kernels read them in place; only vectors stored in another type than
f32 (norm weights, biases) get an f32 copy after the pack's bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ...pack_format.constants import align_up
from ...pack_format.records import TensorPart, TensorRecord
from ..alloc import Allocation
from .device import Device
from .host_cache import HostPackCache, default_budget
from .kernels import BufferSlice
from .ops import Weight

if TYPE_CHECKING:
    from ...pack_format.reader import Archive
    from ..prefetch import PackSource

ALIGN = 256
Payload = dict[tuple[str, int], Any]


class DeviceBacking:
    """The device tier's blocks as VkDeviceMemory, each covered by one buffer."""

    def __init__(self, dev: Device, block_sizes: list[int]):
        self.dev = dev
        self.blocks = [dev.alloc_block(n, "device") for n in block_sizes]
        self.buffers = [dev.buffer(b, 0, n) for b, n in zip(self.blocks, block_sizes)]

    def view(self, a: Allocation) -> BufferSlice:
        return BufferSlice(self.buffers[a.block], a.offset, a.requested)

    def close(self) -> None:
        for b in self.buffers:
            b.destroy()
        for blk in self.blocks:
            blk.destroy()
        self.buffers, self.blocks = [], []


class PackUploads:
    """Loads packs into tier memory and describes them for the kernels; keeps streamed packs in
    pinned system memory when the engine gives it a RAM budget (`enable_host_cache`)."""

    def __init__(self, dev: Device, archive: Archive):
        self.dev = dev
        self.archive = archive
        self.slices: dict[int, list[tuple[TensorRecord, TensorPart]]] = {}
        for t in archive.tensors.values():
            for p in t.parts:
                self.slices.setdefault(p.pack, []).append((t, p))
        self._extra = {pid: sum(align_up(4 * _n(t, p), ALIGN) for t, p in sl if _needs_f32(t))
                       for pid, sl in self.slices.items()}
        self.host_cache: HostPackCache | None = None   # streamed packs in pinned memory

    def pack_bytes(self, pack: int) -> int:
        """Stored bytes as they are, plus f32 copies of 1-D tensors the kernels need as f32."""
        return align_up(self.archive.packs[pack].raw_size, ALIGN) + self._extra.get(pack, 0)

    def enable_host_cache(self, budget: int | None, model_bytes: int) -> bool:
        """Keep up to `budget` bytes (None: `host_cache.default_budget`) of streamed packs in pinned
        system memory (host_cache.py). Only where device memory is not written in place: on unified
        memory (lavapipe, integrated GPUs) a copy in system memory is the device tier's own kind of
        memory, twice."""
        if budget is None:
            budget = default_budget(model_bytes)
        if budget <= 0 or self.dev._in_place(self.dev.memory_type["device"]):
            return False
        self.host_cache = HostPackCache(self.dev, budget)
        return True

    def load(self, pack: int, source: PackSource, dest: BufferSlice) -> Payload:
        """Three ways in, cheapest first: a pack the pinned cache holds is one DMA from it (no read, no
        decompression); a raw pack checked before goes from the archive file into staging with
        preadv (no mmap faults, no copy in RAM); any other is decoded by `source` and uploaded,
        through the pinned cache when it has room. A prefetch, one of several loads in flight,
        copies on its own thread only."""
        hc = self.host_cache
        e = hc.lookup(pack) if hc is not None else None
        if e is not None:
            hc.copy_to(pack, dest.buffer, dest.offset)
            return self._describe(pack, hc.host_view(*e), dest)
        threads = 1 if source.background else None
        span = source.file_span()
        if span is not None:
            fd, offset, size = span
            self.dev.upload_file(dest.buffer, fd, offset, size, dest.offset, threads)
            return self._describe(pack, self.archive.stored_bytes(pack), dest)
        raw = source.decoded()
        if not self._cache_and_copy(pack, raw, dest):
            self.dev.upload(dest.buffer, raw, dest.offset, threads)
        return self._describe(pack, raw, dest)

    def _describe(self, pack: int, raw: bytes | memoryview, dest: BufferSlice) -> Payload:
        """The payload of a pack now in `dest`: a Weight per matrix part, a slice per vector (f32
        copies, written after the pack's bytes, of vectors stored in another type)."""
        buf, base = dest.buffer, dest.offset
        out: Payload = {}
        extra = align_up(len(raw), ALIGN)
        for t, p in self.slices.get(pack, []):
            if len(t.shape) == 1:
                if _needs_f32(t):
                    from ..cpu.dequant import dequantize

                    vals = dequantize(t.dtype, memoryview(raw)[p.offset:p.offset + p.nbytes], t.shape)
                    self.dev.upload(buf, vals.astype(np.float32).tobytes(), base + extra)
                    out[(t.name, p.row_start)] = BufferSlice(buf, base + extra, 4 * t.shape[0])
                    extra += align_up(4 * t.shape[0], ALIGN)
                else:
                    out[(t.name, p.row_start)] = BufferSlice(buf, base + p.offset, p.nbytes)
            else:
                out[(t.name, p.row_start)] = Weight(buf, base + p.offset, t.dtype, p.row_end - p.row_start, t.shape[-1])
        return out

    def _cache_and_copy(self, pack: int, raw: bytes | memoryview, dest: BufferSlice) -> bool:
        """Keep `pack`'s decoded bytes in the pinned cache and copy them to `dest` from there; False
        when the cache cannot take them (none, or full: the caller uploads through staging)."""
        hc, n = self.host_cache, len(raw)
        if hc is None or n == 0 or hc.lookup(pack) is not None:
            return False
        room = hc.reserve(n)
        if room is None:
            return False
        np.copyto(hc.host_view(room[0], room[1], n), np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8))
        hc.commit(pack, room[0], room[1], n)
        hc.copy_to(pack, dest.buffer, dest.offset)
        return True

    def close(self) -> None:
        if self.host_cache is not None:
            self.host_cache.close()
            self.host_cache = None


def _n(t: TensorRecord, p: TensorPart) -> int:
    return t.shape[0] if len(t.shape) == 1 else (p.row_end - p.row_start) * t.shape[-1]


def _needs_f32(t: TensorRecord) -> bool:
    return len(t.shape) == 1 and t.dtype != "F32"
