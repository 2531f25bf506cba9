"""A mixture of experts' prefill on the Vulkan backend: the chosen experts grouped (runtime/vk/moe.py's
`MoeSteps` mixes this in; docs/VULKAN.md "Grouped experts").

Past MoE's batched slots, each chosen expert would be its own recording, keyed by its rows and places: a
512-token pass of a 128-expert, 48-layer model records ~6,000 a pass. Here the pass's (row, expert) slots,
in expert order, are cut into chunks between experts, each one recording whatever the router chose:
moe_matmul.comp tiles each expert's rows, reading its weights through a table of tier places.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .graph_ops import MOE_G, MOE_U, MOE_Y
from .kernels import BufferSlice
from .layout import PassState
from .ops import MOE_GROUP_SLOTS
from .recorder import Recorder

CHUNK_SLOTS = 512    # a chunk's slots at most (and at most the pass's rows: its products go through the pass's
                     # per-expert scratch, moe_g/moe_u/moe_y, sized for that many)
TABLE_REGIONS = 16   # chunk tables the host writes ahead; past them it waits for the device to read the oldest


def region_uints(n_experts: int) -> tuple[int, int]:
    """(groups per role, uints) of one chunk's table: R, rows[S], offsets[S + 1], slot[S], w[S], xrow[S]
    (S = CHUNK_SLOTS), then gate, up and down's groups."""
    groups = CHUNK_SLOTS // MOE_GROUP_SLOTS + n_experts
    return groups, 2 + 5 * CHUNK_SLOTS + 12 * groups


class GroupedExperts:
    """`MoeSteps`' grouped prefill (uses its table buffers, tier blocks, recording cache and `_uses`)."""

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
