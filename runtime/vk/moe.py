"""Mixtures of experts on the Vulkan backend: the router's choice read back mid-pass, then only the
chosen experts' packs acquired and applied.

A `moe` op (docs/FORMAT.md) reads k of its n experts per row, chosen by its router at run time, and the
host must know the choice before it can acquire (load) those packs. So a pass of a MoE archive is never
one fixed recording (replay.py records such passes step by step), and a step holding a moe op runs
in pieces, each recording cached like any step's (keyed by the pass shape and the places of its packs):

1. the ops before the moe op, the router's logits (and the shared expert's gate logit) copied to a
   host-visible buffer, the shared expert's output, the op's output zeroed: submitted with everything
   pending and waited for: ONE submission and fence wait per moe op;
2. on the host: the numpy backend's own `route` (softmax or sigmoid, top-k, normalisation),
   `WeightAccess.choose`, each chosen expert's rows and routing weights written to a host-visible
   route buffer, its packs acquired;
3. per chosen expert (in expert order, as the numpy backend adds them): its rows gathered, gate and up
   products, down (SwiGLU fused where the kernel can), each row scaled by its weight and added into
   the output; one expert's packs are read once for all the rows of the pass that chose it;
4. the shared expert added (scaled by sigmoid of its gate), then the step's ops after the moe op.

Piece 3 runs one of three ways. A decode's few (row, expert) slots (up to MAX_SLOTS) are batched: one
cached recording per layer, moe_matvec.comp reading each slot's weight through a table of places in the
tier. A prefill's slots are grouped: cut into chunks between experts, each chunk one recording whose
moe_matmul.comp dispatches tile each expert's rows (a table again, so the recording is reused whatever
the router chose). Otherwise (weights split in parts, mixed types, no arrays of buffers) each expert is
its own recording, keyed by its rows and places.

Pieces 3 and 4 are queued without waiting; the next step's submission carries them. The route and
readback buffers are rewritten only after a fence wait, when nothing queued reads them any more.

The experts the device tier holds are queued first, so that the device computes them while the missing
ones load (side by side, on the loader's threads). With an `offload` (the hybrid backend's
runtime/hybrid/experts.py), piece 1 also reads back the op's input rows, some missing experts are
computed on the CPU meanwhile, and their weighted sum, written to a host-visible buffer, is added to
the op's output with the shared expert (piece 4).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from ...shaders.variants import WEIGHT_TYPES
from ..cpu import ops as cpu_ops
from . import moe_grouped
from .graph_ops import GraphOps
from .inflight import InFlight
from .layout import MAX_TOKENS_PER_PASS, PassState
from .moe_grouped import GroupedExperts, region_uints
from .moe_routing import DeviceRouting
from .ops import MOE_BATCH_SLOTS, MOE_MAX_BLOCKS
from .recorder import Recorder

MAX_CACHED_RECORDINGS = 2048  # pieces and experts: decode records (layer, expert) once while it fits
# submit the held experts' work as soon as it is queued, so that the device computes it while the host queues
# the rest of the step and the next one (off: it waits for the next router's submission)
EARLY_SUBMIT = True
# a pass of up to this many (row, expert) slots runs the chosen experts batched: moe_matvec.comp reads every
# expert's weights through a table, so a layer is one cached recording of 4 dispatches whatever the choice
# (off, or beyond: one recording per expert, 4 dispatches each)
BATCHED = True
MAX_SLOTS = MOE_BATCH_SLOTS
# beyond MAX_SLOTS (prefill), the chosen experts run grouped: moe_matmul.comp tiles each expert's rows, every
# expert of a chunk of slots in one dispatch per matrix, so a layer is a few cached recordings whatever the
# router chose (per expert, a 512-token pass of a 128-expert model re-recorded ~6,000 a pass); off: per expert
GROUPED = True       # moe_grouped.py
# where the tier holds every expert (resident), a decode's router runs on the device (moe_routing.py)
DEVICE_ROUTING = True


class MoeSteps(GroupedExperts, DeviceRouting):
    """Runs the steps of a pass that hold moe ops (`steps`: their indices; empty without one)."""

    def __init__(self, dev: Any, graph_ops: GraphOps, inflight: InFlight, steps: list[dict[str, Any]]):
        self.dev, self.graph_ops, self.inflight = dev, graph_ops, inflight
        self._steps = steps
        moe = [op for s in steps for op in s["ops"] if op["op"] == "moe"]
        self.steps = frozenset(si for si, s in enumerate(steps) if any(op["op"] == "moe" for op in s["ops"]))
        self._cache: OrderedDict[tuple, Recorder] = OrderedDict()
        self._expert_uses: dict[tuple[int, int, int], list[tuple[str, int]]] = {}
        self.router_waits = 0             # fence waits for a router's logits
        self.router_wait_seconds = 0.0    # time blocked in them (the device finishing what came before)
        self.readback = self.route = None
        self.offload: Any = None           # runtime/hybrid/experts.py (`enable_offload`)
        self.early_submit = EARLY_SUBMIT
        self.xback = self.cpu_out = None   # the op's input rows read back, and the CPU's share of its output
        self.blocks: list[Any] = []        # the device tier's buffers (`use_tier`), for the batched path
        self._batch_ok: dict[tuple[int, int], tuple[str, str, str, int, int] | None] = {}
        self.table = self._g = self._u = self._y = None
        self.gtable = self.gtable_dev = None   # the grouped path's chunks: written by the host, copied to the device
        self.groups = self.region = 0
        self.grouped_passes = 0
        self.routed_on_device = 0           # moe ops whose router ran on the device (no wait)
        self._ops: dict[tuple[int, int], int] = {}   # (step, op) -> its index among the moe ops
        self.places = self.ids = self._dtable = self._shared = None
        self._places_version: int | None = None
        self._pending: list[tuple[int, int, int]] = []   # (step, op, slots) routed on the device, not yet counted
        if not moe:
            return
        n = max(len(op["attrs"]["experts"]) for op in moe) + 1    # the experts, then the shared expert
        # (T, n) router logits, f32; route: (n, T) row indices (uint32), then (n, T) routing weights (f32)
        self.readback = dev.alloc(4 * MAX_TOKENS_PER_PASS * n, "readback")
        self.route = dev.alloc(8 * MAX_TOKENS_PER_PASS * n, "upload")
        self._idx = np.frombuffer(self.route.view(), dtype=np.uint32)
        self._w = np.frombuffer(self.route.view(), dtype=np.float32)
        if BATCHED and dev.features.get("shaderStorageBufferArrayDynamicIndexing") and not graph_ops.ops.suffix:
            tensors = graph_ops.tensors
            ffn = max(tensors[e[0]].shape[0] for op in moe for e in op["attrs"]["experts"])
            width = max(tensors[e[0]].shape[1] for op in moe for e in op["attrs"]["experts"])
            # per slot: gate, up and down entries (4 uint32 each), then the slots' rows and weights
            self.table = dev.alloc(4 * 14 * MAX_SLOTS, "upload")
            self._tbl = np.frombuffer(self.table.view(), dtype=np.uint32)
            self._g, self._u = dev.alloc(4 * MAX_SLOTS * ffn, "device"), dev.alloc(4 * MAX_SLOTS * ffn, "device")
            self._y = dev.alloc(4 * MAX_SLOTS * width, "device")
            if DEVICE_ROUTING:
                self._ops = {(si, oi): i for i, (si, oi) in enumerate(
                    (si, oi) for si, st in enumerate(steps) for oi, op in enumerate(st["ops"]) if op["op"] == "moe")}
                # per op: each expert's 3 x (block, offset); the chosen experts of a pass; the device's table
                self._pstride = 6 * (n - 1)
                self.places = dev.alloc(4 * self._pstride * len(self._ops), "upload")
                self._places_u32 = np.frombuffer(self.places.view(), dtype=np.uint32)
                self.ids = dev.alloc(4 * MAX_SLOTS * len(self._ops), "readback")
                self._dtable = dev.alloc(4 * 14 * MAX_SLOTS, "device")
                self._shared = dev.alloc(8 * MAX_TOKENS_PER_PASS, "device")
            if GROUPED:
                # the host writes TABLE_REGIONS chunk tables in turn; each chunk's recording copies its own into
                # the one on the device (a queue's recordings run in order, each beginning with a barrier)
                self.groups, self.region = region_uints(n)
                self.gtable = dev.alloc(4 * self.region * moe_grouped.TABLE_REGIONS, "upload")
                self.gtable_dev = dev.alloc(4 * self.region, "device")
                self._gtbl = np.frombuffer(self.gtable.view(), dtype=np.uint32)

    def reserve_offload(self, width: int) -> None:
        """The buffers an offload needs (ops whose rows are `width` floats wide), allocated before the
        device tier is sized: where they are device memory (a CPU driver) the budget counts them."""
        if self.xback is None and self.readback is not None:
            self.xback = self.dev.alloc(4 * MAX_TOKENS_PER_PASS * width, "readback")
            self.cpu_out = self.dev.alloc(4 * MAX_TOKENS_PER_PASS * width, "upload")

    def enable_offload(self, offload: Any) -> None:
        """Let `offload` compute some missing experts on the CPU (after `reserve_offload`, before any pass)."""
        if self.xback is None:
            raise ValueError("reserve_offload first")
        self.offload = offload

    def use_tier(self, buffers: list[Any]) -> None:
        """The device tier's buffers: the batched path binds them all (at most MOE_MAX_BLOCKS, each within
        one binding's range; else experts run one recording each)."""
        rng = self.dev.info.max_storage_buffer_range
        self.blocks = list(buffers) if len(buffers) <= MOE_MAX_BLOCKS and all(b.size <= rng for b in buffers) else []
        self._block_of = {id(b): i for i, b in enumerate(self.blocks)}

    def _buffers(self) -> list[Any]:
        return [b for b in (self.readback, self.route, self.xback, self.cpu_out, self.table, self._g, self._u, self._y,
                            self.gtable, self.gtable_dev, self.places, self.ids, self._dtable, self._shared)
                if b is not None]

    @property
    def device_bytes(self) -> int:
        """Device-local bytes of the route, readback and batched buffers (counted in the backend's reserved bytes)."""
        return sum(b.size for b in self._buffers() if b.block.device_local)

    def _batchable(self, si: int, oi: int, op: dict[str, Any]) -> tuple[str, str, str, int, int] | None:
        """(gate, up and down types, expert ffn, width) where the op's experts can run batched: each
        matrix one part, one type per role across its experts, a kernel for each; else None."""
        key = (si, oi)
        if key not in self._batch_ok:
            tensors, got = self.graph_ops.tensors, None
            roles = list(zip(*op["attrs"]["experts"]))   # (gate names), (up names), (down names)
            if len(roles) == 3 and all(len(tensors[n].parts) == 1 for r in roles for n in r):
                types = [{tensors[n].dtype for n in r} for r in roles]
                if all(len(t) == 1 for t in types) and all(next(iter(t)) in WEIGHT_TYPES for t in types):
                    ffn, width = tensors[roles[0][0]].shape
                    got = (*(next(iter(t)) for t in types), ffn, width)
            self._batch_ok[key] = got
        return self._batch_ok[key]

    # ---- a step ----
    def run_step(self, si: int, step: dict[str, Any], ps: PassState, weights: Any, pin_limit: int,
                 resident: bool) -> None:
        """Step `si` (holding moe ops): its own packs pinned throughout, each expert's while its work runs."""
        go = self.graph_ops
        planned = go.plan(step["ops"], ps)
        pieces: list[tuple[list[dict[str, Any]], dict[str, Any], int]] = []   # (ops before, moe op, its index)
        before: list[dict[str, Any]] = []
        for op in planned:
            if op["op"] == "moe":
                pieces.append((before, op, next(j for j, o in enumerate(step["ops"]) if o is op)))
                before = []
            else:
                before.append(op)
        held = weights.hold_step(si, step, None)
        places = tuple((e.pack, e.alloc.block, e.alloc.offset) for e in held)
        payload = {k: v for e in held for k, v in e.payload.items()}
        shape = (ps.T, ps.layout, places)
        if resident and self._routable(si, pieces, ps, weights):
            self._run_routed(si, step, pieces, before, ps, payload, held, shape)
            return
        queued = False
        xback = self.xback if self.offload is not None else None
        try:
            prev, on_cpu = None, False
            for i, (ops_before, op, oi) in enumerate(pieces):
                def record_piece(rec: Recorder, prev=prev, on_cpu=on_cpu, ops_before=ops_before, op=op) -> None:
                    if prev is not None:
                        self._combine(rec, prev, ps, on_cpu)
                    for o in ops_before:
                        go.record_op(rec, o, ps, payload)
                    go.moe_router(rec, op, ps, payload, self.readback, xback)
                rec = self._cached((si, i, on_cpu, xback is not None) + shape, f"{step['name']}.router", record_piece)
                self.inflight.add(rec)
                t0 = time.perf_counter()
                self.inflight.flush(weights)   # everything queued, then the router's logits are here
                self.router_wait_seconds += time.perf_counter() - t0
                self.router_waits += 1
                on_cpu = self._experts(si, oi, op, ps, weights, pin_limit, resident)
                prev = op

            def record_tail(rec: Recorder) -> None:
                self._combine(rec, prev, ps, on_cpu)
                for o in before:
                    go.record_op(rec, o, ps, payload)
            tail = self._cached((si, "tail", on_cpu) + shape, f"{step['name']}.tail", record_tail)
            self.inflight.add(tail, held)   # the step's packs stay pinned until its last piece is done
            queued = True
        finally:
            if not queued:
                weights.release(held)
        if not resident:
            weights.prefetch_ahead()

    def _experts(self, si: int, oi: int, op: dict[str, Any], ps: PassState, weights: Any, pin_limit: int,
                 resident: bool) -> bool:
        """Route the pass's rows (the logits just read back), then queue each chosen expert's work: the
        ones the tier holds first, the missing ones loading side by side meanwhile (with an offload, some
        of those computed on the CPU instead). True when the CPU's share waits in `cpu_out`."""
        a = op["attrs"]
        t, n = ps.rows(), len(a["experts"])
        logits = np.frombuffer(self.readback.view(0, 4 * t * (n + 1)), dtype=np.float32).reshape(t, n + 1)
        idx, gate = cpu_ops.route(logits[:, :n].copy(), a["k"], a["router"], a["norm"])   # [t, k] each
        chosen = np.unique(idx).tolist()
        held = weights.choose(si, oi, chosen)   # those the device tier holds
        wbase = (n + 1) * t
        if len(op["w"]) == 5:   # the shared expert's rows: all of them, weighted by sigmoid(its gate logit)
            self._idx[n * t:(n + 1) * t] = np.arange(t, dtype=np.uint32)
            self._w[wbase + n * t:wbase + (n + 1) * t] = cpu_ops.sigmoid(logits[:, n].copy())
        options = weights.experts.options[(si, oi)]
        missing = [e for e in chosen if e not in held]
        cpu: list[int] = []
        if missing and self.offload is not None:
            cpu = self.offload.split({e: tuple(a["experts"][e]) for e in missing},
                                     {e: int(np.count_nonzero(idx == e)) for e in missing},
                                     {e: options[e] for e in missing})
            missing = [e for e in missing if e not in cpu]
        if len(missing) > 1 or (missing and (held or cpu)):
            weights.load_side_by_side([(si, oi, name, pi) for e in missing for name, pi in self._uses(si, oi, op, e)])
        info = self._batchable(si, oi, op) if self.table is not None and self.blocks else None
        if info is not None and t * a["k"] <= MAX_SLOTS and (held or missing):
            self._queue_batched(si, oi, op, held, missing, idx, gate, ps, weights, info, pin_limit, resident)
            held, missing = [], []
            if cpu or self.early_submit:
                self.inflight.flush(weights, wait=False)
        elif info is not None and self.gtable is not None and (held or missing) \
                and all(self.graph_ops.ops.moe_matmul_fits(dt) for dt in info[:3]):
            self._queue_grouped(si, oi, op, sorted(held + missing), idx, gate, ps, weights, info, pin_limit, resident)
            held, missing = [], []
            if cpu or self.early_submit:
                self.inflight.flush(weights, wait=False)
        for e in held:
            self._queue_expert(si, oi, op, e, idx, gate, t, wbase, ps, weights, pin_limit, resident)
        if held and (cpu or self.early_submit):
            self.inflight.flush(weights, wait=False)   # the device computes the held experts meanwhile
        if cpu:
            width = ps.width(op["in"][0])
            x = np.frombuffer(self.xback.view(0, 4 * t * width), dtype=np.float32).reshape(t, width)
            out = np.frombuffer(self.cpu_out.view(0, 4 * t * width), dtype=np.float32).reshape(t, width)
            self.offload.compute({e: tuple(a["experts"][e]) for e in cpu}, {e: options[e] for e in cpu},
                                 idx, gate, x, out)
        for e in missing:
            self._queue_expert(si, oi, op, e, idx, gate, t, wbase, ps, weights, pin_limit, resident)
        return bool(cpu)

    def _queue_batched(self, si: int, oi: int, op: dict[str, Any], held: list[int], missing: list[int],
                       idx: np.ndarray, gate: np.ndarray, ps: PassState, weights: Any,
                       info: tuple[str, str, str, int, int], pin_limit: int, resident: bool) -> None:
        """The experts `held` and `missing` (loaded now, side by side) as one recording: a slot per (row,
        expert) pair in expert order; gate of every slot in one dispatch, up in another, SwiGLU, down, then
        each row's slots added to it in order (the numpy backend's order)."""
        experts = sorted(held + missing)
        entries: list[Any] = []
        try:
            for e in experts:
                entries += [weights.acquire(si, oi, name, pi) for name, pi in self._uses(si, oi, op, e)]
        except BaseException:
            weights.release(entries)
            raise
        payload = {k: v for h in entries for k, v in h.payload.items()}
        names = op["attrs"]["experts"]
        slots = [(e, int(r), float(gate[r, j])) for e in experts for r, j in zip(*np.nonzero(idx == e))]
        n = len(slots)
        tbl, fl = self._tbl, self._tbl.view(np.float32)
        for j, (e, r, w) in enumerate(slots):
            for role, (x_row, y_row) in enumerate(((r, j), (r, j), (j, j))):
                wt = payload[(names[e][role], 0)]
                tbl[4 * (role * n + j):4 * (role * n + j) + 4] = (self._block_of[id(wt.buffer)], wt.offset, x_row, y_row)
            tbl[12 * n + j] = r
            fl[13 * n + j] = w
        rec = self._cached((si, oi, "batched", n, ps.T, ps.layout, len(self.blocks)), "experts",
                           lambda rec: self._record_batched(rec, self.table, info, op, ps, n))
        self.inflight.add(rec, entries)
        if not resident and self.inflight.pinned() > pin_limit:
            self.inflight.flush(weights, wait=False)
            self.inflight.release_oldest(weights, pin_limit // 2)

    def _record_batched(self, rec: Recorder, table: Any, info: tuple[str, str, str, int, int], op: dict[str, Any],
                        ps: PassState, n: int) -> None:
        """The batched experts' dispatches over `n` slots of `table` (written by the host, or by moe_route.comp):
        gate and up (moe_matvec.comp), SwiGLU, down, each row's slots added to the op's output in order."""
        o = self.graph_ops.ops
        gdt, udt, ddt, ffn, width = info
        x, out, xs = ps.buf(op["in"][0]), ps.buf(op["out"]), ps.width(op["in"][0])
        o.moe_matvec(rec, gdt, self.blocks, x, table, self._g, ffn, width, n, xs, ffn, 0)
        o.moe_matvec(rec, udt, self.blocks, x, table, self._u, ffn, width, n, xs, ffn, 4 * n)
        o.swiglu(rec, self._g, self._u, self._g, n * ffn)
        o.moe_matvec(rec, ddt, self.blocks, self._g, table, self._y, width, ffn, n, ffn, width, 8 * n)
        o.sum_rows(rec, self._y, out, table, n, width, ps.rows(), 12 * n, 13 * n)

    def _queue_expert(self, si: int, oi: int, op: dict[str, Any], e: int, idx: np.ndarray, gate: np.ndarray,
                      t: int, wbase: int, ps: PassState, weights: Any, pin_limit: int, resident: bool) -> None:
        """Expert e's rows and routing weights into the route buffer, its packs acquired, its work queued."""
        rows, slot = np.nonzero(idx == e)
        m = len(rows)
        self._idx[e * t:e * t + m] = rows
        self._w[wbase + e * t:wbase + e * t + m] = gate[rows, slot]
        inflight = self.inflight
        held = []
        try:
            for name, pi in self._uses(si, oi, op, e):
                held.append(weights.acquire(si, oi, name, pi))
        except BaseException:
            weights.release(held)
            raise
        places = tuple((h.pack, h.alloc.block, h.alloc.offset) for h in held)
        rec = self._cached((si, oi, e, m, ps.T, ps.layout, places), f"expert {e}",
                           lambda rec: self.graph_ops.moe_expert(
                               rec, op, ps, {k: v for h in held for k, v in h.payload.items()}, e, m, self.route,
                               e * t, wbase + e * t))
        inflight.add(rec, held)
        if not resident:   # as PassRunner.run_step: queued work keeps the device busy, pins stay bounded
            if inflight.pinned(pending_only=True) > pin_limit // 4:
                inflight.flush(weights, wait=False)
            if inflight.pinned() > pin_limit:
                inflight.flush(weights, wait=False)
                inflight.release_oldest(weights, pin_limit // 2)

    def _uses(self, si: int, oi: int, op: dict[str, Any], e: int) -> list[tuple[str, int]]:
        """Expert e's (tensor, part) uses, one per pack, in order (worked out once)."""
        key = (si, oi, e)
        uses = self._expert_uses.get(key)
        if uses is None:
            uses, seen = [], set()
            for name in op["attrs"]["experts"][e]:
                for pi, p in enumerate(self.graph_ops.tensors[name].parts):
                    if p.pack not in seen:
                        seen.add(p.pack)
                        uses.append((name, pi))
            self._expert_uses[key] = uses
        return uses

    def _combine(self, rec: Recorder, op: dict[str, Any], ps: PassState, on_cpu: bool) -> None:
        t, n = ps.rows(), len(op["attrs"]["experts"])
        self.graph_ops.moe_combine(rec, op, ps, self.route, n * t, (n + 1) * t + n * t,
                                   self.cpu_out if on_cpu else None)

    # ---- recordings ----
    def _cached(self, key: tuple, label: str, record: Callable[[Recorder], None]) -> Recorder:
        rec = self._cache.get(key)
        if rec is not None:
            self._cache.move_to_end(key)
            return rec
        rec = Recorder(self.dev, label=label)
        try:
            record(rec)
            rec.finish()
        except BaseException:
            rec.destroy()
            raise
        self._cache[key] = rec
        if len(self._cache) > MAX_CACHED_RECORDINGS:
            self.inflight.retire(self._cache.popitem(last=False)[1])
        return rec

    def close(self) -> None:
        """Destroy the recordings and buffers (the device must be idle)."""
        for rec in self._cache.values():
            rec.destroy()
        self._cache.clear()
        for b in self._buffers():
            b.destroy()
        self.readback = self.route = self.xback = self.cpu_out = self.table = self._g = self._u = self._y = None
        self.gtable = self.gtable_dev = None
        self.places = self.ids = self._dtable = self._shared = None
