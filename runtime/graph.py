"""Executes the archive's access graph: steps of ops, each weight part acquired just in time.

Nothing here knows an architecture: the op list, the tensors each op reads and the packs
holding them all come from the index. The executor acquires weights one tensor part at a
time, so the smallest workable budget is about two packs plus the KV cache and activations,
not a whole layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .policy import AccessSchedule


def access_sequence(graph: dict[str, Any], tensors: dict[str, Any]) -> tuple[list[int], dict[tuple[int, int, str, int], int]]:
    """Pack uses of one forward pass in execution order, and each (step, op, tensor, part)'s position."""
    seq: list[int] = []
    where: dict[tuple[int, int, str, int], int] = {}
    for si, step in enumerate(graph["steps"]):
        for oi, op in enumerate(step["ops"]):
            for name in op["w"]:
                for pi, part in enumerate(tensors[name].parts):
                    if not seq or seq[-1] != part.pack:
                        seq.append(part.pack)
                    where[(si, oi, name, pi)] = len(seq) - 1
    return seq, where


class WeightAccess:
    """What a backend op sees: `with weights.part(op, name, i) as array:` pins that part's pack."""

    def __init__(self, loader: Any, where: dict[tuple[int, int, str, int], int]):
        self.loader = loader
        self.where = where
        self.step = 0
        self.op_index: dict[int, int] = {}
        self.last_position = 0
        self._starts: dict[str, np.ndarray] = {}

    def hold_step(self, si: int, step: dict[str, Any], gather_tokens: np.ndarray | None) -> list[Any]:
        """Acquire (pin) every pack of a step, in access order, for a backend that runs the step
        asynchronously; with `gather_tokens`, only the parts holding those embedding rows."""
        tensors = self.loader.archive.tensors
        todo: list[tuple[int, int]] = []   # (pack, position), in access order
        seen: set[int] = set()
        for oi, op in enumerate(step["ops"]):
            for name in op["w"]:
                parts = tensors[name].parts
                idx = range(len(parts)) if gather_tokens is None else self.parts_of_rows(name, parts, gather_tokens)
                for pi in idx:
                    pack = parts[pi].pack
                    if pack not in seen:
                        seen.add(pack)
                        todo.append((pack, self.where[(si, oi, name, pi)]))
        if gather_tokens is not None and len(todo) > 1:
            # the prefetch window skips gather steps (their rows are known only now): load the parts
            # these tokens need side by side, not one after the other (a 512-token prompt touches ~all
            # 76 parts of an 8B embedding: ~70 ms of serial loads per streamed prefill on the H100)
            self.loader.prefetch_now(todo)
        held: list[Any] = []
        for pack, pos in todo:
            held.append(self.loader.acquire(pack, pos))
            self.last_position = pos
        return held

    def parts_of_rows(self, name: str, parts: list[Any], rows: np.ndarray) -> list[int]:
        """Indices of the row-parts holding `rows` (a table of 100 parts is searched, not scanned)."""
        starts = self._starts.get(name)
        if starts is None:
            starts = self._starts[name] = np.array([p.row_start for p in parts], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        return [int(i) for i in np.unique(which) if i >= 0 and np.any(rows[which == i] < parts[i].row_end)]

    def release_entries(self, entries: list[Any]) -> None:
        for e in entries:
            self.loader.release(e)

    @contextmanager
    def part(self, op: dict[str, Any], name: str, part_idx: int) -> Iterator[Any]:
        oi = self.op_index[id(op)]
        pos = self.where[(self.step, oi, name, part_idx)]
        pack = self.loader.schedule.sequence[pos]
        e = self.loader.acquire(pack, pos)
        try:
            tensor = self.loader.archive.tensors[name]
            yield e.payload[(name, tensor.parts[part_idx].row_start)]
        finally:
            self.loader.release(e)


class Executor:
    def __init__(self, archive: Any, backend: Any, loader: Any, where: dict[tuple[int, int, str, int], int]):
        self.archive = archive
        self.backend = backend
        self.loader = loader
        self.weights = WeightAccess(loader, where)
        self.steps = archive.graph["steps"]

    def forward(self, tokens: np.ndarray, pos0: int, kv: list[tuple[Any, Any]]) -> np.ndarray:
        """One pass of one sequence over `tokens` at positions pos0..; returns its output rows."""
        return self.forward_batch([(tokens, pos0, kv)])

    def forward_batch(self, seqs: list[tuple[np.ndarray, int, list[tuple[Any, Any]]]]) -> np.ndarray:
        """One pass over several sequences at once, each (tokens, pos0, kv cache).

        Their rows are stacked, so every weight part is acquired once for the whole batch:
        one weight stream serves all sequences. Returns the graph's output, one row per
        sequence for last-token outputs (logits).
        """
        rows, r = [], 0
        for toks, pos0, kv in seqs:
            rows.append((r, r + len(toks), pos0, kv))
            r += len(toks)
        env: dict[str, Any] = {
            "tokens": np.concatenate([np.asarray(t, dtype=np.int64) for t, _, _ in seqs]),
            "positions": np.concatenate([np.arange(p, p + len(t), dtype=np.int64) for t, p, _ in seqs]),
            "seqs": rows,
        }
        out = self.archive.graph["outputs"][0]
        if hasattr(self.backend, "run_step"):  # a device backend records whole steps and runs them async
            self.backend.begin(env)
            try:
                self.backend.run_pass(self.steps, env, self.weights)
                return self.backend.finish(env, self.weights, out)
            except BaseException:
                self.backend.flush(self.weights)
                raise
        for si, step in enumerate(self.steps):
            self.weights.step = si
            self.weights.op_index = {id(op): oi for oi, op in enumerate(step["ops"])}
            for op in step["ops"]:
                self.backend.run(op, env, self.weights)
        return env[out]


def make_schedule(graph: dict[str, Any], tensors: dict[str, Any]) -> tuple[AccessSchedule, dict]:
    seq, where = access_sequence(graph, tensors)
    gather_steps = {si for si, s in enumerate(graph["steps"]) if s.get("gather")}
    gathered = {pos for (si, _oi, _n, _pi), pos in where.items() if si in gather_steps}
    return AccessSchedule(seq, gathered), where
