"""The Vulkan backend: the engine's graph ops as recorded compute dispatches on device memory.

Packs are uploaded as stored (quantized blocks included) into the device tier's blocks, one big
VkBuffer per block, and the kernels read them in place. Each graph step is recorded into one
command buffer; decode steps whose packs have not moved are *replayed* from a cache, so a token
costs one queue submission per step and no per-kernel Python. Steps are submitted without
waiting; the packs they read stay pinned until their fence signals.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np

from ...pack_format.errors import VkpackError
from ...pack_format.records import TensorPart, TensorRecord
from ..alloc import Allocation
from .device import Device
from .errors import VulkanError
from .graph_ops import GraphOpsMixin, _merged_parts
from .host_cache import HostPackCache, default_budget
from .kernels import BufferSlice
from .ops import Ops, Weight
from .recorder import Recorder, submit_all

log = logging.getLogger(__name__)
ALIGN = 256
MAX_CACHED_RECORDINGS = 1024
MAX_FAST_SHAPES = 4  # replayable pass shapes kept (decode of a few session sizes, a prefill)
MAX_TOKENS_PER_PASS = 4096
READBACK_ROWS = 16  # logits rows the readback buffer holds before it must grow


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


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


class KvCache:
    """One layer's K or V cache: (n_ctx, width) f32 at a device slice."""

    def __init__(self, sl: BufferSlice, n_ctx: int, width: int):
        self.slice, self.n_ctx, self.width = sl, n_ctx, width


class _FastPass(NamedTuple):
    """A pass shape whose packs have not moved since its steps were recorded."""

    version: int                  # the tier's version then
    recs: dict[int, Recorder]     # step index -> its recording (gather steps excepted)
    whole: Recorder | None        # all of them in one command buffer, made on the next such pass
    gathers_inside: bool          # `whole` holds the embedding gathers too


