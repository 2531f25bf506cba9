"""Steps recorded but not yet done on the device, and the packs they keep pinned.

A step's packs stay pinned (not evictable) from the moment it is recorded until its fence signals.
Recorded steps wait in `pending` and go to the queue together in ONE submission (`flush`); then
they are `inflight` until waited for. Recordings dropped from the caches while a submitted batch
still uses them are destroyed only once it is done (`retire`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .recorder import Recorder, submit_all


class InFlight:
    """Pending and submitted steps with their pinned packs (`weights.release` unpins them)."""

    def __init__(self, pack_bytes: Callable[[int], int]):
        self.pack_bytes = pack_bytes
        self.pending: list[tuple[Recorder, list[Any]]] = []   # recorded, not yet submitted
        self.inflight: list[tuple[Recorder, list[Any]]] = []  # submitted, packs pinned until done
        self._retired: list[Recorder] = []
        self._pending_bytes = 0   # pack bytes the pending steps pin (kept as they come and go: asked per expert)
        self._inflight_bytes = 0
        self.submits = 0
        self.wait_seconds = 0.0   # time blocked on fences (the device working, or uploads pending)

    def add(self, rec: Recorder, held: list[Any] | tuple = ()) -> None:
        """Queue a recorded step; `held` are the entries it pins until it is done."""
        self.pending.append((rec, list(held)))
        self._pending_bytes += self._bytes(held)

    def _bytes(self, held: list[Any] | tuple) -> int:
        return sum(self.pack_bytes(e.pack) for e in held)

    def pinned(self, pending_only: bool = False) -> int:
        """Pack bytes that pending (and, unless `pending_only`, submitted) steps keep pinned."""
        return self._pending_bytes if pending_only else self._pending_bytes + self._inflight_bytes

    def flush(self, weights: Any, wait: bool = True) -> None:
        """Submit every pending step in ONE queue submission; with `wait`, wait and release their packs."""
        if self.pending:
            submit_all([r for r, _ in self.pending], wait=False)
            self.submits += 1
            self.inflight += self.pending
            self.pending = []
            self._inflight_bytes += self._pending_bytes
            self._pending_bytes = 0
        if wait:
            self.wait_all(weights)

    def wait_all(self, weights: Any = None) -> None:
        """Wait for every submitted step, releasing its packs through `weights`."""
        t0 = time.perf_counter()
        for rec, held in self.inflight:
            rec.wait()
            if weights is not None:
                weights.release(held)
        self.inflight.clear()
        self._inflight_bytes = 0
        self.wait_seconds += time.perf_counter() - t0
        self._destroy_retired()

    def release_oldest(self, weights: Any, target: int) -> None:
        """Wait for the oldest submitted steps, releasing their packs, until at most `target` bytes
        stay pinned (the newer ones keep the device busy meanwhile)."""
        t0 = time.perf_counter()
        while self.inflight and self.pinned() > target:
            rec, held = self.inflight.pop(0)
            rec.wait()
            weights.release(held)
            self._inflight_bytes -= self._bytes(held)
        self.wait_seconds += time.perf_counter() - t0
        self._destroy_retired()

    def retire(self, rec: Recorder) -> None:
        """Destroy a recording once no pending or submitted step uses it."""
        if any(r is rec for batch in (self.pending, self.inflight) for r, _ in batch):
            self._retired.append(rec)
        else:
            rec.destroy()

    def _destroy_retired(self) -> None:
        busy = {id(r) for batch in (self.pending, self.inflight) for r, _ in batch}
        done = [r for r in self._retired if id(r) not in busy]
        self._retired = [r for r in self._retired if id(r) in busy]
        for rec in done:
            rec.destroy()
