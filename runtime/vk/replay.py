"""Recording steps once and replaying them: how a pass reaches the device with little Python.

Each graph step is recorded into one command buffer, keyed by what the recording depends on (the
pass shape, where its packs and KV caches are). A pass whose packs have not moved since the last
pass of the same shape is *fast*: the next time it is recorded whole, every step but the embedding
gather in ONE command buffer (the gather too where the whole table is resident back to back), and
from then on replayed as one submission, with no per-step Python and no gaps between command
buffers. Steps are submitted without waiting; the packs they read stay pinned until their fence
signals (inflight.py). A pass over a step with a `moe` op is never fast: its experts are chosen per
pass (moe.py), so such passes run step by step, each step's recording reused.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, NamedTuple

from .graph_ops import GraphOps, Payload, merged_parts
from .inflight import InFlight
from .layout import PassState
from .moe import MoeSteps
from .recorder import Recorder
from .streamed import run_streamed

MAX_CACHED_RECORDINGS = 1024
MAX_FAST_SHAPES = 4  # replayable pass shapes kept (decode of a few session sizes, a prefill)


class FastPass(NamedTuple):
    """A pass shape whose packs have not moved since its steps were recorded."""

    version: int                  # the tier's version then
    recs: dict[int, Recorder]     # step index -> its recording (gather steps excepted)
    whole: Recorder | None        # all of them in one command buffer, made on the next such pass
    gathers_inside: bool          # `whole` holds the embedding gathers too


class PassRunner:
    """Runs a pass's steps on the device, recording or replaying them."""

    def __init__(self, dev: Any, graph_ops: GraphOps, inflight: InFlight, pack_bytes: Any,
                 steps: list[dict[str, Any]] | None = None):
        self.dev = dev
        self.graph_ops = graph_ops
        self.tensors = graph_ops.tensors
        self.inflight = inflight
        self.pack_bytes = pack_bytes
        self.tier: Any = None
        self.resident = False
        self._cache: OrderedDict[tuple, Recorder] = OrderedDict()
        self._payloads: dict[int, Payload] = {}   # id(recording) -> the weights it was recorded from
        # pass shape -> its replayable pass, for the few latest stable shapes (a request's prefill
        # does not drop the decode pass of the session before it)
        self._fast: OrderedDict[Any, FastPass] = OrderedDict()
        self.last_fast: FastPass | None = None   # the replayable pass the last pass used (VulkanBackend.last_replay)
        self._pass_recs: dict[int, Recorder] = {}
        self._step_bytes: dict[int, int] = {}    # pack bytes each step pins
        self.host_seconds = 0.0   # Python time recording/keying steps
        self.moe = MoeSteps(dev, graph_ops, inflight, steps or [])   # the steps holding moe ops

    @property
    def pin_limit(self) -> int:
        """Pack bytes that in-flight steps may keep pinned: a step bigger than this is streamed. Streaming: a
        quarter of the room the reservations leave (32 sessions' KV caches can take most of a budget, and a
        window of a quarter of the whole budget then pinned all the packs' room: a BudgetError mid-pass)."""
        return self.tier.budget if self.resident else (self.tier.budget - self.tier.reserved) // 4

    # ---- a pass ----
    def run_pass(self, steps: list[dict[str, Any]], ps: PassState, weights: Any, order: range | None = None) -> None:
        """The steps `order` of one pass (default: all): replayed as one command buffer when fast,
        else step by step. A hybrid plan runs a pass's steps in a few such ranges."""
        order = range(len(steps)) if order is None else order
        if self.moe.steps and not self.moe.steps.isdisjoint(order):
            self._run_moe_pass(steps, ps, weights, order)
            return
        tier = self.tier
        shape = (ps.T, ps.layout, order.start, order.stop)
        fast = self._fast.get(shape)
        if fast is not None and fast.version != tier.version:
            self._drop_fast(shape)  # packs moved since: record again
            fast = None
        if fast is not None:
            self._fast.move_to_end(shape)
            tier.frozen = True  # the replay pins nothing: prefetch may neither place nor evict now
            try:
                if fast.whole is None:
                    gathers = self._resident_gathers(steps, order) if self.resident else None
                    whole = self._record_whole_pass(steps, ps, fast.recs, gathers, order)
                    self._fast[shape] = fast = fast._replace(whole=whole, gathers_inside=gathers is not None)
                    if gathers is None and self.resident and ps.T == 1:
                        self._prerecord_gathers(steps, ps, order)
                self._replay_pass(steps, ps, weights, fast.whole, order, gathers_inside=fast.gathers_inside)
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
        for si in order:
            self.run_step(si, steps[si], ps, weights)
        self.inflight.flush(weights, wait=False)
        recs = {si: r for si, r in self._pass_recs.items() if not steps[si].get("gather")}
        cached = set(self._cache.values())
        stable = tier.version == v0 and len(recs) == sum(1 for si in order if not steps[si].get("gather"))
        gathers_first = all(not steps[si].get("gather") for si in order if si >= min(recs, default=order.start))
        if stable and gathers_first and all(r in cached for r in recs.values()):
            self._fast[shape] = FastPass(tier.version, recs, None, False)
            while len(self._fast) > MAX_FAST_SHAPES:
                self._drop_fast(next(iter(self._fast)))

    def _run_moe_pass(self, steps: list[dict[str, Any]], ps: PassState, weights: Any, order: range) -> None:
        """Step by step, never made fast: a moe step waits for its router mid-pass (moe.py); the
        other steps' recordings are reused as usual."""
        self.last_fast = None
        self._pass_recs = {}
        for si in order:
            if si in self.moe.steps:
                self.moe.run_step(si, steps[si], ps, weights, self.pin_limit, self.resident)
            else:
                self.run_step(si, steps[si], ps, weights)
        self.inflight.flush(weights, wait=False)

    def run_step(self, si: int, step: dict[str, Any], ps: PassState, weights: Any) -> None:
        """Record (or reuse the recording of) one step; queue it, its packs pinned until it is done."""
        step_bytes = self._step_bytes.get(si)
        if step_bytes is None:
            step_bytes = self._step_bytes[si] = sum(self.pack_bytes(p) for p in step["packs"])
        if step_bytes > self.pin_limit:
            run_streamed(self.dev, self.graph_ops, self.inflight, self.pin_limit, self.pack_bytes,
                         si, step, ps, weights)
            return
        t0 = time.perf_counter()
        held = weights.hold_step(si, step, ps.tokens if step.get("gather") else None)
        key = self._step_key(si, step, ps, held)
        rec = self._cache.get(key)
        if rec is None:
            payload = {k: v for e in held for k, v in e.payload.items()}
            rec = self._record(step, ps, payload)
            self._cache[key] = rec
            if len(self._cache) > MAX_CACHED_RECORDINGS:
                _key, old = self._cache.popitem(last=False)
                for sh, entry in list(self._fast.items()):
                    if old in entry.recs.values():
                        self._drop_fast(sh)
                self._retire(old)
        else:
            self._cache.move_to_end(key)
        inflight = self.inflight
        inflight.add(rec, held)
        self.host_seconds += time.perf_counter() - t0
        self._pass_recs[si] = rec
        if not self.resident:  # resident: every pack was loaded at start, nothing to fetch or unpin
            weights.prefetch_ahead()
            # Streamed: submit in quarter-limit batches and, over the limit, wait only for the oldest
            # steps, so that the GPU keeps queued work while this thread pins the next packs and moves
            # the prefetch window (waiting for every step in flight left the copy engine idle).
            if inflight.pinned(pending_only=True) > self.pin_limit // 4:
                inflight.flush(weights, wait=False)
            if inflight.pinned() > self.pin_limit:
                inflight.flush(weights, wait=False)
                inflight.release_oldest(weights, self.pin_limit // 2)

    # ---- recordings ----
    def _record(self, step: dict[str, Any], ps: PassState, payload: Payload) -> Recorder:
        rec = Recorder(self.dev, label=step["name"])
        self.graph_ops.record(rec, step, ps, payload)
        rec.finish()
        self._payloads[id(rec)] = payload  # for re-recording the step into a whole-pass command buffer
        return rec

    @staticmethod
    def _step_key(si: int, step: dict[str, Any], ps: PassState, held: list[Any]) -> tuple:
        """What a step's recording depends on: the pass shape, where its packs are and, except for
        the embedding gather (ids and activations only), where each sequence's KV cache is."""
        layout = ps.layout[-1:] if step.get("gather") else ps.layout
        return (si, ps.T, layout, tuple((e.pack, e.alloc.block, e.alloc.offset) for e in held))

    def _prerecord_gathers(self, steps: list[dict[str, Any]], ps: PassState, order: range) -> None:
        """Resident decode: record the embedding gather once per embedding pack now, so that no
        later token pays for a recording when its row lies in a pack not seen yet."""
        for si in order:
            step = steps[si]
            if not step.get("gather"):
                continue
            packs = {p.pack for op in step["ops"] for name in op["w"] for p in self.tensors[name].parts}
            for pack in sorted(packs):
                e = self.tier.entries.get(pack)
                if e is None:
                    continue
                key = self._step_key(si, step, ps, [e])
                if key in self._cache:
                    continue
                self._cache[key] = self._record(step, ps, e.payload)
                self._cache.move_to_end(key, last=False)  # evicted before the steps' recordings

    def _record_whole_pass(self, steps: list[dict[str, Any]], ps: PassState, recs: dict[int, Recorder],
                           gathers: dict[int, Payload] | None, order: range) -> Recorder:
        """Every non-gather step of the pass, in order, in one command buffer (same packs, same
        activation layout as the per-step recordings it is made from); with `gathers` (payloads
        of gather steps over their whole tables) the embedding gathers too."""
        whole = Recorder(self.dev, label="pass")
        for si in order:
            step = steps[si]
            payload = self._payloads[id(recs[si])] if si in recs else (gathers or {}).get(si)
            if payload is not None:
                self.graph_ops.record(whole, step, ps, payload)
        return whole.finish()

    def _resident_gathers(self, steps: list[dict[str, Any]], order: range) -> dict[int, Payload] | None:
        """Payloads for the gather steps that read each table as ONE weight: possible when all its
        row-parts are resident back to back (packs placed in order at start). Then the embedding
        gather needs no per-token choice of pack and joins the whole-pass recording."""
        out: dict[int, Payload] = {}
        for si in order:
            step = steps[si]
            if not step.get("gather"):
                continue
            payload: Payload = {}
            for op in step["ops"]:
                for name in op["w"]:
                    t = self.tensors[name]
                    ws = []
                    for p in t.parts:
                        e = self.tier.entries.get(p.pack)
                        ws.append((p.row_start, p.row_end, e.payload.get((name, p.row_start)) if e else None))
                    merged = merged_parts(ws)
                    if len(merged) != 1 or merged[0][0] != 0 or merged[0][1].rows != t.shape[0]:
                        return None
                    payload[(name, 0)] = merged[0][1]
            out[si] = payload
        return out

    def _replay_pass(self, steps: list[dict[str, Any]], ps: PassState, weights: Any,
                     whole: Recorder, order: range, gathers_inside: bool = False) -> None:
        """Gather steps (the embedding rows of this pass's tokens) run keyed by their packs as
        usual (unless the whole-pass recording holds them), then the whole-pass recording. The
        packs are resident and the tier frozen."""
        self._pass_recs = {}
        if not gathers_inside:
            for si in order:
                if steps[si].get("gather"):  # all before the first other step (checked when it became fast)
                    self.run_step(si, steps[si], ps, weights)
        self.inflight.add(whole)
        self._pass_recs[len(steps)] = whole
        self.inflight.flush(weights, wait=False)

    def _drop_fast(self, shape: Any = None) -> None:
        """Forget the replayable pass of `shape` (all of them when None)."""
        for sh in list(self._fast) if shape is None else [shape]:
            entry = self._fast.pop(sh, None)
            if entry is not None and entry.whole is not None:
                self._retire(entry.whole)

    def _retire(self, rec: Recorder) -> None:
        self._payloads.pop(id(rec), None)
        self.inflight.retire(rec)

    def close(self) -> None:
        """Destroy every recording (the device must be idle)."""
        self.moe.close()
        self._drop_fast()
        for rec in self._cache.values():
            rec.destroy()
        self._cache.clear()
        self._payloads.clear()
