"""Memory blocks, buffers bound at offsets inside them, and host<->device copies.

The engine's allocator (`vkpack.runtime.alloc.SubAllocator`) hands out (offset, size) ranges of
large `MemoryBlock`s; `Device.buffer(block, offset, size)` makes a `Buffer` over such a range.

Every vkAllocateMemory and vkFreeMemory is counted, split by whether the memory type is
DEVICE_LOCAL (what `--vram-gb` bounds) or not: `Device.allocated_bytes()` and
`Device.peak_allocated_bytes()` measure what the engine really holds, whatever its allocator's
books say. Where the driver has VK_EXT_memory_budget, the heap usage it reports is sampled after
each allocation too (`Device.peak_heap_usage()`).

Copies are synchronous: `upload`/`upload_file`/`download` return when the bytes have arrived.
Host-visible coherent memory of an integrated or CPU device (lavapipe) is written in place; VRAM
of a discrete GPU goes through staging slots in system memory and DMA (`staging.py`). Both
copy with the GIL released, from up to `copy_threads` threads per call.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import _lib, staging
from ._lib import call, check, track
from .errors import VulkanError

KINDS = ("device", "upload", "readback")


class MemoryBlock:
    """One VkDeviceMemory allocation. Host-visible coherent blocks stay mapped (`ptr`)."""

    def __init__(self, dev: Any, size: int, type_index: int, kind: str):
        vk, ffi, lib = _lib.vk, _lib.ffi, _lib.lib
        self.device, self.size, self.type_index, self.kind = dev, size, type_index, kind
        mt = dev.info.memory_types[type_index]
        self.host_visible = mt.host_visible and mt.host_coherent
        self.host_cached = mt.host_cached
        self.device_local = mt.device_local
        ai = vk.VkMemoryAllocateInfo(allocationSize=size, memoryTypeIndex=type_index)
        self._mem = call(vk.vkAllocateMemory, dev._dev, ai, None,
                         context=f"allocating {size} bytes of {kind} memory (type {type_index})")
        track("memory")
        dev._count_memory(self.device_local, size)
        self.ptr = None
        if self.host_visible:
            pp = ffi.new("void**")
            try:
                check(lib.vkMapMemory(dev._dev, self._mem, 0, size, 0, pp), "vkMapMemory", f"{size} bytes")
            except VulkanError:
                self._free_mem()
                raise
            self.ptr = ffi.cast("char*", pp[0])
        dev._objects[id(self)] = self

    def _free_mem(self) -> None:
        _lib.vk.vkFreeMemory(self.device._dev, self._mem, None)
        track("memory", -1)
        self.device._count_memory(self.device_local, -self.size)
        self._mem = None

    def view(self, offset: int = 0, size: int | None = None) -> memoryview:
        """A writable memoryview of mapped bytes [offset, offset+size) (host-visible blocks only)."""
        if self.ptr is None:
            raise VulkanError(f"{self.kind} block of {self.size} bytes is not host-visible")
        size = self.size - offset if size is None else size
        if offset < 0 or size < 0 or offset + size > self.size:
            raise VulkanError(f"view [{offset}, {offset + size}) outside block of {self.size} bytes")
        return memoryview(_lib.ffi.buffer(self.ptr + offset, size))

    def destroy(self) -> None:
        """Free the memory (buffers bound to it must be destroyed first)."""
        if self._mem is None:
            return
        self.device._objects.pop(id(self), None)
        if self.ptr is not None:
            _lib.vk.vkUnmapMemory(self.device._dev, self._mem)
            self.ptr = None
        self._free_mem()

    free = destroy

    def __repr__(self) -> str:
        return f"MemoryBlock({self.kind}, {self.size} B, type {self.type_index}, mapped={self.ptr is not None})"


class Buffer:
    """A VkBuffer over bytes [offset, offset+size) of a `MemoryBlock` (storage + transfer usage)."""

    def __init__(self, dev: Any, block: MemoryBlock, offset: int, size: int, owns_block: bool = False):
        vk = _lib.vk
        if size <= 0 or offset < 0 or offset + size > block.size:
            raise VulkanError(f"buffer [{offset}, {offset + size}) does not fit block of {block.size} bytes")
        if offset % dev.buffer_alignment:
            raise VulkanError(f"buffer offset {offset} is not a multiple of {dev.buffer_alignment}")
        self.device, self.block, self.offset, self.size = dev, block, offset, size
        self._owns_block = owns_block
        self._buf = call(vk.vkCreateBuffer, dev._dev, dev._buffer_info(size), None,
                         context=f"creating a buffer of {size} bytes")
        track("buffer")
        req = vk.vkGetBufferMemoryRequirements(dev._dev, self._buf)
        if not (int(req.memoryTypeBits) >> block.type_index) & 1 or offset % int(req.alignment):
            self.destroy()
            raise VulkanError(f"buffer of {size} bytes cannot live in memory type {block.type_index} at "
                              f"offset {offset} (alignment {int(req.alignment)})")
        call(vk.vkBindBufferMemory, dev._dev, self._buf, block._mem, offset, context="binding buffer memory")
        dev._objects[id(self)] = self

    @property
    def host_visible(self) -> bool:
        return self.block.ptr is not None

    def view(self, offset: int = 0, size: int | None = None) -> memoryview:
        """Writable memoryview of the buffer's bytes (host-visible memory only); no GPU sync."""
        size = self.size - offset if size is None else size
        if offset < 0 or size < 0 or offset + size > self.size:
            raise VulkanError(f"view [{offset}, {offset + size}) outside buffer of {self.size} bytes")
        return self.block.view(self.offset + offset, size)

    def destroy(self) -> None:
        if self._buf is None:
            return
        self.device._objects.pop(id(self), None)
        _lib.vk.vkDestroyBuffer(self.device._dev, self._buf, None)
        track("buffer", -1)
        self._buf = None
        if self._owns_block:
            self.block.destroy()

    free = destroy

    def __repr__(self) -> str:
        return f"Buffer({self.size} B at {self.offset} of {self.block!r})"


