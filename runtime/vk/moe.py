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
from .graph_ops import MOE_G, MOE_LOGITS, MOE_U, MOE_Y, GraphOps
from .inflight import InFlight
from .kernels import BufferSlice
from .layout import MAX_TOKENS_PER_PASS, PassState
from .ops import MOE_GROUP_SLOTS, MOE_MAX_BLOCKS
from .recorder import Recorder

MAX_CACHED_RECORDINGS = 2048  # pieces and experts: decode records (layer, expert) once while it fits
# submit the held experts' work as soon as it is queued, so that the device computes it while the host queues
# the rest of the step and the next one (off: it waits for the next router's submission)
EARLY_SUBMIT = True
# a pass of up to this many (row, expert) slots runs the chosen experts batched: moe_matvec.comp reads every
# expert's weights through a table, so a layer is one cached recording of 4 dispatches whatever the choice
# (off, or beyond: one recording per expert, 4 dispatches each)
BATCHED = True
MAX_SLOTS = 64
# beyond MAX_SLOTS (prefill), the chosen experts run grouped: moe_matmul.comp tiles each expert's rows, every
# expert of a chunk of slots in one dispatch per matrix, so a layer is a few cached recordings whatever the
# router chose (per expert, a 512-token pass of a 128-expert model re-recorded ~6,000 a pass); off: per expert
GROUPED = True
CHUNK_SLOTS = 512    # a chunk's slots at most (and at most the pass's rows: its products go through the pass's
                     # per-expert scratch, moe_g/moe_u/moe_y, sized for that many)
TABLE_REGIONS = 16   # chunk tables the host writes ahead; past them it waits for the device to read the oldest
# where the tier holds every expert (resident), a decode's router runs on the device (moe_route.comp) and
# writes the batched experts' table itself: a moe step is one cached recording, no fence wait mid-pass
DEVICE_ROUTING = True


