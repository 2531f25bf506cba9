"""The `Recorder`: many dispatches in ONE command buffer, submitted again and again.

The speed rule (docs/VULKAN.md §5-6): a token must cost a handful of queue submissions, not one Python
call per kernel. A `Recorder` records dispatches (with a barrier inserted only where a dispatch
touches bytes an earlier one wrote or read) into one command buffer; `submit()` can then be called
again and again without re-recording. Values that change per token (positions, token ids) live in
small host-visible buffers that the host rewrites before each submit.

The per-dispatch path uses raw cffi calls with prebuilt structs: the `vulkan` wrappers cost 3-4x more.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Any

from . import _lib
from ._lib import TIMEOUT, call, check, track
from .errors import VulkanError
from .kernels import BufferSlice, Kernel, as_slice
from .memory import Buffer


class Recycler:
    """Fences, command buffers and descriptor pools of destroyed recorders, kept for the next ones.

    A streamed pass records each step anew (its packs land at new addresses): on the H100 host,
    creating and destroying the fence, command buffer and descriptor pool of every step took ~45 %
    of the executor's time (py-spy, 8B at --vram-gb 4), vkCreateFence alone 21 %. Reset and reuse
    cost a raw call each."""

    def __init__(self, dev: Any):
        self.device = dev
        self.fences: list[Any] = []
        self.cmds: list[Any] = []
        self.dpools: list[Any] = []
        self.lock = threading.Lock()

    def fence(self) -> Any:
        with self.lock:
            if self.fences:
                return self.fences.pop()
        vk = _lib.vk
        f = call(vk.vkCreateFence, self.device._dev, vk.VkFenceCreateInfo(), None, context="creating a fence")
        track("fence")
        return f

    def command_buffer(self) -> Any:
        with self.lock:
            if self.cmds:
                return self.cmds.pop()   # reset by the next vkBeginCommandBuffer (pool: RESET_COMMAND_BUFFER)
        vk, dev = _lib.vk, self.device
        cmd = call(vk.vkAllocateCommandBuffers, dev._dev, vk.VkCommandBufferAllocateInfo(
            commandPool=dev._pools[dev.compute_family], level=vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY,
            commandBufferCount=1), context="allocating a command buffer")[0]
        track("command_buffer")
        return cmd

    def descriptor_pool(self, sets: int, per_set: int) -> Any:
        with self.lock:
            if self.dpools:
                return self.dpools.pop()
        vk = _lib.vk
        size = vk.VkDescriptorPoolSize(type=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, descriptorCount=sets * per_set)
        pool = call(vk.vkCreateDescriptorPool, self.device._dev, vk.VkDescriptorPoolCreateInfo(
            maxSets=sets, pPoolSizes=[size]), None, context="creating a descriptor pool")
        track("descriptor_pool")
        return pool

    def give(self, fence: Any = None, cmd: Any = None, dpools: Sequence[Any] = ()) -> None:
        """Take back objects whose work has finished; `fence` unsignaled (Recorder.wait resets it)."""
        lib, d = _lib.lib, self.device._dev
        for p in dpools:
            check(lib.vkResetDescriptorPool(d, p, 0), "vkResetDescriptorPool", "recycling")
        with self.lock:
            if fence is not None:
                self.fences.append(fence)
            if cmd is not None:
                self.cmds.append(cmd)
            self.dpools.extend(dpools)

    def destroy(self) -> None:
        """Destroy what is kept (command buffers go with their command pool)."""
        vk, d = _lib.vk, self.device._dev
        with self.lock:
            fences, dpools, cmds = self.fences, self.dpools, self.cmds
            self.fences, self.cmds, self.dpools = [], [], []
        for c in cmds:
            vk.vkFreeCommandBuffers(d, self.device._pools[self.device.compute_family], 1, [c])
            track("command_buffer", -1)
        for f in fences:
            vk.vkDestroyFence(d, f, None)
            track("fence", -1)
        for p in dpools:
            vk.vkDestroyDescriptorPool(d, p, None)
            track("descriptor_pool", -1)


def recycler(dev: Any) -> Recycler:
    r = getattr(dev, "_recycler", None)
    if r is None:
        r = dev._recycler = Recycler(dev)
    return r


class _DescriptorPools:
    """Descriptor pools that grow by one pool of SETS sets at a time (all storage buffers)."""

    SETS, PER_SET = 128, 24   # moe_matvec.comp: an array of 16 tier blocks and 3 more buffers

    def __init__(self, dev: Any):
        self.device, self.pools, self.left = dev, [], 0

    def allocate(self, kernel: Kernel) -> Any:
        vk, ffi, lib = _lib.vk, _lib.ffi, _lib.lib
        if self.left == 0:
            self.pools.append(recycler(self.device).descriptor_pool(self.SETS, self.PER_SET))
            self.left = self.SETS
        if kernel.n_bindings > self.PER_SET:
            raise VulkanError(f"{kernel.name}: {kernel.n_bindings} bindings > {self.PER_SET}")
        info = ffi.new("VkDescriptorSetAllocateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, "descriptorPool": self.pools[-1],
            "descriptorSetCount": 1, "pSetLayouts": kernel._dsl_arr})
        out = ffi.new("VkDescriptorSet[1]")
        check(lib.vkAllocateDescriptorSets(self.device._dev, info, out), "vkAllocateDescriptorSets", kernel.name)
        self.left -= 1
        return out

    def destroy(self) -> None:
        """Hand the pools back for reuse (reset: their sets are freed)."""
        if self.pools:
            recycler(self.device).give(dpools=self.pools)
        self.pools, self.left = [], 0


class _Ranges:
    """Byte ranges per memory object, merged into sorted disjoint intervals: whether a range overlaps any of
    them is two bisects. (A list checked pair by pair grew quadratic: a streamed step of 32 sequences records
    ~1,000 dispatches, most of them without barriers between them.)"""

    __slots__ = ("_by_mem",)

    def __init__(self) -> None:
        self._by_mem: dict[Any, tuple[list[int], list[int]]] = {}   # memory -> (starts, ends), sorted

    def clear(self) -> None:
        self._by_mem.clear()

    def overlaps(self, mem: Any, start: int, end: int) -> bool:
        iv = self._by_mem.get(mem)
        if iv is None:
            return False
        starts, ends = iv
        i = bisect_right(ends, start)             # the first interval ending after `start`
        return i < len(starts) and starts[i] < end

    def add(self, mem: Any, start: int, end: int) -> None:
        iv = self._by_mem.get(mem)
        if iv is None:
            self._by_mem[mem] = ([start], [end])
            return
        starts, ends = iv
        i, j = bisect_left(ends, start), bisect_right(starts, end)   # the intervals it touches: i .. j-1
        if i < j:
            start, end = min(start, starts[i]), max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]


class Recorder:
    """Records dispatches into one command buffer; `submit()` runs it, again and again.

    Example:
        rec = Recorder(dev)
        rec.dispatch(k, [w, x, y], groups=(rows, 1, 1), push=struct.pack("<3I", ...))
        rec.finish()
        for _ in range(n): rec.submit(); rec.wait()      # or rec.run()
    """

    # Set by profilers (tools/profile_gpu.py): every new Recorder then also writes a timestamp after
    # each command, read back per command by `command_times()`.
    profile_all = False
    PROFILE_SLOTS = 4096

    def __init__(self, dev: Any, label: str = "", timestamps: bool = False):
        vk, ffi = _lib.vk, _lib.ffi
        self.device, self.label = dev, label
        self._cmd = None
        self._fence = None
        self._query_pool = None
        self._profile = self.profile_all
        self._labels: list[str] = []     # what each profiled command was (kernel name and grid)
        if timestamps or self._profile:  # GPU time of the whole command buffer, read by gpu_time_s() after a run
            n = 2 + (self.PROFILE_SLOTS if self._profile else 0)
            self._query_pool = call(vk.vkCreateQueryPool, dev._dev, vk.VkQueryPoolCreateInfo(
                queryType=vk.VK_QUERY_TYPE_TIMESTAMP, queryCount=n), None, context="creating a query pool")
            self._n_queries = n
            track("query_pool")
        self._pools = _DescriptorPools(dev)
        self._cmd = recycler(dev).command_buffer()
        self._fence = recycler(dev).fence()
        self._fence_arr = ffi.new("VkFence[1]", [self._fence])
        self._cmd_arr = ffi.new("VkCommandBuffer[1]", [self._cmd])
        self._submit_info = ffi.new("VkSubmitInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_SUBMIT_INFO, "commandBufferCount": 1, "pCommandBuffers": self._cmd_arr})
        all_access = (vk.VK_ACCESS_SHADER_READ_BIT | vk.VK_ACCESS_SHADER_WRITE_BIT | vk.VK_ACCESS_TRANSFER_READ_BIT
                      | vk.VK_ACCESS_TRANSFER_WRITE_BIT)
        self._stages = vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | vk.VK_PIPELINE_STAGE_TRANSFER_BIT
        self._barrier = ffi.new("VkMemoryBarrier*", {
            "sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER, "srcAccessMask": all_access, "dstAccessMask": all_access})
        # Leading barrier: earlier submissions' device writes and host writes (positions, ids) become visible.
        self._head_barrier = ffi.new("VkMemoryBarrier*", {
            "sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER,
            "srcAccessMask": all_access | vk.VK_ACCESS_HOST_WRITE_BIT | vk.VK_ACCESS_MEMORY_WRITE_BIT,
            "dstAccessMask": all_access})
        self._keep: list[Any] = []              # cdata the command buffer refers to
        self._buffers: dict[int, Buffer] = {}   # buffers used, checked alive before each submit
        self._reads = _Ranges()                 # what the commands since the last barrier read, and wrote
        self._writes = _Ranges()
        self._last_pipeline = None
        self.n_dispatches = self.n_barriers = 0
        self.state = "recording"
        self._pending = False
        self._pending_on: Recorder | None = None   # set by submit_all: the batch's fence owner
        self._begin()
        dev._objects[id(self)] = self

    def _begin(self) -> None:
        vk, ffi, lib = _lib.vk, _lib.ffi, _lib.lib
        info = ffi.new("VkCommandBufferBeginInfo*", {"sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO})
        check(lib.vkBeginCommandBuffer(self._cmd, info), "vkBeginCommandBuffer", self.label)
        if self._query_pool is not None:
            lib.vkCmdResetQueryPool(self._cmd, self._query_pool, 0, self._n_queries)
        lib.vkCmdPipelineBarrier(self._cmd, vk.VK_PIPELINE_STAGE_ALL_COMMANDS_BIT | vk.VK_PIPELINE_STAGE_HOST_BIT,
                                 self._stages, 0, 1, self._head_barrier, 0, ffi.NULL, 0, ffi.NULL)
        if self._query_pool is not None:
            lib.vkCmdWriteTimestamp(self._cmd, vk.VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, self._query_pool, 0)

    # ---- recording ----

    def _need(self) -> None:
        if self.state != "recording":
            raise VulkanError(f"recorder {self.label!r} is {self.state}; call reset() to record again")

    def barrier(self) -> None:
        """Full compute/transfer memory barrier (inserted automatically where needed)."""
        self._need()
        ffi = _lib.ffi
        _lib.lib.vkCmdPipelineBarrier(self._cmd, self._stages, self._stages, 0, 1, self._barrier,
                                      0, ffi.NULL, 0, ffi.NULL)
        self._reads.clear()
        self._writes.clear()
        self.n_barriers += 1

    def _hazard(self, reads: list[tuple[Any, int, int]], writes: list[tuple[Any, int, int]]) -> None:
        w, r = self._writes, self._reads
        if any(w.overlaps(*x) for x in reads) or any(w.overlaps(*x) or r.overlaps(*x) for x in writes):
            self.barrier()
        for x in reads:
            r.add(*x)
        for x in writes:
            w.add(*x)

    def _resolve(self, b: Buffer | BufferSlice, what: str) -> BufferSlice:
        s = as_slice(b)
        buf = s.buffer
        if buf._buf is None:
            raise VulkanError(f"{what}: buffer was destroyed")
        if s.offset < 0 or s.size <= 0 or s.offset + s.size > buf.size:
            raise VulkanError(f"{what}: slice [{s.offset}, {s.offset + s.size}) outside buffer of {buf.size} bytes")
        self._buffers[id(buf)] = buf
        return s

    def dispatch(self, kernel: Kernel, bindings: Sequence[Buffer | BufferSlice],
                 groups: tuple[int, int, int], push: bytes = b"",
                 touched: dict[int, tuple[int, int]] | None = None) -> None:
        """Record `kernel` over `bindings` (binding i = bindings[i]) with `groups` workgroups.

        `touched` narrows what binding i reads or writes to bytes [start, end) of its slice, for
        the barrier placement: row-parts of one weight writing disjoint rows of one output then
        run without barriers between them."""
        self._need()
        vk, ffi, lib = _lib.vk, _lib.ffi, _lib.lib
        if len(bindings) != kernel.n_bindings:
            raise VulkanError(f"{kernel.name}: {len(bindings)} bindings given, {kernel.n_bindings} expected")
        if len(push) != kernel.push_size:
            raise VulkanError(f"{kernel.name}: {len(push)} bytes of push constants, {kernel.push_size} expected")
        gx, gy, gz = groups
        lim = self.device.info.max_workgroup_count
        if min(groups) <= 0:
            return  # nothing to do (e.g. zero rows)
        if gx > lim[0] or gy > lim[1] or gz > lim[2]:
            raise VulkanError(f"{kernel.name}: groups {groups} exceed device limit {lim}")
        align = self.device.info.min_storage_buffer_offset_alignment
        maxr = self.device.info.max_storage_buffer_range
        infos = ffi.new("VkDescriptorBufferInfo[]", kernel.n_bindings)
        reads, writes = [], []
        for i, b in enumerate(bindings):
            s = self._resolve(b, f"{kernel.name} binding {i}")
            if s.offset % align:
                raise VulkanError(f"{kernel.name} binding {i}: offset {s.offset} not a multiple of {align}")
            if s.size > maxr:
                raise VulkanError(f"{kernel.name} binding {i}: {s.size} bytes > maxStorageBufferRange {maxr}")
            infos[i].buffer = s.buffer._buf
            infos[i].offset = s.offset
            infos[i].range = s.size
            lo, hi = touched[i] if touched and i in touched else (0, s.size)
            base = s.buffer.offset + s.offset
            rng = (s.buffer.block._mem, base + lo, base + hi)
            (writes if i in kernel.writes else reads).append(rng)
        self._hazard(reads, writes)
        ds = self._pools.allocate(kernel)
        write = ffi.new("VkWriteDescriptorSet*", {
            "sType": vk.VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, "dstSet": ds[0], "dstBinding": 0,
            "descriptorCount": kernel.n_bindings, "descriptorType": vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
            "pBufferInfo": infos})
        lib.vkUpdateDescriptorSets(self.device._dev, 1, write, 0, ffi.NULL)
        cmd = self._cmd
        if self._last_pipeline is not kernel._pipeline:
            lib.vkCmdBindPipeline(cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, kernel._pipeline)
            self._last_pipeline = kernel._pipeline
        lib.vkCmdBindDescriptorSets(cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, kernel._layout, 0, 1, ds, 0, ffi.NULL)
        if push:
            lib.vkCmdPushConstants(cmd, kernel._layout, vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(push), push)
        lib.vkCmdDispatch(cmd, gx, gy, gz)
        self._keep.append(kernel)  # the command buffer refers to its pipeline
        self.n_dispatches += 1
        self._mark(f"{kernel.name}{groups}")

    def _mark(self, label: str) -> None:
        """Profiling: a timestamp once the command just recorded (and all before it) finished."""
        if self._profile and len(self._labels) < self.PROFILE_SLOTS:
            _lib.lib.vkCmdWriteTimestamp(self._cmd, _lib.vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT,
                                         self._query_pool, 2 + len(self._labels))
            self._labels.append(label)

    def host_barrier(self) -> None:
        """Make everything recorded so far visible to host reads once the fence signals."""
        self._need()
        vk, ffi = _lib.vk, _lib.ffi
        b = ffi.new("VkMemoryBarrier*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                                         "srcAccessMask": vk.VK_ACCESS_SHADER_WRITE_BIT | vk.VK_ACCESS_TRANSFER_WRITE_BIT,
                                         "dstAccessMask": vk.VK_ACCESS_HOST_READ_BIT})
        _lib.lib.vkCmdPipelineBarrier(self._cmd, self._stages, vk.VK_PIPELINE_STAGE_HOST_BIT, 0, 1, b,
                                      0, ffi.NULL, 0, ffi.NULL)
        self.n_barriers += 1

    def copy(self, src: Buffer | BufferSlice, dst: Buffer | BufferSlice, size: int | None = None) -> None:
        """Record a buffer-to-buffer copy of `size` bytes (default: all of src) between slices."""
        self._need()
        s, d = self._resolve(src, "copy source"), self._resolve(dst, "copy destination")
        n = s.size if size is None else size
        if n > s.size or n > d.size:
            raise VulkanError(f"copy of {n} bytes larger than source ({s.size}) or destination ({d.size})")
        so, do = s.buffer.offset + s.offset, d.buffer.offset + d.offset
        self._hazard([(s.buffer.block._mem, so, so + n)], [(d.buffer.block._mem, do, do + n)])
        region = _lib.ffi.new("VkBufferCopy*", {"srcOffset": s.offset, "dstOffset": d.offset, "size": n})
        _lib.lib.vkCmdCopyBuffer(self._cmd, s.buffer._buf, d.buffer._buf, 1, region)
        self.n_dispatches += 1
        self._mark(f"copy({n})")

    def fill(self, dst: Buffer | BufferSlice, value: int = 0) -> None:
        """Record filling a slice with a repeated uint32 `value` (size must be a multiple of 4)."""
        self._need()
        d = self._resolve(dst, "fill")
        if d.size % 4 or d.offset % 4:
            raise VulkanError(f"fill: offset {d.offset} and size {d.size} must be multiples of 4")
        do = d.buffer.offset + d.offset
        self._hazard([], [(d.buffer.block._mem, do, do + d.size)])
        _lib.lib.vkCmdFillBuffer(self._cmd, d.buffer._buf, d.offset, d.size, value & 0xFFFFFFFF)
        self.n_dispatches += 1
        self._mark(f"fill({d.size})")

    @property
    def kernels(self) -> list[Any]:
        """The kernels this recording dispatches, in order (for tests and profiles)."""
        return [k for k in self._keep if isinstance(k, Kernel)]

    def finish(self) -> Recorder:
        """End recording; the command buffer can now be submitted any number of times."""
        self._need()
        if self._query_pool is not None:
            _lib.lib.vkCmdWriteTimestamp(self._cmd, _lib.vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT,
                                         self._query_pool, 1)
        check(_lib.lib.vkEndCommandBuffer(self._cmd), "vkEndCommandBuffer", self.label)
        self.state = "ready"
        return self

    def reset(self) -> None:
        """Discard the recording (waits for a pending run) and start recording again."""
        self.wait()
        check(_lib.lib.vkResetCommandBuffer(self._cmd, 0), "vkResetCommandBuffer", self.label)
        self._pools.destroy()
        self._keep.clear()
        self._buffers.clear()
        self._reads.clear()
        self._writes.clear()
        self._last_pipeline = None
        self.n_dispatches = self.n_barriers = 0
        self._labels = []
        self.state = "recording"
        self._begin()

    # ---- running ----

    def _check_live(self) -> None:
        if self.state == "recording":
            self.finish()
        if self.state != "ready":
            raise VulkanError(f"recorder {self.label!r} is {self.state}")
        for b in self._buffers.values():
            if b._buf is None:
                raise VulkanError(f"recorder {self.label!r} uses a destroyed buffer ({b.size} bytes); re-record it")

    def submit(self, wait: bool = False) -> None:
        """Queue the recorded commands (finishing the recording if needed); `wait` blocks until done."""
        self._check_live()
        self.wait()
        with self.device._compute_lock:
            check(_lib.lib.vkQueueSubmit(self.device.compute_queue, 1, self._submit_info, self._fence),
                  "vkQueueSubmit", self.label)
        self._pending = True
        if wait:
            self.wait()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the last submit; False on timeout (the run is still pending)."""
        if self._pending_on is not None:
            if not self._pending_on.wait(timeout_s):
                return False
            self._pending_on = None
        if not self._pending:
            return True
        lib = _lib.lib
        ns = _lib.UINT64_MAX if timeout_s is None else int(timeout_s * 1e9)
        r = check(lib.vkWaitForFences(self.device._dev, 1, self._fence_arr, 1, ns), "vkWaitForFences", self.label)
        if r is TIMEOUT:
            return False
        check(lib.vkResetFences(self.device._dev, 1, self._fence_arr), "vkResetFences", self.label)
        self._pending = False
        return True

    def gpu_time_s(self) -> float:
        """Seconds between the first and last command of the last finished run (timestamps=True)."""
        if self._query_pool is None:
            raise VulkanError("recorder was made without timestamps=True")
        self.wait()
        vk, ffi, lib = _lib.vk, _lib.ffi, _lib.lib
        out = ffi.new("uint64_t[2]")
        check(lib.vkGetQueryPoolResults(self.device._dev, self._query_pool, 0, 2, 16, out, 8,
                                        vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT),
              "vkGetQueryPoolResults", self.label)
        return (int(out[1]) - int(out[0])) * self.device.info.timestamp_period_ns * 1e-9

    def command_times(self) -> tuple[float, list[tuple[str, float]]]:
        """Profiled recorders: (start timestamp in s, [(label, seconds since the previous command
        ended)]) of the last finished run; the first command counts from the start of the buffer."""
        if not self._profile:
            raise VulkanError("recorder was made without Recorder.profile_all")
        self.wait()
        vk, ffi, lib = _lib.vk, _lib.ffi, _lib.lib
        n = 2 + len(self._labels)
        out = ffi.new(f"uint64_t[{n}]")
        check(lib.vkGetQueryPoolResults(self.device._dev, self._query_pool, 0, n, 8 * n, out, 8,
                                        vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT),
              "vkGetQueryPoolResults", self.label)
        period = self.device.info.timestamp_period_ns * 1e-9
        ts = [int(out[0])] + [int(out[i]) for i in range(2, n)]
        return ts[0] * period, [(lab, (ts[i + 1] - ts[i]) * period) for i, lab in enumerate(self._labels)]

    def run(self) -> None:
        """submit() and wait()."""
        self.submit(wait=True)

    def destroy(self) -> None:
        if self._fence is None and self._cmd is None:
            return
        vk, dev = _lib.vk, self.device
        self.wait()
        self._pools.destroy()
        recycler(dev).give(self._fence, self._cmd)   # the work is done: both are reused
        self._cmd = self._fence = None
        if self._query_pool is not None:
            vk.vkDestroyQueryPool(dev._dev, self._query_pool, None)
            track("query_pool", -1)
            self._query_pool = None
        self.state = "destroyed"
        self._keep.clear()
        self._buffers.clear()
        dev._objects.pop(id(self), None)


def submit_all(recorders: Sequence[Recorder], wait: bool = True) -> None:
    """Submit several recorders' command buffers in ONE vkQueueSubmit, in order.

    They share the last recorder's fence; waiting on any of them waits for the whole batch.
    """
    if not recorders:
        return
    vk, ffi, lib = _lib.vk, _lib.ffi, _lib.lib
    for r in recorders:
        r._check_live()
        r.wait()
    dev, last = recorders[0].device, recorders[-1]
    cmds = ffi.new("VkCommandBuffer[]", [r._cmd for r in recorders])
    info = ffi.new("VkSubmitInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SUBMIT_INFO,
                                     "commandBufferCount": len(recorders), "pCommandBuffers": cmds})
    with dev._compute_lock:
        check(lib.vkQueueSubmit(dev.compute_queue, 1, info, last._fence), "vkQueueSubmit", "submit_all")
    last._pending = True
    for r in recorders[:-1]:
        r._pending_on = last
    if wait:
        last.wait()
