"""Executes the archive's access graph: steps of ops, each weight part acquired just in time.

Nothing here knows an architecture: the op list, the tensors each op reads and the packs
holding them all come from the index. The executor acquires weights one tensor part at a
time, so the smallest workable budget is about two packs plus the KV cache and activations,
not a whole layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import Backend, PassInputs
from .policy import AccessSchedule, ExpertHeat

if TYPE_CHECKING:
    from ..pack_format.reader import Archive
    from .prefetch import PackLoader
    from .tiers import Entry


def access_sequence(graph: dict[str, Any], tensors: dict[str, Any]) -> tuple[list[int], dict[tuple[int, int, str, int], int]]:
    """Pack uses of one forward pass in execution order, and each (step, op, tensor, part)'s position.

    A moe op's experts are a choice made at run time (docs/FORMAT.md, step `choices`): their packs are not
    in the sequence (nothing knows when they are next used), and their parts sit at the op's last position."""
    seq: list[int] = []
    where: dict[tuple[int, int, str, int], int] = {}
    for si, step in enumerate(graph["steps"]):
        for oi, op in enumerate(step["ops"]):
            for name in op["w"]:
                for pi, part in enumerate(tensors[name].parts):
                    if not seq or seq[-1] != part.pack:
                        seq.append(part.pack)
                    where[(si, oi, name, pi)] = len(seq) - 1
            for names in op["attrs"].get("experts", ()) if op["op"] == "moe" else ():
                for name in names:
                    for pi in range(len(tensors[name].parts)):
                        where[(si, oi, name, pi)] = len(seq) - 1
    return seq, where


class ExpertCounts:
    """How often the experts a moe op chose were resident in the tier (hits) or had to be loaded (misses)."""

    def __init__(self, graph: dict[str, Any]):
        # (step, op) -> the packs of each expert, from the steps' choice records
        self.options = {(si, c["op"]): c["options"] for si, s in enumerate(graph["steps"]) for c in s.get("choices", ())}
        self.hits = 0
        self.misses = 0

    def count(self, si: int, oi: int, experts: list[int], resident: Any) -> list[int]:
        """Count `experts` as hits or misses; returns the hits (every pack of theirs in `resident`)."""
        options = self.options[(si, oi)]
        hits = [e for e in experts if all(p in resident for p in options[e])]
        self.hits += len(hits)
        self.misses += len(experts) - len(hits)
        return hits

    def as_dict(self) -> dict[str, Any]:
        uses = self.hits + self.misses
        return {"expert_hits": self.hits, "expert_misses": self.misses,
                "expert_hit_rate": self.hits / uses if uses else 1.0}


def expert_heat(graph: dict[str, Any], where: dict[tuple[int, int, str, int], int], length: int) -> ExpertHeat | None:
    """The heat of the graph's moe ops' experts (None without any): their packs and each op's position."""
    options, k, positions = {}, {}, {}
    for si, step in enumerate(graph["steps"]):
        for c in step.get("choices", ()):
            key = (si, c["op"])
            options[key], k[key] = c["options"], c["k"]
            positions[key] = where[(si, c["op"], step["ops"][c["op"]]["attrs"]["experts"][0][0], 0)]
    return ExpertHeat(options, k, positions, length) if options else None


def seq_row_activations(steps: list[dict[str, Any]]) -> set[str]:
    """Activations with one row per sequence rather than per token: those written only after a
    `last_token` op (the head's normed rows and the logits). Widths come from the archive
    (`Archive.activation_widths`); rows from where in the pass an activation is written."""
    per_token: set[str] = set()
    written_after: set[str] = set()
    after_last = False
    for step in steps:
        for op in step["ops"]:
            if op["op"] == "embed":
                after_last = False
            if op["op"] != "last_token":
                (written_after if after_last else per_token).add(op["out"])
            else:
                written_after.add(op["out"])
                after_last = True
    return written_after - per_token


