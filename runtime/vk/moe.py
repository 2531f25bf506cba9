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

Pieces 3 and 4 are queued without waiting; the next step's submission carries them. The route and
readback buffers are rewritten only after a fence wait, when nothing queued reads them any more.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from ..cpu import ops as cpu_ops
from .graph_ops import GraphOps
from .inflight import InFlight
from .layout import MAX_TOKENS_PER_PASS, PassState
from .recorder import Recorder

MAX_CACHED_RECORDINGS = 2048  # pieces and experts: decode records (layer, expert) once while it fits


class MoeSteps:
    """Runs the steps of a pass that hold moe ops (`steps`: their indices; empty without one)."""

    def __init__(self, dev: Any, graph_ops: GraphOps, inflight: InFlight, steps: list[dict[str, Any]]):
        self.dev, self.graph_ops, self.inflight = dev, graph_ops, inflight
        moe = [op for s in steps for op in s["ops"] if op["op"] == "moe"]
        self.steps = frozenset(si for si, s in enumerate(steps) if any(op["op"] == "moe" for op in s["ops"]))
        self._cache: OrderedDict[tuple, Recorder] = OrderedDict()
        self.router_waits = 0             # fence waits for a router's logits
        self.router_wait_seconds = 0.0    # time blocked in them (the device finishing what came before)
        self.readback = self.route = None
        if not moe:
            return
        n = max(len(op["attrs"]["experts"]) for op in moe) + 1    # the experts, then the shared expert
        # (T, n) router logits, f32; route: (n, T) row indices (uint32), then (n, T) routing weights (f32)
        self.readback = dev.alloc(4 * MAX_TOKENS_PER_PASS * n, "readback")
        self.route = dev.alloc(8 * MAX_TOKENS_PER_PASS * n, "upload")
        self._idx = np.frombuffer(self.route.view(), dtype=np.uint32)
        self._w = np.frombuffer(self.route.view(), dtype=np.float32)

    @property
    def device_bytes(self) -> int:
        """Device-local bytes of the route and readback buffers (counted in the backend's reserved bytes)."""
        return sum(b.size for b in (self.readback, self.route) if b is not None and b.block.device_local)

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
        queued = False
        try:
            prev = None
            for i, (ops_before, op) in enumerate(pieces):
                def record_piece(rec: Recorder, prev=prev, ops_before=ops_before, op=op) -> None:
                    if prev is not None:
                        self._combine(rec, prev, ps)
                    for o in ops_before:
                        go.record_op(rec, o, ps, payload)
                    go.moe_router(rec, op, ps, payload, self.readback)
                rec = self._cached((si, i) + shape, f"{step['name']}.router", record_piece)
                self.inflight.add(rec)
                t0 = time.perf_counter()
                self.inflight.flush(weights)   # everything queued, then the router's logits are here
                self.router_wait_seconds += time.perf_counter() - t0
                self.router_waits += 1
                oi = next(j for j, o in enumerate(step["ops"]) if o is op)
                self._experts(si, oi, op, ps, weights, pin_limit, resident)
                prev = op

            def record_tail(rec: Recorder) -> None:
                self._combine(rec, prev, ps)
                for o in before:
                    go.record_op(rec, o, ps, payload)
            tail = self._cached((si, "tail") + shape, f"{step['name']}.tail", record_tail)
            self.inflight.add(tail, held)   # the step's packs stay pinned until its last piece is done
            queued = True
        finally:
            if not queued:
                weights.release(held)
        if not resident:
            weights.prefetch_ahead()

    def _experts(self, si: int, oi: int, op: dict[str, Any], ps: PassState, weights: Any, pin_limit: int,
                 resident: bool) -> None:
        """Route the pass's rows (the logits just read back), then queue each chosen expert's work."""
        a = op["attrs"]
        t, n = ps.rows(), len(a["experts"])
        logits = np.frombuffer(self.readback.view(0, 4 * t * (n + 1)), dtype=np.float32).reshape(t, n + 1)
        idx, gate = cpu_ops.route(logits[:, :n].copy(), a["k"], a["router"], a["norm"])   # [t, k] each
        chosen = np.unique(idx).tolist()
        weights.choose(si, oi, chosen)
        wbase = (n + 1) * t
        if len(op["w"]) == 5:   # the shared expert's rows: all of them, weighted by sigmoid(its gate logit)
            self._idx[n * t:(n + 1) * t] = np.arange(t, dtype=np.uint32)
            self._w[wbase + n * t:wbase + (n + 1) * t] = cpu_ops.sigmoid(logits[:, n].copy())
        tensors, inflight = self.graph_ops.tensors, self.inflight
        for e in chosen:
            rows, slot = np.nonzero(idx == e)
            m = len(rows)
            self._idx[e * t:e * t + m] = rows
            self._w[wbase + e * t:wbase + e * t + m] = gate[rows, slot]
            held, seen = [], set()
            try:
                for name in a["experts"][e]:
                    for pi, p in enumerate(tensors[name].parts):
                        if p.pack not in seen:
                            seen.add(p.pack)
                            held.append(weights.acquire(si, oi, name, pi))
            except BaseException:
                weights.release(held)
                raise
            payload = {k: v for h in held for k, v in h.payload.items()}
            places = tuple((h.pack, h.alloc.block, h.alloc.offset) for h in held)
            rec = self._cached((si, oi, e, m, ps.T, ps.layout, places), f"expert {e}",
                               lambda rec, e=e, m=m, payload=payload: self.graph_ops.moe_expert(
                                   rec, op, ps, payload, e, m, self.route, e * t, wbase + e * t))
            inflight.add(rec, held)
            if not resident:   # as PassRunner.run_step: queued work keeps the device busy, pins stay bounded
                if inflight.pinned(pending_only=True) > pin_limit // 4:
                    inflight.flush(weights, wait=False)
                if inflight.pinned() > pin_limit:
                    inflight.flush(weights, wait=False)
                    inflight.release_oldest(weights, pin_limit // 2)

    def _combine(self, rec: Recorder, op: dict[str, Any], ps: PassState) -> None:
        t, n = ps.rows(), len(op["attrs"]["experts"])
        self.graph_ops.moe_combine(rec, op, ps, self.route, n * t, (n + 1) * t + n * t)

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
        for b in (self.readback, self.route):
            if b is not None:
                b.destroy()
        self.readback = self.route = None