class MoeSteps:
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
                # a chunk's table: R, rows[S], offsets[S + 1], slot[S], w[S], xrow[S] (S = CHUNK_SLOTS), then
                # gate, up and down's G groups; the host writes TABLE_REGIONS of them in turn, and each chunk's
                # recording copies its own into the one on the device (a queue's recordings run in order, each
                # beginning with a barrier on all earlier work)
                self.groups = CHUNK_SLOTS // MOE_GROUP_SLOTS + n
                self.region = 2 + 5 * CHUNK_SLOTS + 12 * self.groups
                self.gtable = dev.alloc(4 * self.region * TABLE_REGIONS, "upload")
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
        pieces: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
        before: list[dict[str, Any]] = []
        for op in planned:
            if op["op"] == "moe":
                pieces.append((before, op))
                before = []
            else:
                before.append(op)
        held = weights.hold_step(si, step, None)
        places = tuple((e.pack, e.alloc.block, e.alloc.offset) for e in held)
        payload = {k: v for e in held for k, v in e.payload.items()}
        shape = (ps.T, ps.layout, places)
        if resident and self._routable(si, step, pieces, ps, weights):
            self._run_routed(si, step, pieces, before, ps, payload, held, shape)
            return
        queued = False
        xback = self.xback if self.offload is not None else None
        try:
            prev, on_cpu = None, False
            for i, (ops_before, op) in enumerate(pieces):
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
                oi = next(j for j, o in enumerate(step["ops"]) if o is op)
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

    # ---- the router on the device (resident) ----
    def _routable(self, si: int, step: dict[str, Any], pieces: list[tuple[list[dict[str, Any]], dict[str, Any]]],
                  ps: PassState, weights: Any) -> bool:
        """Whether this step's moe ops can route on the device: every expert of each in the tier (its places
        written for the tier as it is now), each batchable, few enough slots, no CPU share."""
        if self.places is None or not self.blocks or self.offload is not None:
            return False
        for _before, op in pieces:
            a = op["attrs"]
            oi = next(j for j, o in enumerate(step["ops"]) if o is op)
            if (ps.rows() * a["k"] > MAX_SLOTS or a["k"] > 16 or a["router"] not in ("softmax", "sigmoid")
                    or self._batchable(si, oi, op) is None):
                return False
        tier = weights.loader.tier
        if self._places_version != tier.version:
            if self._pending:   # routed work may still read the places: not now
                return False
            ok = self._write_places(weights)
            self._places_version = tier.version if ok else -1
        return self._places_version == tier.version

    def _write_places(self, weights: Any) -> bool:
        """Every moe op's experts' (block, offset) per role, from the tier's entries, the ones not loaded yet
        loaded now, side by side (resident: the budget holds them all; the start loads no expert, the access
        sequence cannot say which come first); False where one is not in the tier (the host routes then)."""
        entries, tensors = weights.loader.tier.entries, self.graph_ops.tensors
        steps = self._steps
        todo = [(si, oi, name, 0) for (si, oi) in self._ops for names in steps[si]["ops"][oi]["attrs"]["experts"]
                for name in names[:3] if tensors[name].parts[0].pack not in entries]
        if todo:
            weights.load_side_by_side(todo)
            for use in todo:
                weights.release([weights.acquire(*use)])
        for (si, oi), i in self._ops.items():
            names = steps[si]["ops"][oi]["attrs"]["experts"]
            rows = []
            for e in range(len(names)):
                for role in range(3):
                    part = tensors[names[e][role]].parts[0]
                    entry = entries.get(part.pack)
                    wt = None if entry is None else entry.payload.get((names[e][role], 0))
                    if wt is None or id(wt.buffer) not in self._block_of:
                        return False
                    rows.append((self._block_of[id(wt.buffer)], wt.offset))
            self._places_u32[self._pstride * i:self._pstride * i + 6 * len(names)] = np.asarray(rows, np.uint32).reshape(-1)
        return True

    def _run_routed(self, si: int, step: dict[str, Any], pieces: list[tuple[list[dict[str, Any]], dict[str, Any]]],
                    after: list[dict[str, Any]], ps: PassState, payload: dict, held: list[Any], shape: tuple) -> None:
        """The whole step as one cached recording: for each moe op, the ops before it, its router's logits, the
        top-k and table on the device, the batched experts and the shared expert; then the ops after."""
        go, o = self.graph_ops, self.graph_ops.ops
        t = ps.rows()
        info = []
        for _before, op in pieces:
            oi = next(j for j, x in enumerate(step["ops"]) if x is op)
            info.append((oi, op, self._batchable(si, oi, op)))

        def record(rec: Recorder) -> None:
            for (ops_before, _op), (oi, op, (gdt, udt, ddt, ffn, width)) in zip(pieces, info):
                a = op["attrs"]
                n, k = len(a["experts"]), a["k"]
                m = t * k
                for x in ops_before:
                    go.record_op(rec, x, ps, payload)
                go.moe_router(rec, op, ps, payload, None)
                i = self._ops[(si, oi)]
                o.moe_route(rec, ps.buf(MOE_LOGITS), self.places, self._dtable, self._shared, self.ids, t, n, k,
                            a["router"] == "sigmoid", bool(a["norm"]), len(op["w"]) == 5, i * MAX_SLOTS,
                            self._pstride * i)
                x_in, out, xs = ps.buf(op["in"][0]), ps.buf(op["out"]), ps.width(op["in"][0])
                o.moe_matvec(rec, gdt, self.blocks, x_in, self._dtable, self._g, ffn, width, m, xs, ffn, 0)
                o.moe_matvec(rec, udt, self.blocks, x_in, self._dtable, self._u, ffn, width, m, xs, ffn, 4 * m)
                o.swiglu(rec, self._g, self._u, self._g, m * ffn)
                o.moe_matvec(rec, ddt, self.blocks, self._g, self._dtable, self._y, width, ffn, m, ffn, width, 8 * m)
                o.sum_rows(rec, self._y, out, self._dtable, m, width, t, 12 * m, 13 * m)
                go.moe_combine(rec, op, ps, self._shared, 0, t)
            for x in after:
                go.record_op(rec, x, ps, payload)
        rec = self._cached((si, "routed", len(self.blocks)) + shape, f"{step['name']}.routed", record)
        self.inflight.add(rec, held)
        self._pending += [(si, oi, t * op["attrs"]["k"]) for oi, op, _ in info]
        self.routed_on_device += len(info)

    def settle(self, weights: Any) -> None:
        """Count the experts the device chose in the passes now done (hits, heat), as the host's routing does."""
        ids = np.frombuffer(self.ids.view(), dtype=np.uint32) if self._pending else None
        for si, oi, slots in self._pending:
            i = self._ops[(si, oi)]
            weights.choose(si, oi, np.unique(ids[i * MAX_SLOTS:i * MAX_SLOTS + slots]).tolist())
        self._pending = []

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
        elif info is not None and self.gtable is not None and (held or missing):
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
        gdt, udt, ddt, ffn, width = info
        x, out, t = ps.buf(op["in"][0]), ps.buf(op["out"]), ps.rows()
        xs = ps.width(op["in"][0])

        def record(rec: Recorder) -> None:
            o = self.graph_ops.ops
            o.moe_matvec(rec, gdt, self.blocks, x, self.table, self._g, ffn, width, n, xs, ffn, 0)
            o.moe_matvec(rec, udt, self.blocks, x, self.table, self._u, ffn, width, n, xs, ffn, 4 * n)
            o.swiglu(rec, self._g, self._u, self._g, n * ffn)
            o.moe_matvec(rec, ddt, self.blocks, self._g, self.table, self._y, width, ffn, n, ffn, width, 8 * n)
            o.sum_rows(rec, self._y, out, self.table, n, width, t, 12 * n, 13 * n)
        rec = self._cached((si, oi, "batched", n, ps.T, ps.layout, len(self.blocks)), "experts", record)
        self.inflight.add(rec, entries)
        if not resident and self.inflight.pinned() > pin_limit:
            self.inflight.flush(weights, wait=False)
            self.inflight.release_oldest(weights, pin_limit // 2)

    def _chunks(self, si: int, oi: int, op: dict[str, Any], experts: list[int], idx: np.ndarray, gate: np.ndarray,
                size: int, cap: int | None) -> list[list[tuple[int, np.ndarray, np.ndarray]]]:
        """The slots (row, expert) of `experts` in expert order, cut into chunks of at most `size` slots and,
        with a `cap`, at most cap pack bytes of experts each, between experts (one expert's rows are one chunk's
        unless they are more than `size`): per chunk, (expert, its rows there, their routing weights)."""
        chunks: list[list[tuple[int, np.ndarray, np.ndarray]]] = [[]]
        used = nbytes = 0
        for e in experts:
            rows, col = np.nonzero(idx == e)
            w = gate[rows, col]
            eb = self._expert_bytes(si, oi, op, e)
            if chunks[-1] and (used + len(rows) > size or (cap is not None and nbytes + eb > cap)):
                chunks.append([])
                used = nbytes = 0
            for start in range(0, len(rows), size):
                if used == size:
                    chunks.append([])
                    used = nbytes = 0
                take = min(len(rows) - start, size)
                chunks[-1].append((e, rows[start:start + take], w[start:start + take]))
                used += take
                nbytes += eb
        return chunks

    def _expert_bytes(self, si: int, oi: int, op: dict[str, Any], e: int) -> int:
        tensors = self.graph_ops.tensors
        return sum(self.inflight.pack_bytes(tensors[name].parts[pi].pack) for name, pi in self._uses(si, oi, op, e))

    def _queue_grouped(self, si: int, oi: int, op: dict[str, Any], experts: list[int], idx: np.ndarray,
                       gate: np.ndarray, ps: PassState, weights: Any, info: tuple[str, str, str, int, int],
                       pin_limit: int, resident: bool) -> None:
        """The experts' rows as chunks of slots (expert order), each one recording: its table copied to the
        device, gate and up over every group of the chunk (a group: up to MOE_GROUP_SLOTS rows of one expert),
        SwiGLU, down, then each row's slots added to it in expert order. Each chunk pins its own experts' packs
        (streaming: at most half the pin limit, released as the device finishes)."""
        gdt, udt, ddt, ffn, width = info
        names = op["attrs"]["experts"]
        x, out, t = ps.buf(op["in"][0]), ps.buf(op["out"]), ps.rows()
        g_buf, u_buf, y_buf = ps.buf(MOE_G), ps.buf(MOE_U), ps.buf(MOE_Y)
        xs = ps.width(op["in"][0])
        size = min(CHUNK_SLOTS, ps.T)   # the slots the scratch holds
        S, G, R = CHUNK_SLOTS, self.groups, self.region
        chunks = self._chunks(si, oi, op, experts, idx, gate, size, None if resident else max(1, pin_limit // 2))
        self.grouped_passes += 1
        for c, chunk in enumerate(chunks):
            # the router's wait found the device idle: every region is free at the op's start; past the last,
            # wait for the device to have read them all
            if c and c % TABLE_REGIONS == 0:
                self.inflight.flush(weights)
            base = (c % TABLE_REGIONS) * R
            entries: list[Any] = []
            try:
                for e in dict.fromkeys(e for e, _, _ in chunk):
                    entries += [weights.acquire(si, oi, name, pi) for name, pi in self._uses(si, oi, op, e)]
            except BaseException:
                weights.release(entries)
                raise
            payload = {k: v for h in entries for k, v in h.payload.items()}
            self._write_chunk(self._gtbl[base:base + R], chunk, payload, names)

            def record(rec: Recorder, base=base) -> None:
                o, dtb, gb = self.graph_ops.ops, self.gtable_dev, 2 + 5 * S
                rec.copy(BufferSlice(self.gtable, 4 * base, 4 * R), dtb)
                o.moe_matmul(rec, gdt, self.blocks, x, dtb, g_buf, ffn, width, G, xs, ffn, gb, 2 + 4 * S)
                o.moe_matmul(rec, udt, self.blocks, x, dtb, u_buf, ffn, width, G, xs, ffn, gb + 4 * G, 2 + 4 * S)
                o.swiglu(rec, g_buf, u_buf, g_buf, size * ffn)
                o.moe_matmul(rec, ddt, self.blocks, g_buf, dtb, y_buf, width, ffn, G, ffn, width, gb + 8 * G, None)
                o.sum_rows_by_list(rec, y_buf, out, dtb, S, width, 0, min(size, t))
            rec = self._cached((si, oi, "grouped", c % TABLE_REGIONS, size, ps.T, ps.layout, len(self.blocks)), "experts",
                               record)
            self.inflight.add(rec, entries)
            if not resident and self.inflight.pinned() > pin_limit // 2:
                self.inflight.flush(weights, wait=False)
                self.inflight.release_oldest(weights, pin_limit // 2)

    def _write_chunk(self, tbl: np.ndarray, chunk: list[tuple[int, np.ndarray, np.ndarray]], payload: dict,
                     names: list[list[str]]) -> None:
        """One chunk's table (the layout `_queue_grouped` reads): its rows' slot lists, weights and x rows, then
        per role its groups of at most MOE_GROUP_SLOTS slots of one expert (the unused ones zero)."""
        S, G = CHUNK_SLOTS, self.groups
        slot_rows = np.concatenate([r for _, r, _ in chunk]).astype(np.uint32)
        n = len(slot_rows)
        order = np.argsort(slot_rows, kind="stable")   # each row's slots, in expert order
        touched, counts = np.unique(slot_rows[order], return_counts=True)
        tbl[0] = len(touched)
        tbl[1:1 + len(touched)] = touched
        tbl[1 + S] = 0
        tbl[2 + S:2 + S + len(touched)] = np.cumsum(counts)
        tbl[2 + 2 * S:2 + 2 * S + n] = order
        tbl[2 + 3 * S:2 + 3 * S + n] = np.concatenate([w for _, _, w in chunk]).astype(np.float32).view(np.uint32)
        tbl[2 + 4 * S:2 + 4 * S + n] = slot_rows
        groups = np.zeros((3, G, 4), dtype=np.uint32)
        g = j = 0
        for e, rows, _ in chunk:
            places = [payload[(names[e][role], 0)] for role in range(3)]
            for j0 in range(j, j + len(rows), MOE_GROUP_SLOTS):
                cnt = min(MOE_GROUP_SLOTS, j + len(rows) - j0)
                for role, wt in enumerate(places):
                    groups[role, g] = (self._block_of[id(wt.buffer)], wt.offset, j0, cnt)
                g += 1
            j += len(rows)
        tbl[2 + 5 * S:2 + 5 * S + 12 * G] = groups.reshape(-1)

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
