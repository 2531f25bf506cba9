"""The Vulkan backend: runtime/backend.py's contract on a Vulkan device, wired from parts with one job each.

    uploads.py   packs into the tier's device memory (pinned host cache, file, decoded bytes)
    layout.py    a pass's ids, positions, activations, attention partials and readback
    replay.py    steps recorded once and replayed; a stable pass as ONE command buffer
    inflight.py  steps submitted without waiting, their packs pinned until their fence signals
    streamed.py  steps too big to pin at once, in chunks
    moe.py       steps holding moe ops: the router's logits read back mid-pass, the chosen experts applied
    graph_ops.py the graph's ops as dispatches (fusion.py folds some into their neighbours)
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ...pack_format.constants import align_up
from ...pack_format.errors import VkpackError
from ..backend import PassInputs, Placement, copy_spans
from .device import Device
from .errors import UnsupportedWeightType, VulkanError
from .graph_ops import GraphOps, Payload, moe_scratch_widths
from .inflight import InFlight
from .kernels import BufferSlice, Kernel
from .layout import READBACK_ROWS, ActivationLayout, KvCache, PassState
from .ops import Ops, unreadable_types, unsupported_message
from .recorder import Recorder
from .replay import FastPass, PassRunner
from .uploads import DeviceBacking, PackUploads

if TYPE_CHECKING:
    from ...pack_format.reader import Archive
    from ..graph import WeightAccess
    from ..prefetch import PackSource
    from ..tiers import DeviceTier

log = logging.getLogger(__name__)
ALIGN = 256
KV_GRANULE = 256  # resident sessions' KV rows are a multiple of this (kv_rows)


class VulkanBackend:
    """Packs as stored on the device, read in place by the kernels; passes recorded and replayed."""

    name = "vulkan"
    max_block: int  # set from the device's limits
    # loading threads: each copies its own pack (measured on a 16-core H200 host: 12 loaded a
    # 4 GiB-budget 8B stream faster than 8 or 4)
    load_workers = max(2, min(16, (os.cpu_count() or 2) * 3 // 4))

    def __init__(self, archive: Archive, device_index: int | None = None, workgroup_size: int | None = None,
                 subgroups: bool = True, fp32: bool = False):
        missing = unreadable_types(archive.tensors.values())
        if missing:   # before a device opens: a clear error now, not a failed pack load later
            raise UnsupportedWeightType(unsupported_message(missing))
        self.archive = archive
        self.dev: Device | None = Device(device_index)
        self.ops = Ops(self.dev)
        try:
            self.ops.configure(workgroup_size, subgroups, fp32)
        except VulkanError as e:  # a setting this device cannot take: the user's error, not the device's
            self.dev.close()
            raise VkpackError(str(e)) from None
        info = self.dev.info
        self.max_block = min(1 << 30, info.max_memory_allocation_size, info.main_heap.size // 2) // ALIGN * ALIGN
        self.steps = archive.graph["steps"]
        if any(op["op"] == "moe" for s in self.steps for op in s["ops"]):
            # the batched and grouped experts bind every tier block whole (vk/moe.py): no block beyond one
            # binding's range (lavapipe's is 128 MiB; NVIDIA's 4 GiB leaves the 1 GiB blocks as they are)
            self.max_block = min(self.max_block, info.max_storage_buffer_range // ALIGN * ALIGN)
        self.uploads = PackUploads(self.dev, archive)
        # moe ops (vk/moe.py): their rows besides the graph's activations, laid out with them
        self.layout = ActivationLayout(self.dev, self.ops, archive.graph,
                                       {**archive.activation_widths, **moe_scratch_widths(self.steps, archive.tensors)})
        self._ff: dict[tuple, Any] = {}   # rope frequency factors, f32 on the device
        self._upload_freq_factors()
        self.graph_ops = GraphOps(self.ops, archive.tensors, self._freq_factors)
        self.inflight = InFlight(self.pack_bytes)
        self.runner = PassRunner(self.dev, self.graph_ops, self.inflight, self.pack_bytes, self.steps)
        self.tier: DeviceTier | None = None
        self.backing: DeviceBacking | None = None
        self.resident = False
        log.info("vulkan backend on %s (%s)", info.name, info.type)

    # ---- memory ----
    @property
    def reserved_bytes(self) -> int:
        """Device memory outside the tier, counted against the budget: the io and readback buffers and
        staging slots, each only where it lives in device-local memory (system-memory staging is not
        VRAM), the rope frequency factors, the split-K attention's counters and the moe ops' route and
        router readback buffers."""
        return (self.dev.staging_vram_bytes() + self.ops.split_counter_bytes + self.layout.device_bytes
                + sum(b.size for b in self._ff.values() if b.block.device_local) + self.runner.moe.device_bytes)

    def make_backing(self, block_sizes: list[int]) -> DeviceBacking:
        self.backing = DeviceBacking(self.dev, block_sizes)
        return self.backing

    def pack_bytes(self, pack: int) -> int:
        return self.uploads.pack_bytes(pack)

    def activation_bytes(self, tokens: int, n_ctx: int) -> int:
        """One pass's activation buffers and split-K attention partials (one sequence)."""
        return self.layout.scratch_bytes(tokens, 1, (self.layout.attention_partials(tokens, n_ctx),))

    def session_activation_bytes(self, tokens: int, n_ctx: int) -> int:
        return 0  # the pass's activation room is the backend's own (ActivationLayout)

    def kv_rows(self, n_ctx: int) -> int:
        """Resident: rounded up to KV_GRANULE rows, so that a session lands where an earlier one of
        that size was and replays its recordings (they depend on the cache's size and place); under
        a small budget the KV bytes are worth more."""
        return align_up(n_ctx, KV_GRANULE) if self.resident else n_ctx

    def attach(self, tier: DeviceTier, placement: Placement) -> int | None:
        """Resident (the budget holds the whole model): a whole pass may stay pinned. Streamed:
        packs are kept in pinned system memory under the RAM budget, so the engine's RAM tier of
        decoded packs gets nothing, unless no pinned cache can be made (unified memory)."""
        self.tier = tier
        self.resident = self.runner.resident = placement.resident
        self.runner.tier = tier
        self.layout.attach(tier, placement.pass_tokens)
        if self.backing is not None:
            self.runner.moe.use_tier(self.backing.buffers)
        if placement.resident:
            return 0
        keeps = self.uploads.enable_host_cache(placement.ram_budget, placement.model_bytes)
        return 0 if keeps else placement.ram_budget

    def host_bytes(self) -> int:
        hc = self.uploads.host_cache
        return 0 if hc is None else hc.used

    @property
    def host_cache(self) -> Any:
        """The pinned host cache of streamed packs, or None (tests and tools read its counters)."""
        return self.uploads.host_cache

    def load(self, pack: int, source: PackSource, dest: BufferSlice) -> Payload:
        return self.uploads.load(pack, source, dest)

    def kv_view(self, mem: BufferSlice, n_ctx: int, width: int) -> KvCache:
        return KvCache(BufferSlice(mem.buffer, mem.offset, n_ctx * width * 4), n_ctx, width)

    def copy_kv(self, src: list[tuple[KvCache, KvCache]], dst: list[tuple[KvCache, KvCache]], n: int) -> None:
        self.copy_caches([(s, d) for ps, pd in zip(src, dst, strict=True) for s, d in zip(ps, pd, strict=True)], n)

    def copy_caches(self, pairs: list[tuple[KvCache, KvCache]], n: int) -> None:
        """Positions [0, n) from each pair's first cache to its second, device to device: one
        vkCmdCopyBuffer per cache (one more where a ring wraps), ONE submission, waited for. The
        passes that wrote the sources went to the same queue before; the recording's leading barrier
        makes their writes visible, and the next pass's makes the copies visible to it."""
        rec = Recorder(self.dev, "kv copy")
        try:
            for s, d in pairs:
                w = 4 * s.width
                for a, b, k in copy_spans(n, s.n_ctx, d.n_ctx):
                    rec.copy(BufferSlice(s.slice.buffer, s.slice.offset + a * w, k * w),
                             BufferSlice(d.slice.buffer, d.slice.offset + b * w, k * w))
            if rec.n_dispatches:
                rec.run()
        finally:
            rec.destroy()

    # ---- one pass ----
    def host_steps(self, tokens: int) -> frozenset[int]:
        return frozenset()  # every weight comes through the tier

    def placement(self) -> dict[str, Any]:
        return {}

    def forward(self, inputs: PassInputs, weights: WeightAccess) -> np.ndarray:
        """Lay out the pass, record or replay its steps, and read the output rows back: the copy into
        mapped host memory is part of the pass's own submission (no separate round trip)."""
        ps = self.begin(inputs, weights)
        self.run_steps(range(len(self.steps)), ps, weights)
        return self.finish(inputs, ps, weights)

    def begin(self, inputs: PassInputs, weights: WeightAccess) -> PassState:
        """Lay out a pass (the device done with the previous one: its io buffer is rewritten)."""
        self.inflight.wait_all(weights)
        return self.layout.begin(inputs)

    def run_steps(self, order: range, ps: PassState, weights: WeightAccess) -> None:
        """Steps `order` (a contiguous range) of the pass `begin` laid out, recorded or replayed;
        they may still run when this returns."""
        try:
            self.runner.run_pass(self.steps, ps, weights, order)
        except BaseException:
            self.inflight.flush(weights)
            raise

    def finish(self, inputs: PassInputs, ps: PassState, weights: WeightAccess) -> np.ndarray:
        """Read the pass's output rows back once its steps are done."""
        inflight = self.inflight
        try:
            out = []
            for r0 in range(0, ps.nseq, READBACK_ROWS):  # more sequences than that: one more round trip each
                r1 = min(ps.nseq, r0 + READBACK_ROWS)
                inflight.add(self.layout.readback_recording(ps, inputs.output, r0, r1))
                inflight.flush(weights)
                out.append(self.layout.read(ps, inputs.output, r1 - r0))
            self.runner.moe.settle(weights)   # the experts the device chose, now that the pass is done
            return out[0] if len(out) == 1 else np.concatenate(out)
        except BaseException:
            inflight.flush(weights)
            raise

    def last_replay(self) -> tuple[FastPass | None, list[Kernel]]:
        """Test hook: the replayable pass the last pass used (None: it ran step by step) and the
        kernels its whole-pass recording dispatches."""
        fast = self.runner.last_fast
        return fast, ([] if fast is None or fast.whole is None else list(fast.whole.kernels))

    # ---- counters (bench_gpu, profile_gpu) ----
    @property
    def submits(self) -> int:
        return self.inflight.submits

    @property
    def wait_seconds(self) -> float:
        return self.inflight.wait_seconds

    @property
    def host_seconds(self) -> float:
        return self.runner.host_seconds

    # ---- rope frequency factors ----
    def _freq_factors(self, ff: list[float] | None) -> Any:
        """A rope op's frequency factors on the device (uploaded at start)."""
        return self._ff[tuple(ff)] if ff else None

    def _upload_freq_factors(self) -> None:
        """Every rope op's frequency factors, f32 on the device, once: a few hundred bytes, allocated
        outside the tier and counted in `reserved_bytes`."""
        for st in self.steps:
            for op in st["ops"]:
                ff = op["attrs"].get("freq_factors") if op["op"] == "rope" else None
                if ff and tuple(ff) not in self._ff:
                    buf = self.dev.alloc(align_up(4 * len(ff), ALIGN), "device")
                    self.dev.upload(buf, np.asarray(ff, dtype=np.float32).tobytes())
                    self._ff[tuple(ff)] = buf

    def close(self) -> None:
        """Wait for the device, then free recordings, buffers, the tier's blocks and the device."""
        if self.dev is None:
            return
        self.inflight.flush(None)
        self.runner.close()
        self.inflight.wait_all()
        for b in self._ff.values():
            b.destroy()
        self.layout.close()
        self.uploads.close()
        if self.backing is not None:
            self.backing.close()
        self.dev.close()
        self.dev = None