class WeightAccess:
    """How a backend's forward pass gets weights: it names a (step, op, tensor, part) of the graph,
    and this pins the pack holding it (loading it if needed) and moves the prefetch window on."""

    holds_every_weight = False   # packs come and go with the tier (HeldWeights, the hybrid's, holds them all)

    def __init__(self, loader: PackLoader, where: dict[tuple[int, int, str, int], int]):
        self.loader = loader
        self.tensors = loader.archive.tensors
        self.where = where
        self.last_position = 0
        self.experts = ExpertCounts(loader.archive.graph)
        self.heat = expert_heat(loader.archive.graph, where, loader.schedule.length)
        loader.schedule.experts = self.heat   # eviction ranks expert packs by how often they are chosen
        # load the experts expected at the next moe op when one chooses (None, "last" or "popular"): off, as
        # measured on the tiny models (docs/ARCHITECTURE.md, "Experts in the tiers")
        self.expert_prefetch: str | None = None
        self._starts: dict[str, np.ndarray] = {}
        self._skips: dict[frozenset[int], frozenset[int]] = {frozenset(): frozenset()}

    def leave_out(self, steps: frozenset[int]) -> None:
        """The next passes read no weights of `steps` through the tier (the backend holds them):
        the schedule skips their uses, so that prefetch does not load them and eviction does not
        keep them."""
        skipped = self._skips.get(steps)
        if skipped is None:
            skipped = self._skips[steps] = frozenset(pos for (si, _o, _n, _p), pos in self.where.items() if si in steps)
        self.loader.schedule.use(skipped)

    def position(self, si: int, oi: int, name: str, part_idx: int) -> int:
        """Where that use sits in the pass's access sequence."""
        return self.where[(si, oi, name, part_idx)]

    def acquire(self, si: int, oi: int, name: str, part_idx: int) -> Entry:
        """Pin the pack holding that part; `release` it when the work reading it is done."""
        pos = self.where[(si, oi, name, part_idx)]
        e = self.loader.acquire(self.tensors[name].parts[part_idx].pack, pos)
        self.last_position = pos
        return e

    def choose(self, si: int, oi: int, experts: list[int]) -> list[int]:
        """A moe op chose `experts` for this pass (each is read once, for every row that chose it): counted
        as hits or misses, and in the experts' heat (their eviction order); with `expert_prefetch`, the
        experts expected at the next moe op start loading. Returns the hits: the experts the tier holds."""
        hits = self.experts.count(si, oi, experts, self.loader.tier.entries)
        heat = self.heat
        if heat is not None:
            heat.chose((si, oi), experts)
            if self.expert_prefetch:
                pos = heat.position[(si, oi)]
                self.loader.prefetch_now([(p, pos) for p in heat.predict(heat.next_op((si, oi)),
                                                                           self.expert_prefetch)])
        return hits

    def release(self, entries: list[Entry]) -> None:
        for e in entries:
            self.loader.release(e)

    @contextmanager
    def part(self, si: int, oi: int, name: str, part_idx: int) -> Iterator[Any]:
        """`with weights.part(si, oi, name, i) as w:` the backend's form of that part, pinned meanwhile."""
        e = self.acquire(si, oi, name, part_idx)
        try:
            yield e.payload[(name, self.tensors[name].parts[part_idx].row_start)]
        finally:
            self.loader.release(e)

    def hold_step(self, si: int, step: dict[str, Any], gather_tokens: np.ndarray | None) -> list[Entry]:
        """Acquire (pin) every pack of a step, in access order, for a backend that runs the step
        asynchronously; with `gather_tokens`, only the parts holding those embedding rows."""
        tensors = self.tensors
        todo: list[tuple[int, int]] = []   # (pack, position), in access order
        seen: set[int] = set()
        for oi, op in enumerate(step["ops"]):
            for name in op["w"]:
                parts = tensors[name].parts
                idx = range(len(parts)) if gather_tokens is None else self.parts_of_rows(name, gather_tokens)
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
        held: list[Entry] = []
        try:
            for pack, pos in todo:
                held.append(self.loader.acquire(pack, pos))
                self.last_position = pos
        except BaseException:
            self.release(held)   # no pin outlives a failed hold (a caller may go on op by op)
            raise
        return held

    def load_side_by_side(self, uses: list[tuple[int, int, str, int]]) -> None:
        """Start loading the packs of these (step, op, tensor, part) uses now, in parallel."""
        self.loader.prefetch_now([(self.tensors[n].parts[pi].pack, self.where[(si, oi, n, pi)])
                                  for si, oi, n, pi in uses])

    def prefetch_ahead(self) -> None:
        """Move the prefetch window to just after the last acquired use."""
        self.loader.prefetch(self.last_position)

    def prefetch_bytes(self, nbytes: int) -> None:
        """Start loading the packs of the next `nbytes` of the schedule after the last acquired use, side
        by side: the link's work while the pass computes elsewhere (a hybrid plan's CPU steps) and no
        acquire moves the window on. Loads that would evict something needed sooner are skipped."""
        loader = self.loader
        todo, total = [], 0
        for pack in loader.schedule.upcoming(self.last_position + 1, loader.schedule.length):
            if total >= nbytes:
                break
            todo.append((pack, self.last_position))
            total += loader.backend.pack_bytes(pack)
        loader.prefetch_now(todo)

    def parts_of_rows(self, name: str, rows: np.ndarray) -> list[int]:
        """Indices of the row-parts of `name` holding `rows` (a table of 100 parts is searched, not scanned)."""
        parts = self.tensors[name].parts
        starts = self._starts.get(name)
        if starts is None:
            starts = self._starts[name] = np.array([p.row_start for p in parts], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        return [int(i) for i in np.unique(which) if i >= 0 and np.any(rows[which == i] < parts[i].row_end)]


class OpWeights:
    """One op's view of `WeightAccess`: `with w.part(name, i) as arr:` (for op-by-op backends)."""

    __slots__ = ("oi", "si", "weights")

    def __init__(self, weights: WeightAccess, si: int, oi: int):
        self.weights, self.si, self.oi = weights, si, oi

    def part(self, name: str, part_idx: int) -> AbstractContextManager[Any]:
        return self.weights.part(self.si, self.oi, name, part_idx)

    def choose(self, experts: list[int]) -> None:
        self.weights.choose(self.si, self.oi, experts)


class Executor:
    """Runs passes: stacks the sequences' rows into `PassInputs` and hands them to the backend."""

    def __init__(self, archive: Archive, backend: Backend, loader: PackLoader,
                 where: dict[tuple[int, int, str, int], int]):
        self.backend = backend
        self.weights = WeightAccess(loader, where)
        self.output = archive.graph["outputs"][0]

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
        inputs = PassInputs(
            tokens=np.concatenate([np.asarray(t, dtype=np.int64) for t, _, _ in seqs]),
            positions=np.concatenate([np.arange(p, p + len(t), dtype=np.int64) for t, p, _ in seqs]),
            seqs=rows, output=self.output)
        self.weights.leave_out(self.backend.host_steps(len(inputs.tokens)))
        return self.backend.forward(inputs, self.weights)


def make_schedule(graph: dict[str, Any], tensors: dict[str, Any]) -> tuple[AccessSchedule, dict]:
    seq, where = access_sequence(graph, tensors)
    gather_steps = {si for si, s in enumerate(graph["steps"]) if s.get("gather")}
    gathered = {pos for (si, _oi, _n, _pi), pos in where.items() if si in gather_steps}
    return AccessSchedule(seq, gathered), where
