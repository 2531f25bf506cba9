"""A mixture of experts' router on the device, where the tier holds every expert (runtime/vk/moe.py's
`MoeSteps` mixes this in; docs/VULKAN.md "Routing on the device").

The host's routing costs a fence wait per moe op and pass (the router's logits read back) and the host's
work while the device idles. With every expert resident, moe_route.comp picks the top k and writes the
batched experts' table itself from a table of each expert's tier places: a decode's moe step is one cached
recording; the chosen experts are read back after the pass, for the statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .graph_ops import MOE_LOGITS
from .layout import PassState
from .ops import MOE_BATCH_SLOTS as MAX_SLOTS
from .recorder import Recorder


class DeviceRouting:
    """`MoeSteps`' routing on the device (uses its places, ids and device table buffers, tier blocks and
    recording cache)."""

    def _routable(self, si: int, pieces: list[tuple[list[dict[str, Any]], dict[str, Any], int]], ps: PassState,
                  weights: Any) -> bool:
        """Whether this step's moe ops can route on the device: every expert of each in the tier (its places
        written for the tier as it is now), each batchable, few enough slots, no CPU share."""
        if self.places is None or not self.blocks or self.offload is not None:
            return False
        for _before, op, oi in pieces:
            a = op["attrs"]
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

    def _run_routed(self, si: int, step: dict[str, Any], pieces: list[tuple[list[dict[str, Any]], dict[str, Any], int]],
                    after: list[dict[str, Any]], ps: PassState, payload: dict, held: list[Any], shape: tuple) -> None:
        """The whole step as one cached recording: for each moe op, the ops before it, its router's logits, the
        top-k and table on the device, the batched experts and the shared expert; then the ops after."""
        go, o = self.graph_ops, self.graph_ops.ops
        t = ps.rows()

        def record(rec: Recorder) -> None:
            for ops_before, op, oi in pieces:
                a = op["attrs"]
                n, k = len(a["experts"]), a["k"]
                for x in ops_before:
                    go.record_op(rec, x, ps, payload)
                go.moe_router(rec, op, ps, payload, None)
                i = self._ops[(si, oi)]
                o.moe_route(rec, ps.buf(MOE_LOGITS), self.places, self._dtable, self._shared, self.ids, t, n, k,
                            a["router"] == "sigmoid", bool(a["norm"]), len(op["w"]) == 5, i * MAX_SLOTS,
                            self._pstride * i)
                self._record_batched(rec, self._dtable, self._batchable(si, oi, op), op, ps, t * k)
                go.moe_combine(rec, op, ps, self._shared, 0, t)
            for x in after:
                go.record_op(rec, x, ps, payload)
        rec = self._cached((si, "routed", len(self.blocks)) + shape, f"{step['name']}.routed", record)
        self.inflight.add(rec, held)
        self._pending += [(si, oi, t * op["attrs"]["k"]) for _b, op, oi in pieces]
        self.routed_on_device += len(pieces)

    def settle(self, weights: Any) -> None:
        """Count the experts the device chose in the passes now done (hits, heat), as the host's routing does."""
        ids = np.frombuffer(self.ids.view(), dtype=np.uint32) if self._pending else None
        for si, oi, slots in self._pending:
            i = self._ops[(si, oi)]
            weights.choose(si, oi, np.unique(ids[i * MAX_SLOTS:i * MAX_SLOTS + slots]).tolist())
        self._pending = []
