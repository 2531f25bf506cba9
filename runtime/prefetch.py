"""Getting packs into the device tier: on demand, or ahead of time along the access graph.

Background workers walk the schedule `lookahead` packs ahead of the executor: each finds room in
the device tier and has the backend load the pack there (`Backend.load` with a `PackSource`: read
from the mmap or the file, checksum checked on first load, decompressed by blosc2/zfpy, which drop
the GIL), while the current step computes. The executor then finds the pack resident (a hit) or waits for the
in-flight load (a stall, timed).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..pack_format.reader import pread_into
from .backend import Backend
from .metrics import Metrics
from .policy import AccessSchedule
from .tiers import BudgetError, DeviceTier, Entry, RamTier


class PackLoader:
    def __init__(self, archive: Any, tier: DeviceTier, ram: RamTier, backend: Backend, schedule: AccessSchedule,
                 lookahead: int, metrics: Metrics):
        self.archive = archive
        self.tier = tier
        self.ram = ram
        self.backend = backend
        self.schedule = schedule
        self.lookahead = lookahead
        self.metrics = metrics
        self.workers = max(1, backend.load_workers)
        self.inflight: dict[int, Future] = {}
        self.verified: set[int] = set()
        self.prefetched: set[int] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vkpack-prefetch") if lookahead > 0 else None

    # ---- the executor's side ----
    def acquire(self, pack: int, cursor: int) -> Entry:
        """Pin `pack` resident (loading it if needed) and start prefetching beyond `cursor`."""
        t0 = time.perf_counter()
        waited = False
        while True:
            with self.tier.lock:
                e = self.tier.entries.get(pack)
                if e is not None:
                    e.pins += 1
                    self.tier.policy.touch(pack)
                    break
            with self._lock:
                fut = self.inflight.get(pack)
                if fut is None:
                    fut = Future()
                    self.inflight[pack] = fut
                    mine = True
                else:
                    mine = False
            waited = True
            if mine:
                try:
                    e = self._load(pack, cursor, protect=None, pin=True)
                finally:
                    with self._lock:
                        self.inflight.pop(pack, None)
                    fut.set_result(None)
                with self.tier.lock:
                    # a use, as a hit is: untouched, LRU took a pack read once a pass (a step's packs
                    # held together) for the oldest right after its load, and evicted it first
                    self.tier.policy.touch(pack)
                self.metrics.misses += 1
                break
            fut.result()
        if not waited:
            if pack in self.prefetched:
                self.metrics.prefetch_hits += 1
            else:
                self.metrics.resident_hits += 1
        elif pack in self.prefetched:
            self.metrics.prefetch_late += 1
        self.prefetched.discard(pack)
        self.metrics.stall_seconds += time.perf_counter() - t0 if waited else 0.0
        self.prefetch(cursor)
        return e

    def preload(self) -> None:
        """Load every pack once, from the loading threads: a model that fits its budget is made
        resident at start (as llama.cpp loads its weights), so no pass pays for first loads."""
        todo = [(p, pos) for p, pos in self.schedule.first_uses().items() if p not in self.tier.entries]
        # placed one after the other in pack order first (then filled in parallel), so that the
        # row-parts of one tensor sit back to back and a backend may run them as one weight
        placed = []
        try:
            for p, pos in todo:
                a = self.tier.allocate_pack(p, self.backend.pack_bytes(p), pos, None)
                if a is None:
                    raise BudgetError(f"device budget {self.tier.budget / 2**20:.1f} MiB cannot hold pack {p}")
                placed.append((p, pos, a))
            with ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="vkpack-preload") as pool:
                futs = [pool.submit(self._load, p, pos, None, False, a) for p, pos, a in placed]
                placed = []  # _fill releases its allocation when it fails
                for f in futs:
                    f.result()
        finally:
            for _p, _pos, a in placed:
                self.tier.release(a)

    def release(self, e: Entry) -> None:
        with self.tier.lock:
            e.pins -= 1

    # ---- ahead of time ----
    def prefetch(self, cursor: int) -> None:
        if self._pool is None:
            return
        for pack in self.schedule.upcoming(cursor + 1, self.lookahead):
            self._start(pack, cursor)

    def prefetch_now(self, items: list[tuple[int, int]]) -> None:
        """Start loading these (pack, position) pairs now, on the loading threads, side by side."""
        if self._pool is None:
            return
        for pack, pos in items:
            self._start(pack, pos)

    def _start(self, pack: int, cursor: int) -> None:
        """Queue a load of `pack` unless it is resident or on its way."""
        if pack in self.tier.entries or pack in self.inflight:  # unlocked peeks (a dict lookup is atomic)
            return
        with self._lock:
            if pack in self.inflight:
                return
            fut: Future = Future()
            self.inflight[pack] = fut
        self._pool.submit(self._prefetch_job, pack, cursor, fut)

    def _prefetch_job(self, pack: int, cursor: int, fut: Future) -> None:
        try:
            protect = self.schedule.next_use(pack, cursor)
            if self._load(pack, cursor, protect=protect, pin=False) is not None:
                self.prefetched.add(pack)
        except BaseException as e:  # surfaced when the executor loads the pack itself
            self.metrics.prefetch_errors += 1
            self.metrics.last_prefetch_error = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self.inflight.pop(pack, None)
            fut.set_result(None)

    # ---- one load ----
    def _load(self, pack: int, cursor: int, protect: int | None, pin: bool, alloc: Any = None) -> Entry | None:
        """Make `pack` resident (in `alloc` when the caller placed it already)."""
        nbytes = self.backend.pack_bytes(pack)
        if alloc is not None:
            return self._fill(pack, nbytes, alloc, cursor, protect, pin)
        t_alloc = time.perf_counter()
        alloc = self.tier.allocate_pack(pack, nbytes, cursor, protect)
        if alloc is None and protect is None:
            # prefetches in flight hold allocations that are not evictable entries yet: let them land
            with self._lock:
                others = [f for p, f in self.inflight.items() if p != pack]
            for f in others:
                f.result()
            alloc = self.tier.allocate_pack(pack, nbytes, cursor, protect)
        self.metrics.alloc_seconds += time.perf_counter() - t_alloc  # a float add: GIL-atomic enough for a metric
        if alloc is None:
            if protect is not None:
                self.metrics.prefetch_no_room += 1
                return None  # no room without evicting something needed sooner: skip this prefetch
            raise BudgetError(f"device budget {self.tier.budget / 2**20:.1f} MiB cannot hold pack {pack} "
                              f"({nbytes / 2**20:.1f} MiB) next to the pinned packs and reservations")
        return self._fill(pack, nbytes, alloc, cursor, protect, pin)

    def _fill(self, pack: int, nbytes: int, alloc: Any, cursor: int, protect: int | None,
              pin: bool) -> Entry:
        """Have the backend load `pack` into its allocation; then it is an entry."""
        try:
            t0 = time.perf_counter()
            payload = self.backend.load(pack, PackSource(self, pack, cursor, background=protect is not None),
                                        self.tier.view(alloc))
            self.archive.drop_pages(pack)  # the pack lives in the tier now: its mapped pages need not count in RSS
            self.metrics.add_upload(nbytes, time.perf_counter() - t0)
        except BaseException:
            self.tier.release(alloc)
            raise
        e = self.tier.insert(pack, alloc, payload)
        if pin:
            with self.tier.lock:
                e.pins += 1
        return e

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class PackSource:
    """Where one load's bytes come from, for `Backend.load` to choose (see runtime/backend.py).

    `decoded()` gives the pack's decoded bytes: from the RAM tier, or read from the archive (its
    checksum checked on the first read), decompressed, and kept in the RAM tier when compressed.
    `read_into(dest)` reads a pack stored raw from the archive file into the backend's own memory and
    checks it there. `file_span()` gives, for a pack stored raw whose checksum was checked before, its place in the
    archive file, so that a backend can read it straight into its own memory (no mmap faults, no
    copy in RAM); None otherwise. `background` is true for a prefetch, one of several loads in
    flight (a backend should then not spread one copy over many threads).
    """

    def __init__(self, loader: PackLoader, pack: int, cursor: int, background: bool):
        self.loader = loader
        self.pack = pack
        self.cursor = cursor
        self.background = background

    def decoded(self) -> bytes | memoryview:
        ld, pack = self.loader, self.pack
        raw = ld.ram.get(pack)
        if raw is not None:
            return raw
        rec = ld.archive.packs[pack]
        t0 = time.perf_counter()
        raw = ld.archive.read_pack(pack, verify=pack not in ld.verified)
        ld.verified.add(pack)
        ld.metrics.add_read(rec.stored_size, rec.raw_size if rec.codec != "none" else 0, time.perf_counter() - t0)
        if rec.codec != "none":
            ld.ram.put(pack, raw, self.cursor)
        return raw

    def read_into(self, dest: np.ndarray) -> bool:
        """For a pack stored raw: read its bytes from the archive file into `dest` (uint8, at least the
        pack's size), checking its checksum there on its first load (no mmap pages touched, no copy in
        between); False for a compressed pack (use `decoded()`)."""
        ld, pack = self.loader, self.pack
        rec = ld.archive.packs[pack]
        if rec.codec != "none":
            return False
        offset, size = ld.archive.pack_span(pack)
        t0 = time.perf_counter()
        pread_into(ld.archive.fileno(), dest[:size], offset)
        if pack not in ld.verified:
            ld.archive.check_stored(pack, dest[:size])
            ld.verified.add(pack)
        ld.metrics.add_read(rec.stored_size, 0, time.perf_counter() - t0)
        return True

    def file_span(self) -> tuple[int, int, int] | None:
        """(file descriptor, offset, size) of a raw pack checked before; the read is counted."""
        ld, pack = self.loader, self.pack
        rec = ld.archive.packs[pack]
        if rec.codec != "none" or pack not in ld.verified:
            return None
        offset, size = ld.archive.pack_span(pack)
        ld.metrics.add_read(rec.stored_size, 0, 0.0)
        return ld.archive.fileno(), offset, size