class MemoryMixin:
    """Memory half of `Device` (kept apart to keep files small)."""

    STAGING_SLOT_BYTES = 16 << 20  # one staging chunk (a pack of up to 50 MB is a few chunks)
    READBACK_SLOTS = 2

    def _init_memory(self) -> None:
        vk = _lib.vk
        self._sharing_families = sorted({self.compute_family, self.transfer_family})
        probe = call(vk.vkCreateBuffer, self._dev, self._buffer_info(4096), None, context="probing buffer requirements")
        req = vk.vkGetBufferMemoryRequirements(self._dev, probe)
        self._buffer_type_bits = int(req.memoryTypeBits)
        self.buffer_alignment = max(int(req.alignment), self.info.min_storage_buffer_offset_alignment, 16)
        vk.vkDestroyBuffer(self._dev, probe, None)
        self._staging: dict[str, staging.SlotPool] = {}
        self._staging_lock = threading.Lock()
        self._copy_pool: tuple[int, ThreadPoolExecutor] | None = None
        self.memory_type = {k: self._pick_type(k) for k in KINDS}
        self._mem_lock = threading.Lock()
        self._mem_live = {True: 0, False: 0}    # bytes of live VkDeviceMemory, by DEVICE_LOCAL
        self._mem_peak = {True: 0, False: 0}
        self.heap_usage_at_open = self.heap_usage()   # other devices and driver objects of this process
        self._heap_peak = self.heap_usage_at_open
        self.direct_copies = True   # write host-visible memory in place; False forces staging (tests)
        self.copy_threads = staging.default_copy_threads()   # threads one big copy may use

    def _buffer_info(self, size: int) -> Any:
        vk = _lib.vk
        usage = (vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT
                 | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        if len(getattr(self, "_sharing_families", ())) > 1:  # no queue-ownership transfers needed
            return vk.VkBufferCreateInfo(size=size, usage=usage, sharingMode=vk.VK_SHARING_MODE_CONCURRENT,
                                         pQueueFamilyIndices=self._sharing_families)
        return vk.VkBufferCreateInfo(size=size, usage=usage, sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE)

    def _pick_type(self, kind: str) -> int:
        """device: on a discrete GPU, VRAM the host cannot map (a ReBAR mapping is write-combined
        across PCIe: ~11 GB/s from one thread, vs ~50 GB/s for DMA, docs/VULKAN.md §10); elsewhere
        host-visible memory if there is some, written in place. upload/readback: system memory,
        cached where offered."""
        info = self.info
        main = info.main_heap.index
        types = [t for t in info.memory_types if (self._buffer_type_bits >> t.index) & 1]
        if kind == "device":
            cands = [t for t in types if t.device_local] or types
            if info.unified_memory and info.type != "discrete":
                key = lambda t: (t.heap != main, not (t.host_visible and t.host_coherent), t.index)
            else:
                key = lambda t: (t.heap != main, t.host_visible, t.index)
        else:
            cands = [t for t in types if t.host_visible and t.host_coherent]
            if kind == "upload":   # system memory: staging must not take VRAM
                key = lambda t: (t.device_local, not t.host_cached, t.index)
            else:                  # readback: the host reads it, so cached first
                key = lambda t: (not t.host_cached, t.device_local, t.index)
        if not cands:
            raise VulkanError(f"{info.name}: no memory type for {kind} buffers")
        return min(cands, key=key).index

    # ---- accounting ----

    def _count_memory(self, device_local: bool, nbytes: int) -> None:
        """Called by `MemoryBlock` right after each vkAllocateMemory (+size) and vkFreeMemory (-size)."""
        with self._mem_lock:
            live = self._mem_live[device_local] = self._mem_live[device_local] + nbytes
            self._mem_peak[device_local] = max(self._mem_peak[device_local], live)
        if nbytes > 0 and self._heap_peak is not None:   # usage only falls on a free: sample after allocations
            usage = self.heap_usage()
            with self._mem_lock:
                self._heap_peak = max(self._heap_peak, usage or 0)

    def allocated_bytes(self, device_local: bool = True) -> int:
        """Bytes of VkDeviceMemory this device holds now, of DEVICE_LOCAL memory types (the memory
        `--vram-gb` bounds; on unified memory such as lavapipe's, all of it) or of the other types
        (system memory: staging slots, pinned packs).

        Example: `dev.alloc_block(1 << 20)` raises `dev.allocated_bytes()` by 1 MiB on any device."""
        with self._mem_lock:
            return self._mem_live[device_local]

    def peak_allocated_bytes(self, device_local: bool = True) -> int:
        """The most `allocated_bytes(device_local)` has been since the device was opened."""
        with self._mem_lock:
            return self._mem_peak[device_local]

    def heap_usage(self) -> int | None:
        """Bytes in use on the main (VRAM) heap as the driver reports them (VK_EXT_memory_budget), or
        None without the extension. The driver counts this whole process: other open devices and its
        own objects (pipelines, command buffers) too, so compare against `heap_usage_at_open`."""
        budget = self.memory_budget()
        if budget is None:
            return None
        main = self.info.main_heap.index
        return next(usage for heap, _, usage in budget if heap == main)

    def peak_heap_usage(self) -> int | None:
        """The highest `heap_usage()` seen right after any allocation of this device (None without
        VK_EXT_memory_budget)."""
        with self._mem_lock:
            return self._heap_peak

    # ---- allocation ----

    def alloc_block(self, size: int, kind: str = "device") -> MemoryBlock:
        """Allocate one VkDeviceMemory of `size` bytes; kind is "device", "upload" or "readback"."""
        if kind not in KINDS:
            raise VulkanError(f"memory kind {kind!r} unknown, expected one of {KINDS}")
        if size <= 0 or size > self.info.max_memory_allocation_size:
            raise VulkanError(f"block size {size} outside 1..{self.info.max_memory_allocation_size} "
                              f"(maxMemoryAllocationSize of {self.info.name})")
        return MemoryBlock(self, size, self.memory_type[kind], kind)

    def buffer(self, block: MemoryBlock, offset: int, size: int) -> Buffer:
        """A buffer over [offset, offset+size) of `block`; offset must be a multiple of `buffer_alignment`."""
        return Buffer(self, block, offset, size)

    def alloc(self, nbytes: int, kind: str = "device") -> Buffer:
        """A buffer with its own dedicated block (simple; prefer blocks + `buffer()` for many tensors)."""
        block = self.alloc_block(nbytes, kind)
        try:
            return Buffer(self, block, 0, nbytes, owns_block=True)
        except BaseException:
            block.destroy()
            raise

    # ---- staging ----

    def _in_place(self, type_index: int) -> bool:
        """Whether copies use the mapping of memory type `type_index` in place (host-visible,
        coherent, and not VRAM of a discrete GPU behind its PCIe BAR)."""
        t = self.info.memory_types[type_index]
        return (self.direct_copies and t.host_visible and t.host_coherent
                and not (t.device_local and self.info.type == "discrete"))

    def _direct(self, block: MemoryBlock) -> bool:
        return block.ptr is not None and self._in_place(block.type_index)

    def upload_slots(self) -> int:
        """Most upload slots that exist at once: DEPTH for each copy thread and for a few callers."""
        return staging.DEPTH * (self.copy_threads + 4)

    def staging_vram_bytes(self) -> int:
        """Device-local bytes staging may take: 0 when device memory is written in place or when
        staging lives in system memory (not VRAM)."""
        if self._in_place(self.memory_type["device"]):
            return 0
        n = 0
        for kind, slots in (("upload", self.upload_slots()), ("readback", self.READBACK_SLOTS)):
            if self.info.memory_types[self.memory_type[kind]].device_local:
                n += slots * self.STAGING_SLOT_BYTES
        return n

    def _pool(self, kind: str) -> staging.SlotPool:
        with self._staging_lock:
            p = self._staging.get(kind)
            n = self.upload_slots() if kind == "upload" else self.READBACK_SLOTS
            if p is None or p.slot_bytes != self.STAGING_SLOT_BYTES:
                if p is not None:
                    p.close()
                p = self._staging[kind] = staging.SlotPool(self, kind, self.STAGING_SLOT_BYTES, n)
            p.max_slots = max(p.max_slots, n)   # copy_threads may have grown
            return p

    def _copy_executor(self) -> ThreadPoolExecutor:
        with self._staging_lock:
            if self._copy_pool is None or self._copy_pool[0] != self.copy_threads:
                if self._copy_pool is not None:
                    self._copy_pool[1].shutdown(wait=False)
                ex = ThreadPoolExecutor(max(1, self.copy_threads), thread_name_prefix="vkpack-copy")
                self._copy_pool = (self.copy_threads, ex)
            return self._copy_pool[1]

    # ---- copies ----

    def _check_range(self, buf: Buffer, offset: int, n: int) -> None:
        if buf._buf is None:
            raise VulkanError("buffer was destroyed")
        if offset < 0 or n < 0 or offset + n > buf.size:
            raise VulkanError(f"copy of {n} bytes at offset {offset} outside buffer of {buf.size} bytes")

    def _copy_in(self, buf: Buffer, offset: int, n: int, fill: Any, threads: int | None = None) -> None:
        """Write n bytes into `buf` at `offset`, produced by fill(out, pos, m) (see staging.Job);
        `threads` caps the copying threads (default `copy_threads`)."""
        copy_threads = self.copy_threads if threads is None else max(1, threads)
        if self._direct(buf.block):
            threads, chunk = staging.split(n, None, copy_threads)
            dst = np.frombuffer(_lib.ffi.buffer(buf.block.ptr + buf.offset + offset, n), dtype=np.uint8)
            if threads == 1:
                fill(dst, 0, n)
                return
            job = staging.Job(n, chunk, fill, direct=dst)
        else:
            pool = self._pool("upload")
            threads, chunk = staging.split(n, pool.slot_bytes, copy_threads)
            job = staging.Job(n, chunk, fill, pool=pool, dst=buf._buf, dst_off=offset)
        staging.run(self, job, threads)

    def upload(self, buf: Buffer, data: Any, offset: int = 0, threads: int | None = None) -> None:
        """Copy bytes-like `data` (bytes, memoryview, numpy array) into `buf` at byte `offset`
        (`threads` caps the copying threads, default `copy_threads`)."""
        if isinstance(data, np.ndarray):
            src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        else:
            src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        n = len(src)
        self._check_range(buf, offset, n)
        if n:
            self._copy_in(buf, offset, n, lambda out, pos, m: np.copyto(out, src[pos:pos + m]), threads)

    def upload_file(self, buf: Buffer, fd: int, file_offset: int, nbytes: int, offset: int = 0,
                    threads: int | None = None) -> None:
        """Copy `nbytes` of open file `fd` from `file_offset` into `buf` at byte `offset`, read with
        os.preadv straight into staging (or into mapped memory): no mmap faults, no extra copy.
        `threads=1` when the caller is itself one of several loading threads (no hand-offs)."""
        self._check_range(buf, offset, nbytes)
        size = os.fstat(fd).st_size
        if file_offset < 0 or file_offset + nbytes > size:
            raise VulkanError(f"read of {nbytes} bytes at file offset {file_offset} outside file of {size} bytes")
        if nbytes:
            self._copy_in(buf, offset, nbytes, lambda out, pos, m: staging.pread_into(fd, out, file_offset + pos),
                          threads)

    def download(self, buf: Buffer, nbytes: int | None = None, offset: int = 0) -> bytes:
        """Return `nbytes` (default: to the end) of `buf` from byte `offset`; GPU writes must be finished."""
        ffi = _lib.ffi
        n = buf.size - offset if nbytes is None else nbytes
        self._check_range(buf, offset, n)
        if n == 0:
            return b""
        if self._direct(buf.block) and (buf.block.host_cached or self.info.type != "discrete"):
            return ffi.buffer(buf.block.ptr + buf.offset + offset, n)[:]
        out = np.empty(n, dtype=np.uint8)
        pool = self._pool("readback")
        s = pool.get()
        try:
            for pos in range(0, n, s.size):
                m = min(s.size, n - pos)
                s.copy(self, buf._buf, offset + pos, s.buf._buf, 0, m, to_host=True)
                s.wait(self)
                out[pos:pos + m] = s.host[:m]
        finally:
            s.wait(self)
            pool.put(s)
        return out.tobytes()

    def _close_memory(self) -> None:
        """Drop the staging slots and copy threads (made again on the next staged copy)."""
        with self._staging_lock:
            pools, self._staging = list(getattr(self, "_staging", {}).values()), {}
            ex, self._copy_pool = getattr(self, "_copy_pool", None), None
        if ex is not None:
            ex[1].shutdown(wait=True)
        for p in pools:
            p.close()
