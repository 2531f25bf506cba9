"""Eviction by the access graph: the pack used farthest in the future goes first (Belady).

A forward pass touches packs in an order the archive states in advance, and decode repeats
it token after token. Knowing the sequence, the optimal victim is the resident pack whose
next use is farthest away. LRU is kept as the baseline the benchmark compares against: on a
cycle longer than the cache it evicts exactly the pack needed next.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

NEVER = 1 << 60   # the distance of a pack never used again: the best victim


class AccessSchedule:
    """The cyclic sequence of pack uses of one forward pass; positions index into it.

    A backend that computes some steps from weights it holds itself (the hybrid plan's CPU steps)
    reads fewer packs in some passes: `use(skipped)` makes the next passes' schedule leave those
    positions out (prefetch skips them, eviction does not count them as uses), while every position
    keeps its index."""

    def __init__(self, sequence: list[int], gathered: set[int] | None = None):
        if not sequence:
            raise ValueError("empty access sequence")
        self.sequence = sequence
        # positions of gather steps (embedding rows): only the packs holding the tokens' rows are
        # read there, which is unknown in advance, so the prefetch window skips them
        self.gathered = gathered or set()
        self.length = len(sequence)
        self._all_gathered = self.gathered
        self._modes: dict[frozenset[int], tuple[dict[int, list[int]], set[int]]] = {}
        self.skipped: frozenset[int] = frozenset()
        self._positions = self._mode(self.skipped)[0]
        self.experts: ExpertHeat | None = None   # next uses of the packs a moe op chooses at run time
        # prefetch windows already worked out: (skipped, position, n) -> packs (a MoE pass asks for the
        # window at each of its ~600 acquires a token, mostly at the same few positions)
        self._windows: dict[tuple[frozenset[int], int, int], list[int]] = {}

    def _mode(self, skipped: frozenset[int]) -> tuple[dict[int, list[int]], set[int]]:
        mode = self._modes.get(skipped)
        if mode is None:
            positions: dict[int, list[int]] = {}
            for i, p in enumerate(self.sequence):
                if i not in skipped:
                    positions.setdefault(p, []).append(i)
            mode = self._modes[skipped] = (positions, self._all_gathered | skipped)
        return mode

    def use(self, skipped: frozenset[int]) -> None:
        """From now on the passes leave the uses at `skipped` positions out (an empty set: none)."""
        if skipped != self.skipped:
            self._positions, self.gathered = self._mode(skipped)
            self.skipped = skipped

    def next_use(self, pack: int, cursor: int) -> int:
        """Distance from `cursor` to the next use of `pack` at or after it (wrapping to the next token)."""
        pos = self._positions.get(pack)
        if not pos:
            if self.experts is not None and pack in self.experts.op_of:
                return self.experts.next_use(pack, cursor)
            return NEVER
        c = cursor % self.length
        i = bisect.bisect_left(pos, c)
        return pos[i] - c if i < len(pos) else pos[0] + self.length - c

    def first_uses(self) -> dict[int, int]:
        """Each pack's first position in the pass (every use counted), in the order packs are first used."""
        return {p: pos[0] for p, pos in self._mode(frozenset())[0].items()}

    def upcoming(self, cursor: int, n: int) -> list[int]:
        """The next `n` distinct packs from `cursor` on (the prefetch window; not to be modified)."""
        key = (self.skipped, cursor % self.length, n)
        got = self._windows.get(key)
        if got is not None:
            return got
        out: list[int] = []
        seen: set[int] = set()
        seq, gathered, length = self.sequence, self.gathered, self.length
        for k in range(min(length, 4 * n + 8)):
            pos = (cursor + k) % length
            if pos in gathered:
                continue
            p = seq[pos]
            if p not in seen:
                seen.add(p)
                out.append(p)
                if len(out) == n:
                    break
        self._windows[key] = out
        return out


class ExpertHeat:
    """Expected next uses of expert packs, which the access sequence cannot state (a router picks them).

    Each moe op keeps, per expert, a decayed share of the recent passes that chose it (`q`, an exponential
    moving average of 0/1 per pass). An expert chosen with probability q per pass is next used, on average,
    1/q passes on: the distance to its op plus (1/q - 1) whole passes. So hot experts rank with the packs
    Belady keeps and cold ones go first, in the same units as the schedule's own distances. Packs the op
    has just chosen (and those `predict` expects at the next moe op) count as used at their op."""

    def __init__(self, options: dict[tuple[int, int], list[list[int]]], k: dict[tuple[int, int], int],
                 positions: dict[tuple[int, int], int], length: int, decay: float = 0.9):
        self.length = length
        self.decay = decay
        self.options = options                         # (step, op) -> each expert's packs
        self.k = k                                     # (step, op) -> experts chosen per row
        self.position = positions                      # (step, op) -> the op's position in the pass
        self.order = sorted(options, key=lambda k: positions[k])   # moe ops in pass order
        self.op_of: dict[int, tuple[tuple[int, int], int]] = {}    # pack -> ((step, op), expert)
        for key, opts in options.items():
            for e, packs in enumerate(opts):
                for p in packs:
                    self.op_of[p] = (key, e)
        self.q = {key: [0.0] * len(opts) for key, opts in options.items()}
        self.last: dict[tuple[int, int], list[int]] = {}   # each op's latest choice
        # (pack -> position where it is used next: chosen now, or predicted; where that was set): an entry
        # holds until the cursor passes its position. One tuple, swapped in whole: loading threads read it.
        self.soon: tuple[dict[int, int], int] = ({}, 0)

    def chose(self, key: tuple[int, int], experts: list[int]) -> None:
        """Op `key` chose `experts` in this pass: decay every expert's share, raise the chosen ones'."""
        q, d = self.q[key], self.decay
        chosen = set(experts)
        for e in range(len(q)):
            q[e] = q[e] * d + (1.0 - d) * (e in chosen)
        self.last[key] = sorted(chosen)
        pos = self.position[key]
        self.soon = ({p: pos for e in chosen for p in self.options[key][e]}, pos)

    def predict(self, key: tuple[int, int], how: str) -> list[int]:
        """The packs op `key` is expected to choose next: its previous choice ("last") or its k most chosen
        experts so far ("popular"); they count as used at that op from now on."""
        if how == "last":
            experts = self.last.get(key, [])
        else:
            q = self.q[key]
            experts = [e for e in sorted(range(len(q)), key=lambda e: -q[e])[:self.k[key]] if q[e] > 0]
        pos = self.position[key]
        packs = [p for e in experts for p in self.options[key][e]]
        soon, since = self.soon
        self.soon = ({**soon, **{p: pos for p in packs}}, since)
        return packs

    def next_op(self, key: tuple[int, int]) -> tuple[int, int]:
        """The moe op after `key` in pass order (the first one after the last)."""
        i = self.order.index(key)
        return self.order[(i + 1) % len(self.order)]

    def next_use(self, pack: int, cursor: int) -> int:
        key, e = self.op_of[pack]
        pos, c = self.position[key], cursor % self.length
        soon, since = self.soon
        at = soon.get(pack)
        if at is not None and (at - c) % self.length <= (at - since) % self.length:
            return (at - c) % self.length
        q = self.q[key][e]
        if q <= 0.0:
            return NEVER
        d = (pos - c) % self.length or self.length   # at its op and not chosen: a pass away at least
        return d + int(self.length * (1.0 / q - 1.0))


class BeladyPolicy:
    """Evict the resident pack whose next use is farthest."""

    name = "graph"

    def __init__(self, schedule: AccessSchedule):
        self.schedule = schedule

    def victim(self, candidates: Iterable[int], cursor: int) -> int | None:
        best, best_d = None, -1
        for p in candidates:
            d = self.schedule.next_use(p, cursor)
            if d > best_d:
                best, best_d = p, d
        return best

    def cost(self, pack: int, nbytes: int, cursor: int, next_use: int | None = None) -> float:
        """Price of evicting `pack` now: bytes we will have to stream back, discounted by how far off
        (`next_use`: its distance, when the caller has it already)."""
        d = self.schedule.next_use(pack, cursor) if next_use is None else next_use
        return nbytes / (1 + d)

    def touch(self, pack: int) -> None:
        pass


class LRUPolicy:
    """Least recently used: the baseline that graph-aware eviction is measured against."""

    name = "lru"

    def __init__(self, schedule: AccessSchedule | None = None):
        self.schedule = schedule
        self._clock = 0
        self._last: dict[int, int] = {}

    def victim(self, candidates: Iterable[int], cursor: int) -> int | None:
        cands = list(candidates)
        return min(cands, key=lambda p: self._last.get(p, -1)) if cands else None

    def cost(self, pack: int, nbytes: int, cursor: int, next_use: int | None = None) -> float:
        return float(self._last.get(pack, -1) + 1)

    def touch(self, pack: int) -> None:
        self._clock += 1
        self._last[pack] = self._clock


POLICIES = {"graph": BeladyPolicy, "lru": LRUPolicy}
