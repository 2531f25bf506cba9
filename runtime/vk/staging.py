"""Staged host<->device copies: a pool of mapped system-memory slots and copies split over threads.

A copy is cut into chunks; the calling thread and up to `copy_threads - 1` helpers take chunks
in turn. Each fills a slot with a copy that releases the GIL (numpy, or `os.preadv` straight
from a file), then queues a vkCmdCopyBuffer on the transfer queue and fills its next slot while
that DMA runs. One thread's memcpy runs well below a PCIe 5 link, so the threads add up.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _lib
from ._lib import call, check, track
from ...pack_format.errors import FormatError
from ...pack_format.reader import pread_into as _pread_into
from .errors import VulkanError

MIN_CHUNK = 4 << 20   # a helper thread is worth its hand-off above this many bytes
DEPTH = 3             # slots one thread keeps in flight: fill one while the others copy


def default_copy_threads() -> int:
    """Half the usable CPUs (siblings share a core's load ports), 1 to 8: eight memcpy
    threads outrun a PCIe 5 x16 link."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n // 2))


def pread_into(fd: int, out: Any, offset: int) -> None:
    """`pack_format.reader.pread_into`, a short file reported as a VulkanError of the upload."""
    try:
        _pread_into(fd, out, offset)
    except FormatError as e:
        raise VulkanError(str(e)) from None


class Transfer:
    """A command pool, command buffer and fence for copies on the transfer queue (one command pool
    each: threads record without a shared lock)."""

    def __init__(self, dev: Any):
        self.busy = False
        self.pool = self.fence = None
        try:
            self._make(dev, _lib.vk)
        except BaseException:
            Transfer.destroy(self, dev)
            raise

    def _make(self, dev: Any, vk: Any) -> None:
        ffi = _lib.ffi
        self.pool = call(vk.vkCreateCommandPool, dev._dev, vk.VkCommandPoolCreateInfo(
            flags=vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT | vk.VK_COMMAND_POOL_CREATE_TRANSIENT_BIT,
            queueFamilyIndex=dev.transfer_family), None, context="creating a staging command pool")
        track("command_pool")
        self.cmd = call(vk.vkAllocateCommandBuffers, dev._dev, vk.VkCommandBufferAllocateInfo(
            commandPool=self.pool, level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY, commandBufferCount=1),
            context="allocating a transfer command buffer")[0]
        self.fence = call(vk.vkCreateFence, dev._dev, vk.VkFenceCreateInfo(), None, context="creating a fence")
        track("fence")
        # raw-call structs built once (docs/VULKAN.md §5)
        self._fences = ffi.new("VkFence[1]", [self.fence])
        self._cmds = ffi.new("VkCommandBuffer[1]", [self.cmd])
        self._begin = ffi.new("VkCommandBufferBeginInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
            "flags": vk.VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT})
        self._submit = ffi.new("VkSubmitInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_SUBMIT_INFO, "commandBufferCount": 1, "pCommandBuffers": self._cmds})
        self._region = ffi.new("VkBufferCopy*")
        self._to_host = ffi.new("VkMemoryBarrier*", {   # device writes made visible to host reads
            "sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER, "srcAccessMask": vk.VK_ACCESS_TRANSFER_WRITE_BIT,
            "dstAccessMask": vk.VK_ACCESS_HOST_READ_BIT})

    def copy(self, dev: Any, src: Any, src_off: int, dst: Any, dst_off: int, n: int, to_host: bool = False) -> None:
        """Queue a copy of `n` bytes between two VkBuffers on the transfer queue (not waited);
        `to_host`: the host reads `dst` after the fence."""
        vk, lib = _lib.vk, _lib.lib
        check(lib.vkBeginCommandBuffer(self.cmd, self._begin), "vkBeginCommandBuffer", "staging copy")
        r = self._region
        r.srcOffset, r.dstOffset, r.size = src_off, dst_off, n
        lib.vkCmdCopyBuffer(self.cmd, src, dst, 1, r)
        if to_host:
            lib.vkCmdPipelineBarrier(self.cmd, vk.VK_PIPELINE_STAGE_TRANSFER_BIT, vk.VK_PIPELINE_STAGE_HOST_BIT, 0,
                                     1, self._to_host, 0, _lib.ffi.NULL, 0, _lib.ffi.NULL)
        check(lib.vkEndCommandBuffer(self.cmd), "vkEndCommandBuffer", "staging copy")
        with dev._transfer_lock:
            check(lib.vkQueueSubmit(dev.transfer_queue, 1, self._submit, self.fence), "vkQueueSubmit", "staging copy")
        self.busy = True

    def wait(self, dev: Any) -> None:
        if self.busy:
            lib = _lib.lib
            check(lib.vkWaitForFences(dev._dev, 1, self._fences, 1, _lib.UINT64_MAX), "vkWaitForFences", "staging copy")
            check(lib.vkResetFences(dev._dev, 1, self._fences), "vkResetFences", "staging copy")
            self.busy = False

    def destroy(self, dev: Any) -> None:
        vk = _lib.vk
        if self.fence is not None:
            vk.vkDestroyFence(dev._dev, self.fence, None)
            track("fence", -1)
            self.fence = None
        if self.pool is not None:
            vk.vkDestroyCommandPool(dev._dev, self.pool, None)   # frees the command buffer
            track("command_pool", -1)
            self.pool = None


class Slot(Transfer):
    """A mapped staging buffer with its own `Transfer`."""

    def __init__(self, dev: Any, kind: str, size: int):
        self.size = size
        self.buf = dev.alloc(size, kind)
        try:
            if self.buf.block.ptr is None:
                raise VulkanError(f"{kind} staging memory is not host-visible")
            super().__init__(dev)
        except BaseException:
            self.buf.destroy()
            raise
        # numpy view of the mapping: numpy copies and preadv into it release the GIL
        self.host = np.frombuffer(_lib.ffi.buffer(self.buf.block.ptr + self.buf.offset, size), dtype=np.uint8)

    def destroy(self, dev: Any) -> None:
        super().destroy(dev)
        self.buf.destroy()


class SlotPool:
    """Up to `max_slots` slots of one memory kind, made on first use and shared by all threads."""

    def __init__(self, dev: Any, kind: str, slot_bytes: int, max_slots: int):
        self.dev, self.kind, self.slot_bytes, self.max_slots = dev, kind, slot_bytes, max(1, max_slots)
        self.free: list[Slot] = []
        self.slots: list[Slot] = []
        self._making = 0
        self._cond = threading.Condition()

    def get(self, wait: bool = True) -> Slot | None:
        """A free slot (a new one while under `max_slots`); None if none and not `wait`."""
        with self._cond:
            while not self.free and len(self.slots) + self._making >= self.max_slots:
                if not wait:
                    return None
                self._cond.wait()
            if self.free:
                return self.free.pop()
            self._making += 1
        try:
            s = Slot(self.dev, self.kind, self.slot_bytes)
        finally:
            with self._cond:
                self._making -= 1
                self._cond.notify()
        with self._cond:
            self.slots.append(s)
        return s

    def put(self, s: Slot) -> None:
        with self._cond:
            self.free.append(s)
            self._cond.notify()

    def close(self) -> None:
        """Destroy every slot (all must be idle: the device waits for idle before this)."""
        with self._cond:
            slots, self.slots, self.free = self.slots, [], []
        for s in slots:
            s.destroy(self.dev)


class Job:
    """One copy of `n` bytes in chunks that several threads take in turn.

    `fill(out, pos, m)` writes source bytes [pos, pos+m) into the uint8 array `out`. With
    `direct` (a numpy view of mapped destination memory) chunks are filled in place; otherwise
    each goes through a slot of `pool` and a DMA into VkBuffer `dst` at `dst_off + pos`.
    """

    def __init__(self, n: int, chunk: int, fill: Callable[[np.ndarray, int, int], None],
                 direct: np.ndarray | None = None, pool: SlotPool | None = None, dst: Any = None, dst_off: int = 0):
        self.n, self.chunk, self.fill, self.direct = n, chunk, fill, direct
        self.pool, self.dst, self.dst_off = pool, dst, dst_off
        self.error: BaseException | None = None
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            if self.error is not None or self._next >= self.n:
                return None
            pos = self._next
            m = min(self.chunk, self.n - pos)
            self._next = pos + m
            return pos, m

    def fail(self, e: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = e

    def work(self, dev: Any) -> None:
        """Take and copy chunks until none is left (never raises: errors go to `self.error`)."""
        ring: list[Slot] = []
        try:
            while (piece := self.take()) is not None:
                pos, m = piece
                if self.direct is not None:
                    self.fill(self.direct[pos:pos + m], pos, m)
                    continue
                s = self._next_slot(dev, ring)
                self.fill(s.host[:m], pos, m)
                s.copy(dev, s.buf._buf, 0, self.dst, self.dst_off + pos, m)
        except BaseException as e:  # handed to the caller
            self.fail(e)
        finally:
            for s in ring:
                try:
                    s.wait(dev)
                except BaseException as e:  # a lost device
                    self.fail(e)
                self.pool.put(s)

    def _next_slot(self, dev: Any, ring: list[Slot]) -> Slot:
        """A new slot while the ring is short and the pool has one, else the oldest of the ring
        once its copy is done (never blocks on the pool while holding a slot: no deadlock)."""
        if len(ring) < DEPTH:
            s = self.pool.get(wait=not ring)
            if s is not None:
                ring.append(s)
                return s
        s = ring.pop(0)
        s.wait(dev)
        ring.append(s)
        return s


def run(dev: Any, job: Job, threads: int) -> None:
    """Run `job` on the calling thread plus `threads - 1` helpers from the device's copy pool."""
    helpers = []
    if threads > 1:
        ex = dev._copy_executor()
        helpers = [ex.submit(job.work, dev) for _ in range(threads - 1)]
    job.work(dev)
    for f in helpers:
        if not f.cancel():  # a helper that never started has nothing to finish
            f.result()
    if job.error is not None:
        raise job.error


def split(n: int, slot_bytes: int | None, copy_threads: int) -> tuple[int, int]:
    """(threads, chunk bytes) for a copy of `n` bytes: chunks of at least MIN_CHUNK per helper,
    at most one slot each, 64 KiB-aligned."""
    threads = max(1, min(copy_threads, -(-n // MIN_CHUNK)))
    chunk = -(-n // threads)
    chunk = -(-chunk // 65536) * 65536
    if slot_bytes is not None:
        chunk = min(chunk, slot_bytes)
    return threads, max(chunk, 1)
