"""Automatic prefix caching: which KV session already holds a new sequence's first tokens.

As in vLLM's automatic prefix caching, token ids are cut into BLOCK-token blocks, each named by a hash
chained over every block before it, so one hash stands for the whole prefix up to its block. vkpack's
KV caches are one range per sequence (runtime/kv.py), not pages, so the index maps block hashes to
whole sessions ("holders"): the running sequences, and finished ones kept (least recently used first
out) while the device budget has room for them. A new sequence that shares k full blocks with a holder
copies those k * BLOCK positions into its own session (`KvSession.copy_from`, one `Backend.copy_kv`)
and prefills only the rest. Copying keeps every session contiguous, so the engine, the executor and
the kernels are unchanged; a copy of a 1,000-token prefix is a memcpy next to its prefill's weight pass.

Holders are released (evicted) oldest first when new work needs the room; the scheduler decides when
(runtime/server/batch.py), this module only what.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

BLOCK = 16   # tokens per block (vLLM's default): a hit reuses whole blocks only


@dataclass(eq=False)
class Holder:
    """A KV session (runtime/kv.py's KvSession, entered) whose first `written` positions hold `tokens[:written]`.

    tokens: the sequence's token ids (a running sequence's history list: it grows as it generates).
    hashes: the chained hash of each full block written so far.
    """

    tokens: list[int]
    session: Any
    written: int = 0
    hashes: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.session.reserved_bytes


def chain(tokens: Sequence[int], n_blocks: int, block: int = BLOCK, start: Sequence[int] = ()) -> list[int]:
    """The chained hashes of the first `n_blocks` blocks of `tokens`, going on from `start` (those of
    the first len(start) blocks, already known)."""
    out = list(start)
    prev = out[-1] if out else 0
    for i in range(len(out), n_blocks):
        prev = hash((prev, *tokens[i * block:(i + 1) * block]))
        out.append(prev)
    return out


class PrefixCache:
    """The block index over holders, the finished holders kept, and the cache's counters.

    Args:
        max_retained: most finished sessions kept at once (the budget may allow fewer).
        block: tokens per block.
    """

    def __init__(self, max_retained: int, block: int = BLOCK):
        self.block = block
        self.max_retained = max_retained
        self._by_hash: dict[int, dict[Holder, None]] = {}
        self.retained: OrderedDict[Holder, None] = OrderedDict()   # oldest use first
        self.hits = self.misses = self.evictions = 0

    # ---- the index ----
    def advance(self, h: Holder, written: int) -> None:
        """`h`'s cache now holds `h.tokens[:written]`: index its full blocks."""
        h.written = written
        full = written // self.block
        if full > len(h.hashes):
            known = len(h.hashes)
            h.hashes = chain(h.tokens, full, self.block, h.hashes)
            for x in h.hashes[known:]:
                self._by_hash.setdefault(x, {})[h] = None

    def forget(self, h: Holder) -> None:
        """Take `h` out of the index (its session is about to be released or was)."""
        for x in h.hashes:
            holders = self._by_hash.get(x)
            if holders is not None:
                holders.pop(h, None)
                if not holders:
                    del self._by_hash[x]
        h.hashes = []
        self.retained.pop(h, None)

    def candidates(self, tokens: Sequence[int], max_blocks: int) -> list[tuple[int, list[Holder]]]:
        """(blocks shared, holders sharing them) for each depth that some holder shares, deepest first."""
        out: list[tuple[int, list[Holder]]] = []
        prev = 0
        for i in range(max_blocks):
            prev = hash((prev, *tokens[i * self.block:(i + 1) * self.block]))
            holders = self._by_hash.get(prev)
            if not holders:
                break
            out.append((i + 1, list(holders)))
        return out[::-1]

    def find(self, tokens: Sequence[int], usable: Callable[[Holder, int], bool]) -> tuple[Holder | None, int]:
        """The holder sharing the most full blocks with `tokens`, leaving at least one token to feed (the
        next logits need a pass), and the positions it shares; (None, 0) when none. `usable(holder, n)`
        says whether a holder can still give n positions (a ring may have moved on: KvSession.serves).
        Tokens are compared too, so a hash collision can never hand over a wrong cache."""
        for blocks, holders in self.candidates(tokens, (len(tokens) - 1) // self.block):
            n = blocks * self.block
            for h in holders:
                if list(h.tokens[:n]) == list(tokens[:n]) and usable(h, n):
                    return h, n
        return None, 0

    def sharing(self, tokens: Sequence[int]) -> set[Holder]:
        """Retained holders that share at least one full block with `tokens` (to evict last)."""
        found = self.candidates(tokens, (len(tokens) - 1) // self.block)
        return {h for h in found[-1][1] if h in self.retained} if found else set()

    # ---- finished holders ----
    @property
    def retained_bytes(self) -> int:
        return sum(h.nbytes for h in self.retained)

    def retain(self, h: Holder) -> bool:
        """Keep finished `h` (its session stays reserved) if it holds a full block; returns whether it
        was kept. Kept holders whose blocks are a prefix of `h`'s go: `h` gives all they could, except
        where windowed layers keep rings (then `h`'s may no longer hold a shorter prefix's last rows)."""
        if not h.hashes or self.max_retained < 1:
            return False
        if not h.session.windows:
            for old in [o for o in self.retained if len(o.hashes) <= len(h.hashes)
                        and h.hashes[len(o.hashes) - 1] == o.hashes[-1]]:
                self.release(old)
        self.retained[h] = None
        while len(self.retained) > self.max_retained:
            self.evict()
        return True

    def touch(self, h: Holder) -> None:
        if h in self.retained:
            self.retained.move_to_end(h)

    def evict(self, keep: set[Holder] | frozenset[Holder] = frozenset()) -> bool:
        """Release the least recently used retained session, one not in `keep` if there is one;
        False when none is retained."""
        if not self.retained:
            return False
        victim = next((h for h in self.retained if h not in keep), next(iter(self.retained)))
        self.release(victim)
        self.evictions += 1
        return True

    def release(self, h: Holder) -> None:
        self.forget(h)
        h.session.__exit__(None, None, None)

    def clear(self) -> None:
        for h in list(self.retained):
            self.release(h)