class VulkanBackend(GraphOpsMixin):
    name = "vulkan"
    # packs loaded (decompressed, copied) at once; each big copy also fans out over the device's copy threads
    # loading threads: each copies its own pack (measured on a 16-core H200 host: 12 loaded a
    # 4 GiB-budget 8B stream faster than 8 or 4)
    prefetch_workers = max(2, min(16, (os.cpu_count() or 2) * 3 // 4))

    def __init__(self, archive: Any, device_index: int | None = None, workgroup_size: int | None = None,
                 subgroups: bool = True, fp32: bool = False):
        self.archive = archive
        self.dev = Device(device_index)
        self.ops = Ops(self.dev)
        try:
            self.ops.configure(workgroup_size, subgroups, fp32)
        except VulkanError as e:  # a setting this device cannot take: the user's error, not the device's
            self.dev.close()
            raise VkpackError(str(e)) from None
        info = self.dev.info
        self.max_block = min(1 << 30, info.max_memory_allocation_size, info.main_heap.size // 2) // ALIGN * ALIGN
        self.slices: dict[int, list[tuple[TensorRecord, TensorPart]]] = {}
        for t in archive.tensors.values():
            for p in t.parts:
                self.slices.setdefault(p.pack, []).append((t, p))
        self._extra = {pid: sum(_align(4 * _n(t, p)) for t, p in sl if _needs_f32(t)) for pid, sl in self.slices.items()}
        self.tier: Any = None
        self.host_cache: HostPackCache | None = None   # streamed packs in pinned memory (enable_host_cache)
        self._scratch: tuple[Allocation, BufferSlice] | None = None
        # per-pass inputs the host rewrites before each pass: token ids and positions (uint32)
        self._io = self.dev.alloc(8 * MAX_TOKENS_PER_PASS, "upload")
        self._io_u32 = np.frombuffer(self._io.view(), dtype=np.uint32)
        self._bufs_cache: dict[tuple, tuple[dict, list]] = {}
        # host-visible copy of a pass's output (logits), written by the pass's own submission
        self._readback = self.dev.alloc(4 * READBACK_ROWS * archive.hparams["vocab"], "readback")
        self._readback_recs: dict[tuple, Recorder] = {}
        self._ff: dict[int, Any] = {}          # rope frequency factors, f32 on the device
        self._cache: OrderedDict[tuple, Recorder] = OrderedDict()
        self._pending: list[tuple[Recorder, list[Any], bool]] = []   # recorded, not yet submitted
        self._inflight: list[tuple[Recorder, list[Any], bool]] = []  # submitted, packs pinned until done
        # pass shape -> its replayable pass, for the few latest stable shapes (a request's prefill
        # does not drop the decode pass of the session before it)
        self._fast: OrderedDict[Any, _FastPass] = OrderedDict()
        self.last_fast: _FastPass | None = None     # the entry the last replayed pass used (tests, tools)
        self.resident = False
        self._retired: list[Recorder] = []
        self._pass_recs: dict[int, Recorder] = {}
        self._step_bytes: dict[int, int] = {}   # pack bytes each step pins
        self.host_seconds = 0.0   # Python time recording/keying steps
        self.wait_seconds = 0.0   # time blocked on fences (the device working, or uploads pending)
        self.submits = 0
        log.info("vulkan backend on %s (%s)", info.name, info.type)

    @property
    def reserved_bytes(self) -> int:
        """Device memory outside the tier, counted against the budget: the io buffer and staging
        slots, each only where it lives in device-local memory (system-memory staging is not VRAM),
        and the split-K attention's counters."""
        return (self.dev.staging_vram_bytes() + self.ops.split_counter_bytes
                + sum(b.size for b in (self._io, self._readback) if b.block.device_local))

    @property
    def pin_limit(self) -> int:
        """Pack bytes that in-flight steps may keep pinned: a step bigger than this is streamed."""
        return self.tier.budget if self.resident else self.tier.budget // 4

    def backing_factory(self, block_sizes: list[int]) -> DeviceBacking:
        return DeviceBacking(self.dev, block_sizes)

    def attach(self, tier: Any, resident: bool, pass_tokens: int = 512) -> None:
        """`resident`: the budget holds the whole model, so a whole pass may stay pinned.

        Activation room for passes of `pass_tokens` is reserved now, before any pack: growing it
        later needs one contiguous range, which packs scattered over the blocks may only give by
        being evicted (measured: 357 MB re-uploaded in an 8B resident prefill)."""
        self.tier = tier
        self.resident = resident
        while pass_tokens > 1 and self._scratch_bytes(pass_tokens, 1) > tier.budget // 8:
            pass_tokens //= 2  # a small budget keeps its room for packs; bigger passes grow it then
        self._scratch_slice(self._scratch_bytes(pass_tokens, 1))

    # ---- packs ----
    def pack_bytes(self, pack: int) -> int:
        """Stored bytes as they are, plus f32 copies of 1-D tensors the kernels need as f32."""
        return _align(self.archive.packs[pack].raw_size) + self._extra.get(pack, 0)

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

    def convert(self, pack: int, raw: bytes | memoryview, dest: BufferSlice,
                upload: bool = True, threads: int | None = None) -> dict[tuple[str, int], Any]:
        """Upload a pack's decoded bytes to `dest` (unless already there) and describe its tensors."""
        buf, base = dest.buffer, dest.offset
        if upload and not self._cache_and_copy(pack, raw, dest):
            self.dev.upload(buf, raw, base, threads)
        out: dict[tuple[str, int], Any] = {}
        extra = _align(len(raw))
        for t, p in self.slices.get(pack, []):
            if len(t.shape) == 1:
                if _needs_f32(t):
                    from ..cpu.dequant import dequantize

                    vals = dequantize(t.dtype, memoryview(raw)[p.offset:p.offset + p.nbytes], t.shape)
                    self.dev.upload(buf, vals.astype(np.float32).tobytes(), base + extra)
                    out[(t.name, p.row_start)] = BufferSlice(buf, base + extra, 4 * t.shape[0])
                    extra += _align(4 * t.shape[0])
                else:
                    out[(t.name, p.row_start)] = BufferSlice(buf, base + p.offset, p.nbytes)
            else:
                out[(t.name, p.row_start)] = Weight(buf, base + p.offset, t.dtype, p.row_end - p.row_start, t.shape[-1])
        return out

    def convert_cached(self, pack: int, dest: BufferSlice) -> dict[tuple[str, int], Any] | None:
        """`convert` for a pack the pinned cache holds (its decoded bytes: a compressed pack is not
        read or decompressed again); None when it does not hold it."""
        hc = self.host_cache
        e = hc.lookup(pack) if hc is not None else None
        if e is None:
            return None
        hc.copy_to(pack, dest.buffer, dest.offset)
        return self.convert(pack, hc.host_view(*e), dest, upload=False)

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

    # where a verified raw pack is read from on reloads: "file" (preadv into staging) or "mmap"
    # (the archive's mapping, already faulted in by the first load)
    reload_from = "file"

    def convert_file(self, pack: int, dest: BufferSlice, threads: int | None = None) -> dict[tuple[str, int], Any]:
        """`convert` for a pack stored raw (codec "none") whose checksum was verified and that the
        pinned cache does not hold: its bytes go from the archive file into staging with preadv,
        never through the mmap."""
        if self.reload_from == "mmap":
            return self.convert(pack, self.archive.stored_bytes(pack), dest, threads=threads)
        offset, size = self.archive.pack_span(pack)
        self.dev.upload_file(dest.buffer, self.archive.fileno(), offset, size, dest.offset, threads)
        return self.convert(pack, self.archive.stored_bytes(pack), dest, upload=False)

    def kv_view(self, mem: BufferSlice, n_ctx: int, width: int) -> KvCache:
        return KvCache(BufferSlice(mem.buffer, mem.offset, n_ctx * width * 4), n_ctx, width)

    # ---- one pass ----
    def begin(self, env: dict[str, Any]) -> None:
        """Upload token ids and positions; lay out activation buffers in a tier reservation."""
        tokens, positions = env["tokens"], env["positions"]
        t = len(tokens)
        if t > MAX_TOKENS_PER_PASS:
            raise ValueError(f"{t} tokens in one pass; at most {MAX_TOKENS_PER_PASS}")
        self.wait_all()
        io = self._io_u32  # host-visible: written in place, read by the next submission
        io[:t] = tokens
        io[MAX_TOKENS_PER_PASS:MAX_TOKENS_PER_PASS + t] = positions
        env["_ids"] = BufferSlice(self._io, 0, 4 * t)
        env["_pos"] = BufferSlice(self._io, 4 * MAX_TOKENS_PER_PASS, 4 * t)
        env["_T"] = t
        env["_nseq"] = nseq = len(env["seqs"])
        env["_after_last"] = False
        # what a recording depends on besides its packs: row ranges and where each KV cache lives
        # (positions are read from the io buffer, so a decode step replays at every position)
        layout = tuple((r0, r1) + _kv_layout(kv) for r0, r1, _p0, kv in env["seqs"])
        hp = self.archive.hparams  # split-K attention partials of each sequence (0: the one-pass kernel)
        attn = tuple(self.ops.attention_scratch_bytes(r1 - r0, hp["n_heads"], hp["head_dim"], kv[0][0].n_ctx)
                     for r0, r1, _p0, kv in env["seqs"])
        scratch = self._scratch_slice(self._scratch_bytes(t, nseq, attn))
        env["_layout"] = layout + ((id(scratch.buffer), scratch.offset),)  # activations live here
        key = (t, nseq, attn, id(scratch.buffer), scratch.offset)
        bufs = self._bufs_cache.get(key)
        if bufs is None:
            bufs = self._bufs_cache[key] = self._lay_out(scratch, t, nseq, attn)
            if len(self._bufs_cache) > 64:
                self._bufs_cache.pop(next(iter(self._bufs_cache)))
        env["_bufs"], env["_attn"] = bufs

    def _lay_out(self, scratch: BufferSlice, t: int, nseq: int, attn: tuple[int, ...]) -> tuple[dict, list]:
        """Activation buffers of a pass (name -> (slice, width, rows)) and the attention partials."""
        off, bufs = scratch.offset, {}
        for name, w in self._widths().items():
            rows = nseq if name == "logits" else t
            size = _align(4 * rows * w)
            bufs[name] = (BufferSlice(scratch.buffer, off, size), w, rows)
            off += size
        parts = []
        for size in attn:
            parts.append(BufferSlice(scratch.buffer, off, size) if size else None)
            off += _align(size)
        return bufs, parts

    def _scratch_bytes(self, tokens: int, n_seqs: int, attn: Any = ()) -> int:
        """Activation bytes of a pass: the _widths rows, plus `attn` (bytes of each sequence's attention partials)."""
        return (sum(_align(4 * (n_seqs if n == "logits" else tokens) * w) for n, w in self._widths().items())
                + sum(_align(n) for n in attn))

    def _widths(self) -> dict[str, int]:
        hp = self.archive.hparams
        q = hp["n_heads"] * hp["head_dim"]
        kv = hp["n_kv_heads"] * hp["head_dim"]
        return {"x": hp["hidden"], "h": max(hp["hidden"], q), "q": q, "k": kv, "v": kv, "o": q,
                "a": hp["hidden"], "g": hp["ffn"], "u": hp["ffn"], "m": hp["ffn"], "logits": hp["vocab"]}

    def _scratch_slice(self, need: int) -> BufferSlice:
        if self._scratch is not None and self._scratch[0].requested >= need:
            return self._scratch[1]
        if self._scratch is not None:
            self.tier.release(self._scratch[0])
            self._scratch = None
        a = self.tier.reserve(need, "activations")
        self._scratch = (a, self.tier.view(a))
        return self._scratch[1]

    def _buf(self, env: dict[str, Any], name: str) -> BufferSlice:
        return env["_bufs"][name][0]

    def run_step(self, si: int, step: dict[str, Any], env: dict[str, Any], weights: Any) -> None:
        """Record (or replay) one step; submit it without waiting, its packs pinned until done."""
        step_bytes = self._step_bytes.get(si)
        if step_bytes is None:
            step_bytes = self._step_bytes[si] = sum(self.pack_bytes(p) for p in step["packs"])
        if step_bytes > self.pin_limit:
            self._run_streamed(si, step, env, weights)
            return
        t0 = time.perf_counter()
        held = weights.hold_step(si, step, env["tokens"] if step.get("gather") else None)
        key = self._step_key(si, step, env, held)
        rec = self._cache.get(key)
        if rec is None:
            rec = Recorder(self.dev, label=step["name"])
            payload = {k: v for e in held for k, v in e.payload.items()}
            self._record_ops(rec, step, env, payload)
            rec.finish()
            rec.payload = payload  # for re-recording the step into a whole-pass command buffer
            self._cache[key] = rec
            if len(self._cache) > MAX_CACHED_RECORDINGS:
                _key, old = self._cache.popitem(last=False)
                for sh, entry in list(self._fast.items()):
                    if old in entry.recs.values():
                        self._drop_fast(sh)
                self._retire(old)
        else:
            self._cache.move_to_end(key)
        self._pending.append((rec, held, bool(step.get("gather")) and key not in self._cache))
        self.host_seconds += time.perf_counter() - t0
        self._pass_recs[si] = rec
        if not self.resident:  # resident: every pack was loaded at start, nothing to fetch or unpin
            weights.loader.prefetch(weights.last_position)
            # Streamed: submit in quarter-limit batches and, over the limit, wait only for the oldest
            # steps, so that the GPU keeps queued work while this thread pins the next packs and moves
            # the prefetch window (waiting for every step in flight left the copy engine idle).
            if self._pinned(self._pending) > self.pin_limit // 4:
                self.flush(weights, wait=False)
            if self._pinned() > self.pin_limit:
                self.flush(weights, wait=False)
                self._release_oldest(weights, self.pin_limit // 2)

    @staticmethod
    def _step_key(si: int, step: dict[str, Any], env: dict[str, Any], held: list[Any]) -> tuple:
        """What a step's recording depends on: the pass shape, where its packs are and, except for
        the embedding gather (ids and activations only), where each sequence's KV cache is."""
        layout = env["_layout"][-1:] if step.get("gather") else env["_layout"]
        return (si, env["_T"], layout, tuple((e.pack, e.alloc.block, e.alloc.offset) for e in held))

    def _prerecord_gathers(self, steps: list[dict[str, Any]], env: dict[str, Any]) -> None:
        """Resident decode: record the embedding gather once per embedding pack now, so that no
        later token pays for a recording when its row lies in a pack not seen yet."""
        for si, step in enumerate(steps):
            if not step.get("gather"):
                continue
            packs = {p.pack for op in step["ops"] for name in op["w"] for p in self.archive.tensors[name].parts}
            for pack in sorted(packs):
                e = self.tier.entries.get(pack)
                if e is None:
                    continue
                key = self._step_key(si, step, env, [e])
                if key in self._cache:
                    continue
                rec = Recorder(self.dev, label=step["name"])
                self._record_ops(rec, step, env, e.payload)
                rec.payload = e.payload
                self._cache[key] = rec.finish()
                self._cache.move_to_end(key, last=False)  # evicted before the steps' recordings

    def _pinned(self, *batches: list) -> int:
        """Pack bytes the steps of `batches` (default: pending and in flight) keep pinned."""
        return sum(self.pack_bytes(e.pack) for batch in (batches or (self._pending, self._inflight))
                   for _, h, _ in batch for e in h)

    def _release_oldest(self, weights: Any, target: int) -> None:
        """Wait for the oldest steps in flight, releasing their packs, until at most `target` bytes
        stay pinned."""
        t0 = time.perf_counter()
        pinned = self._pinned()
        while self._inflight and pinned > target:
            rec, held, _transient = self._inflight.pop(0)
            rec.wait()
            weights.release_entries(held)
            pinned -= sum(self.pack_bytes(e.pack) for e in held)
        self.wait_seconds += time.perf_counter() - t0
        self._destroy_retired()

    def _destroy_retired(self) -> None:
        """Destroy the retired recordings no pending or in-flight batch uses any more."""
        busy = {id(r) for batch in (self._pending, self._inflight) for r, _, _ in batch}
        done = [r for r in self._retired if id(r) not in busy]
        self._retired = [r for r in self._retired if id(r) in busy]
        for rec in done:
            rec.destroy()

    def flush(self, weights: Any, wait: bool = True) -> None:
        """Submit every recorded step in ONE queue submission; with `wait`, release their packs."""
        if self._pending:
            submit_all([r for r, _, _ in self._pending], wait=False)
            self.submits += 1
            self._inflight += self._pending
            self._pending = []
        if wait:
            self.wait_all(weights)

    def run_pass(self, steps: list[dict[str, Any]], env: dict[str, Any], weights: Any) -> None:
        """All steps of one pass. When nothing moved since the last pass of the same shape, the pass
        is replayed from ONE command buffer holding every step but the embedding gather (recorded
        on the second such pass): no per-step Python and no gaps between command buffers."""
        tier = self.tier
        shape = (env["_T"], env["_layout"])
        fast = self._fast.get(shape)
        if fast is not None and fast.version != tier.version:
            self._drop_fast(shape)  # packs moved since: record again
            fast = None
        if fast is not None:
            self._fast.move_to_end(shape)
            tier.frozen = True  # the replay pins nothing: prefetch may neither place nor evict now
            try:
                if fast.whole is None:
                    gathers = self._resident_gathers(steps) if self.resident else None
                    whole = self._record_whole_pass(steps, env, fast.recs, gathers)
                    self._fast[shape] = fast = fast._replace(whole=whole, gathers_inside=gathers is not None)
                    if gathers is None and self.resident and env["_T"] == 1:
                        self._prerecord_gathers(steps, env)
                self._replay_pass(steps, env, weights, fast.whole, gathers_inside=fast.gathers_inside)
                self.last_fast = fast
            finally:
                tier.frozen = False
            if tier.version != fast.version:
                self._drop_fast(shape)  # a gather step moved packs: the next pass records again
            return
        # step by step: every step pins its packs until its fence signals, so prefetching (and
        # evicting what is not pinned) goes on while the pass runs
        v0 = tier.version
        self._pass_recs = {}
        for si, step in enumerate(steps):
            self.run_step(si, step, env, weights)
        self.flush(weights, wait=False)
        recs = {si: r for si, r in self._pass_recs.items() if not steps[si].get("gather")}
        cached = set(self._cache.values())
        stable = tier.version == v0 and len(recs) == sum(1 for s in steps if not s.get("gather"))
        gathers_first = all(not s.get("gather") for s in steps[min(recs, default=0):])
        if stable and gathers_first and all(r in cached for r in recs.values()):
            self._fast[shape] = _FastPass(tier.version, recs, None, False)
            while len(self._fast) > MAX_FAST_SHAPES:
                self._drop_fast(next(iter(self._fast)))

    def _record_whole_pass(self, steps: list[dict[str, Any]], env: dict[str, Any], recs: dict[int, Recorder],
                           gathers: dict[int, dict] | None = None) -> Recorder:
        """Every non-gather step of the pass, in order, in one command buffer (same packs, same
        activation layout as the per-step recordings it is made from); with `gathers` (payloads
        of gather steps over their whole tables) the embedding gathers too."""
        whole = Recorder(self.dev, label="pass")
        for si, step in enumerate(steps):
            payload = recs[si].payload if si in recs else (gathers or {}).get(si)
            if payload is not None:
                self._record_ops(whole, step, env, payload)
        return whole.finish()

    def _record_ops(self, rec: Recorder, step: dict[str, Any], env: dict[str, Any], payload: dict) -> None:
        """Record a step's ops, fused as the kernels allow (`_plan`), from the weights in `payload`."""
        for op in self._plan(step["ops"], env):
            getattr(self, "op_" + op["op"])(rec, op, env, payload)

    def _resident_gathers(self, steps: list[dict[str, Any]]) -> dict[int, dict] | None:
        """Payloads for the gather steps that read each table as ONE weight: possible when all its
        row-parts are resident back to back (packs placed in order at start). Then the embedding
        gather needs no per-token choice of pack and joins the whole-pass recording."""
        out: dict[int, dict] = {}
        for si, step in enumerate(steps):
            if not step.get("gather"):
                continue
            payload: dict = {}
            for op in step["ops"]:
                for name in op["w"]:
                    t = self.archive.tensors[name]
                    ws = []
                    for p in t.parts:
                        e = self.tier.entries.get(p.pack)
                        ws.append((p.row_start, p.row_end, e.payload.get((name, p.row_start)) if e else None))
                    merged = _merged_parts(ws)
                    if len(merged) != 1 or merged[0][0] != 0 or merged[0][1].rows != t.shape[0]:
                        return None
                    payload[(name, 0)] = merged[0][1]
            out[si] = payload
        return out

    def _drop_fast(self, shape: Any = None) -> None:
        """Forget the replayable pass of `shape` (all of them when None)."""
        for sh in list(self._fast) if shape is None else [shape]:
            entry = self._fast.pop(sh, None)
            if entry is not None and entry.whole is not None:
                self._retire(entry.whole)

    def _replay_pass(self, steps: list[dict[str, Any]], env: dict[str, Any], weights: Any,
                     whole: Recorder, gathers_inside: bool = False) -> None:
        """Gather steps (the embedding rows of this pass's tokens) run keyed by their packs as
        usual (unless the whole-pass recording holds them), then the whole-pass recording. The
        packs are resident and the tier frozen."""
        self._pass_recs = {}
        if not gathers_inside:
            for si, step in enumerate(steps):
                if step.get("gather"):  # all before the first other step (checked when it became fast)
                    self.run_step(si, step, env, weights)
        self._pending.append((whole, (), False))
        self._pass_recs[len(steps)] = whole
        self.flush(weights, wait=False)

    def _run_streamed(self, si: int, step: dict[str, Any], env: dict[str, Any], weights: Any) -> None:
        """A step too big to pin at once (under a small budget): each op's weight parts in chunks
        of at most `pin_limit` bytes, each chunk recorded, run and released before the next."""
        self.flush(weights)
        tensors = self.archive.tensors
        gather = env["tokens"] if step.get("gather") else None
        for oi, op in enumerate(step["ops"]):
            parts = [(name, pi, tensors[name].parts[pi]) for name in op["w"]
                     for pi in (range(len(tensors[name].parts)) if gather is None
                                else weights.parts_of_rows(name, tensors[name].parts, gather))]
            fixed = [x for x in parts if x[0] != op["w"][0]]  # a linear's bias: held with every chunk
            chunks: list[list] = [[]]
            size = 0
            for x in parts:
                if x in fixed:
                    continue
                nb = self.pack_bytes(x[2].pack)
                if chunks[-1] and size + nb > self.pin_limit:
                    chunks.append([])
                    size = 0
                chunks[-1].append(x)
                size += nb
            for ci, chunk in enumerate(chunks):
                if gather is not None:   # its parts are known only now: loaded side by side (graph.hold_step)
                    weights.loader.prefetch_now([(p.pack, weights.where[(si, oi, name, pi)]) for name, pi, p in chunk])
                held = []
                for name, pi, p in chunk + fixed:
                    if all(e.pack != p.pack for e in held):
                        held.append(weights.loader.acquire(p.pack, weights.where[(si, oi, name, pi)]))
                try:
                    rec = Recorder(self.dev, label=f"{step['name']}.{op['op']}")
                    payload = {k: v for e in held for k, v in e.payload.items()}
                    if op["op"] == "embed" and ci > 0:
                        env["_embed_keep"] = True
                    getattr(self, "op_" + op["op"])(rec, op, env, payload)
                    env.pop("_embed_keep", None)
                    rec.run()
                    rec.destroy()
                    self.submits += 1
                finally:
                    weights.release_entries(held)

    def _retire(self, rec: Recorder) -> None:
        """Destroy a recording once no pending or in-flight batch still uses it."""
        if any(r is rec for batch in (self._pending, self._inflight) for r, _, _ in batch):
            self._retired.append(rec)
        else:
            rec.destroy()

    def wait_all(self, weights: Any = None) -> None:
        t0 = time.perf_counter()
        for rec, held, _transient in self._inflight:
            rec.wait()
            if weights is not None:
                weights.release_entries(held)
        self._inflight.clear()
        self.wait_seconds += time.perf_counter() - t0
        self._destroy_retired()

    def finish(self, env: dict[str, Any], weights: Any, out_name: str) -> np.ndarray:
        """The pass's output: copied into mapped host memory by the pass's own submission (no
        separate readback round trip), read once its fence signals."""
        sl, w, _ = env["_bufs"][out_name]
        n = env["_nseq"]
        size = n * w * 4
        if self._readback.size < size:  # a batch of more than READBACK_ROWS sequences
            self.wait_all(weights)
            self._readback.destroy()
            self._readback = self.dev.alloc(size, "readback")
            self._readback_recs.clear()
        key = (id(sl.buffer), sl.offset, size)
        rec = self._readback_recs.get(key)
        if rec is None:
            rec = Recorder(self.dev, label="readback")
            rec.copy(BufferSlice(sl.buffer, sl.offset, size), BufferSlice(self._readback, 0, size))
            rec.host_barrier()
            rec.finish()
            self._readback_recs[key] = rec
        self._pending.append((rec, (), False))
        self.flush(weights)
        return np.frombuffer(self._readback.view(0, size), dtype=np.float32).reshape(n, w).copy()

    def _freq_factors(self, ff: list[float] | None) -> Any:
        if not ff:
            return None
        key = hash(tuple(ff))
        if key not in self._ff:
            buf = self.dev.alloc(_align(4 * len(ff)), "device")
            self.dev.upload(buf, np.asarray(ff, dtype=np.float32).tobytes())
            self._ff[key] = buf
        return self._ff[key]

    def close(self) -> None:
        self.flush(None)
        self._drop_fast()
        self.wait_all()
        for rec in self._cache.values():
            rec.destroy()
        self._cache.clear()
        for b in self._ff.values():
            b.destroy()
        self._io.destroy()
        for rec in self._readback_recs.values():
            rec.destroy()
        self._readback.destroy()
        if self.host_cache is not None:
            self.host_cache.close()


def _kv_layout(kv: list[tuple[KvCache, KvCache]]) -> tuple:
    """(n_ctx, where each layer's K and V caches are), computed once per session (cached on it)."""
    first = kv[0][0]
    lay = getattr(first, "layout", None)
    if lay is None:
        lay = first.layout = (first.n_ctx, tuple((id(kc.slice.buffer), kc.slice.offset, vc.slice.offset)
                                                 for kc, vc in kv))
    return lay


def _n(t: TensorRecord, p: TensorPart) -> int:
    return t.shape[0] if len(t.shape) == 1 else (p.row_end - p.row_start) * t.shape[-1]


def _needs_f32(t: TensorRecord) -> bool:
    return len(t.shape) == 1 and t.dtype != "F32"

