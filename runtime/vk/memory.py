"""Memory blocks, buffers bound at offsets inside them, and host<->device copies.

The engine's allocator (`vkpack.runtime.alloc.SubAllocator`) hands out (offset, size) ranges of
large `MemoryBlock`s; `Device.buffer(block, offset, size)` makes a `Buffer` over such a range.
`Arena` is a tiny bump allocator for tests and scratch activations.

Copies are synchronous: `upload`/`download` return when the bytes have arrived. Memory that is
host-visible and coherent (lavapipe, integrated GPUs, ReBAR VRAM) is written with one memmove;
otherwise the bytes go through two staging slots, so copying chunk i+1 into staging overlaps
the transfer of chunk i.
"""

from __future__ import annotations

import numpy as np

import threading
from typing import Any

from . import _lib
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
        ai = vk.VkMemoryAllocateInfo(allocationSize=size, memoryTypeIndex=type_index)
        self._mem = call(vk.vkAllocateMemory, dev._dev, ai, None,
                         context=f"allocating {size} bytes of {kind} memory (type {type_index})")
        track("memory")
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


class Arena:
    """A bump allocator over one block: `alloc(n)` returns aligned Buffers; `destroy()` frees all."""

    def __init__(self, dev: Any, size: int, kind: str = "device"):
        self.device, self.block = dev, dev.alloc_block(size, kind)
        self.top, self.buffers = 0, []

    def alloc(self, nbytes: int) -> Buffer:
        a = self.device.buffer_alignment
        off = -(-self.top // a) * a
        buf = self.device.buffer(self.block, off, nbytes)
        self.top = off + nbytes
        self.buffers.append(buf)
        return buf

    def destroy(self) -> None:
        for b in self.buffers:
            b.destroy()
        self.buffers = []
        self.block.destroy()


class _Slot:
    """A staging buffer with its own command buffer and fence, for one in-flight copy."""

    def __init__(self, dev: Any, kind: str, size: int):
        vk = _lib.vk
        self.buf = dev.alloc(size, kind)
        self.cmd = call(vk.vkAllocateCommandBuffers, dev._dev, vk.VkCommandBufferAllocateInfo(
            commandPool=dev._pools[dev.transfer_family], level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY,
            commandBufferCount=1), context="allocating a transfer command buffer")[0]
        self.fence = call(vk.vkCreateFence, dev._dev, vk.VkFenceCreateInfo(), None, context="creating a fence")
        track("fence")
        self.busy = False
        # numpy view of the mapping: numpy copies release the GIL, so threads fill slots in parallel
        self.host = np.frombuffer(_lib.ffi.buffer(self.buf.block.ptr + self.buf.offset, size), dtype=np.uint8)


class MemoryMixin:
    """Memory half of `Device` (kept apart to keep files small)."""

    STAGING_SLOT_BYTES = 16 << 20  # two upload slots + one readback slot, created on first use

    def _init_memory(self) -> None:
        vk = _lib.vk
        self._sharing_families = sorted({self.compute_family, self.transfer_family})
        probe = call(vk.vkCreateBuffer, self._dev, self._buffer_info(4096), None, context="probing buffer requirements")
        req = vk.vkGetBufferMemoryRequirements(self._dev, probe)
        self._buffer_type_bits = int(req.memoryTypeBits)
        self.buffer_alignment = max(int(req.alignment), self.info.min_storage_buffer_offset_alignment, 16)
        vk.vkDestroyBuffer(self._dev, probe, None)
        self._slots: dict[tuple[str, int], list[_Slot]] = {}
        self._slots_lock = threading.Lock()
        self.memory_type = {k: self._pick_type(k) for k in KINDS}
        self.direct_copies = True   # memmove into host-visible memory; False forces staging (tests)

    def _buffer_info(self, size: int) -> Any:
        vk = _lib.vk
        usage = (vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT
                 | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        if len(getattr(self, "_sharing_families", ())) > 1:  # no queue-ownership transfers needed
            return vk.VkBufferCreateInfo(size=size, usage=usage, sharingMode=vk.VK_SHARING_MODE_CONCURRENT,
                                         pQueueFamilyIndices=self._sharing_families)
        return vk.VkBufferCreateInfo(size=size, usage=usage, sharingMode=vk.VK_SHARING_MODE_EXCLUSIVE)

    def _pick_type(self, kind: str) -> int:
        info = self.info
        main = info.main_heap.index
        types = [t for t in info.memory_types if (self._buffer_type_bits >> t.index) & 1]
        if kind == "device":
            cands = [t for t in types if t.device_local] or types
            if info.unified_memory:  # weights can then be written in place, no staging copy
                key = lambda t: (t.heap != main, not (t.host_visible and t.host_coherent), t.index)
            else:
                key = lambda t: (t.heap != main, t.host_visible, t.index)
        else:
            cands = [t for t in types if t.host_visible and t.host_coherent]
            if kind == "upload":
                key = lambda t: (t.device_local, t.index)
            else:  # readback: cached system memory reads fast
                key = lambda t: (not t.host_cached, t.device_local, t.index)
        if not cands:
            raise VulkanError(f"{info.name}: no memory type for {kind} buffers")
        return min(cands, key=key).index

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

    def arena(self, size: int, kind: str = "device") -> Arena:
        return Arena(self, size, kind)

    # ---- copies ----

    def _slot_list(self, kind: str) -> list[_Slot]:
        """This thread's staging slots: threads copy in parallel (one host thread's memmove into
        mapped memory tops out near 12 GB/s, well below a PCIe 5 link)."""
        key = (kind, threading.get_ident())
        with self._slots_lock:
            if key not in self._slots:
                n = 2 if kind == "upload" else 1
                self._slots[key] = [_Slot(self, kind, self.STAGING_SLOT_BYTES) for _ in range(n)]
            return self._slots[key]

    def _wait_slot(self, s: _Slot) -> None:
        if s.busy:
            vk = _lib.vk
            call(vk.vkWaitForFences, self._dev, 1, [s.fence], vk.VK_TRUE, _lib.UINT64_MAX, context="staging copy")
            call(vk.vkResetFences, self._dev, 1, [s.fence])
            s.busy = False

    def _copy_async(self, s: _Slot, src: Any, src_off: int, dst: Any, dst_off: int, n: int) -> None:
        with self._slots_lock:  # the slots' command buffers share one pool: record one at a time
            self._record_copy(s, src, src_off, dst, dst_off, n)

    def _record_copy(self, s: _Slot, src: Any, src_off: int, dst: Any, dst_off: int, n: int) -> None:
        vk = _lib.vk
        call(vk.vkBeginCommandBuffer, s.cmd, vk.VkCommandBufferBeginInfo(
            flags=vk.VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT))
        vk.vkCmdCopyBuffer(s.cmd, src, dst, 1, [vk.VkBufferCopy(srcOffset=src_off, dstOffset=dst_off, size=n)])
        call(vk.vkEndCommandBuffer, s.cmd)
        with self._transfer_lock:
            call(vk.vkQueueSubmit, self.transfer_queue, 1, [vk.VkSubmitInfo(pCommandBuffers=[s.cmd])], s.fence,
                 context="submitting a staging copy")
        s.busy = True

    def _check_range(self, buf: Buffer, offset: int, n: int) -> None:
        if buf._buf is None:
            raise VulkanError("buffer was destroyed")
        if offset < 0 or n < 0 or offset + n > buf.size:
            raise VulkanError(f"copy of {n} bytes at offset {offset} outside buffer of {buf.size} bytes")

    def upload(self, buf: Buffer, data: Any, offset: int = 0) -> None:
        """Copy bytes-like `data` (bytes, memoryview, numpy array) into `buf` at byte `offset`."""
        ffi = _lib.ffi
        src = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
        n = len(src)
        self._check_range(buf, offset, n)
        if n == 0:
            return
        if buf.host_visible and self.direct_copies:
            ffi.memmove(buf.block.ptr + buf.offset + offset, src, n)
            return
        if True:  # slots are per thread: no lock needed
            slots = self._slot_list("upload")
            step = self.STAGING_SLOT_BYTES
            for i, pos in enumerate(range(0, n, step)):
                s = slots[i % len(slots)]
                self._wait_slot(s)
                m = min(step, n - pos)
                s.host[:m] = np.frombuffer(src[pos:pos + m], dtype=np.uint8)
                self._copy_async(s, s.buf._buf, 0, buf._buf, offset + pos, m)
            for s in slots:
                self._wait_slot(s)

    def download(self, buf: Buffer, nbytes: int | None = None, offset: int = 0) -> bytes:
        """Return `nbytes` (default: to the end) of `buf` from byte `offset`; GPU writes must be finished."""
        ffi = _lib.ffi
        n = buf.size - offset if nbytes is None else nbytes
        self._check_range(buf, offset, n)
        if buf.host_visible and self.direct_copies and (buf.block.host_cached or self.info.type != "discrete"):
            return ffi.buffer(buf.block.ptr + buf.offset + offset, n)[:]
        out = bytearray(n)
        if True:
            (s,) = self._slot_list("readback")
            step = self.STAGING_SLOT_BYTES
            for pos in range(0, n, step):
                m = min(step, n - pos)
                self._copy_async(s, buf._buf, offset + pos, s.buf._buf, 0, m)
                self._wait_slot(s)
                out[pos:pos + m] = ffi.buffer(s.buf.block.ptr + s.buf.offset, m)
        return bytes(out)

    def _close_memory(self) -> None:
        vk = _lib.vk
        for slots in getattr(self, "_slots", {}).values():
            for s in slots:
                vk.vkDestroyFence(self._dev, s.fence, None)
                track("fence", -1)
                s.buf.destroy()
        self._slots = {}
