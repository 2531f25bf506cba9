"""Budgeted tiers: packs in compute form on the device, decoded bytes in RAM.

The device tier owns a few large blocks (host arrays for numpy, VkDeviceMemory for Vulkan)
and carves packs, the KV cache and activations out of them with the sub-allocator, so its
budget is a physical fact, not a counter that could drift. The RAM tier caches decoded
(decompressed) pack bytes so that a pack evicted from the device need not be decompressed
again; it only counts bytes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..pack_format.constants import align_up
from ..pack_format.errors import VkpackError
from .alloc import Allocation, SubAllocator, plan_blocks

if TYPE_CHECKING:
    from .backend import Backing


class BudgetError(VkpackError):
    """A budget cannot hold what must be resident at once."""


@dataclass
class Entry:
    pack: int
    alloc: Allocation
    payload: Any               # backend's compute form (numpy views, or device buffer offsets)
    pins: int = 0


class DeviceTier:
    """Packs and reservations under a hard byte budget (`budget` bytes in `blocks`)."""

    def __init__(self, budget: int, max_block: int, make_backing: Callable[[list[int]], Backing], policy: Any,
                 alignment: int = 256):
        self.budget = budget
        self.blocks = plan_blocks(budget, max_block, alignment)
        self.allocator = SubAllocator(self.blocks, alignment)
        self.backing = make_backing(self.blocks)
        self.policy = policy
        self.entries: dict[int, Entry] = {}
        self.lock = threading.RLock()
        self.evictions = 0
        self.version = 0          # bumped whenever a pack enters or leaves: recordings stay valid while it holds
        self.frozen = False       # while set, prefetch may not place or evict packs (a replayed pass is reading them)
        # Evict at least this many bytes at once when room must be made (0: just enough). Streaming
        # evicts for nearly every load; one planned window serving several loads cuts the planning
        # (pure Python, under the GIL the loading threads share) several times over.
        self.evict_batch = 0
        self.reserved = 0                     # bytes held by reservations (KV caches, activations)
        self._reservations: set[int] = set()  # id() of each live reservation
        # a resident model's packs stay: a reservation (another session's KV cache) takes free room only, and
        # is refused (BudgetError: the server waits for a session to end) rather than evict the weights that
        # every pass pins whole
        self.keep_packs = False

    @property
    def in_use(self) -> int:
        return self.allocator.stats.bytes_in_use

    @property
    def peak(self) -> int:
        return self.allocator.stats.peak_in_use

    def reserve(self, nbytes: int, tag: str) -> Allocation:
        """Space that stays until released (KV cache, activations), at the top of the tier; evicts unpinned
        packs if needed, except a resident model's (`keep_packs`)."""
        with self.lock:
            a = self._alloc(nbytes, tag, cursor=0, protect=None, high=True)
            if a is None:
                beside = ("beside the resident model and the sessions already open" if self.keep_packs
                          else "besides pinned packs")
                raise BudgetError(f"device budget {self.budget / 2**20:.1f} MiB cannot hold {tag} "
                                  f"({nbytes / 2**20:.1f} MiB) {beside}")
            self._reservations.add(id(a))
            self.reserved += a.size
            return a

    def release(self, a: Allocation) -> None:
        with self.lock:
            self.allocator.free(a)
            if id(a) in self._reservations:
                self._reservations.remove(id(a))
                self.reserved -= a.size

    def allocate_pack(self, pack: int, nbytes: int, cursor: int, protect: int | None) -> Allocation | None:
        """Room for a pack, evicting by the policy. With `protect`, only packs whose next use is
        farther than `protect` may go (prefetch must not evict what is needed sooner)."""
        with self.lock:
            if self.frozen and protect is not None:
                return None
            return self._alloc(nbytes, f"pack {pack}", cursor, protect)

    def _alloc(self, nbytes: int, tag: str, cursor: int, protect: int | None,
               high: bool = False) -> Allocation | None:
        """Room for `nbytes`, evicting unpinned packs by the policy if needed. `high`: a reservation, placed
        at the top (sessions come and go while packs churn: 32 KV caches scattered among the packs cut a 4 GiB
        tier into pieces that each held one 50 MB pack and wasted the rest)."""
        a = self.allocator.alloc(nbytes, tag, high)
        if a is not None or (high and self.keep_packs):   # a resident model's packs are not evicted for it
            return a
        owner = {id(e.alloc): e for e in self.entries.values()}
        sched = getattr(self.policy, "schedule", None)

        def cost(al: Allocation) -> float:
            e = owner.get(id(al))
            if e is None or e.pins:
                return math.inf  # a reservation or a pack in use
            d = sched.next_use(e.pack, cursor) if protect is not None and sched is not None else None
            if d is not None and d <= protect:
                return math.inf
            return self.policy.cost(e.pack, al.size, cursor, d)   # d None: a policy that wants it looks it up

        victims = None
        if self.evict_batch > nbytes and not high:
            victims = self.allocator.plan_eviction(self.evict_batch, cost)
        if victims is None:
            victims = self.allocator.plan_eviction(nbytes, cost, high)
        if victims is None:
            return None
        for al in victims:
            self._evict(owner[id(al)].pack)
        return self.allocator.alloc(nbytes, tag, high)

    def insert(self, pack: int, alloc: Allocation, payload: Any) -> Entry:
        with self.lock:
            e = Entry(pack, alloc, payload)
            self.entries[pack] = e
            self.version += 1
            return e

    def _evict(self, pack: int) -> None:
        e = self.entries.pop(pack)
        self.allocator.free(e.alloc)
        self.evictions += 1
        self.version += 1

    def view(self, a: Allocation) -> Any:
        return self.backing.view(a)


class RamTier:
    """Decoded pack bytes under a byte budget (None = unlimited), evicting by the policy."""

    def __init__(self, budget: int | None, policy: Any):
        self.budget = budget
        self.policy = policy
        self.items: dict[int, bytes | memoryview] = {}
        self.in_use = 0
        self.peak = 0
        self.lock = threading.Lock()

    def get(self, pack: int) -> bytes | memoryview | None:
        with self.lock:
            return self.items.get(pack)

    def put(self, pack: int, data: bytes | memoryview, cursor: int) -> None:
        n = len(data)
        with self.lock:
            if pack in self.items or (self.budget is not None and n > self.budget):
                return
            while self.budget is not None and self.in_use + n > self.budget:
                victim = self.policy.victim(list(self.items), cursor)
                if victim is None:
                    return
                self.in_use -= len(self.items.pop(victim))
            self.items[pack] = data
            self.in_use += n
            self.peak = max(self.peak, self.in_use)


# ---- sizing the budgets ----
GIB = 1 << 30
UNLIMITED_SLACK = 64 << 20  # an unlimited budget's headroom beyond its sizes (recordings, fragments)


@dataclass(frozen=True)
class BudgetPlan:
    """The device and RAM budgets of an engine, and whether its packs stream.

    device: bytes of the device tier (a multiple of 256; the backend's reserved bytes taken off).
    streaming: the device tier cannot hold every pack beside a full KV cache, so packs get evicted
        and reloaded; False: every pack is loaded once and stays (resident).
    ram: bytes of system memory for streamed packs (None: unlimited, 0 when resident).
    weight_room: the room weights need at the least beside sessions: two of the largest packs (a
        weight part and its bias may be pinned together; bigger steps are streamed part by part).
    minimum: the smallest device budget this model runs under (`weight_room`, the KV cache and
        activations of a short sequence, the backend's reserved bytes).
    evict_batch: bytes to evict at once when room must be made (`DeviceTier.evict_batch`).
    """

    device: int
    streaming: bool
    ram: int | None
    weight_room: int
    minimum: int
    evict_batch: int


def kv_bytes(kv_cache: dict[str, int], n_ctx: int, windows: dict[int, int] | None = None,
             pass_tokens: int | None = None) -> int:
    """One sequence's K and V caches over `n_ctx` positions (float32); with `windows` (layer -> sliding
    window), those layers' rings for passes of up to `pass_tokens` tokens (runtime/kv.py's ring_rows)."""
    from .kv import ring_rows   # kv.py imports this module

    t = n_ctx if pass_tokens is None else pass_tokens
    rows = sum(ring_rows(n_ctx, (windows or {}).get(i), t) for i in range(kv_cache["n_layers"]))
    return 2 * rows * kv_cache["n_kv_heads"] * kv_cache["head_dim"] * 4


def plan_budgets(pack_sizes: list[int], backend: Any, kv_cache: dict[str, int], context: int,
                 vram_gb: float | None, ram_gb: float | None, windows: dict[int, int] | None = None,
                 pass_tokens: int | None = None) -> BudgetPlan:
    """Budgets from the user's limits (None: unlimited), the packs' sizes in the backend's compute
    form, the KV cache shape and the longest sequence the engine accepts (windowed layers counted as
    the rings the engine's sessions keep: `windows`, `pass_tokens`)."""
    model = sum(pack_sizes)
    largest = max(pack_sizes)
    weight_room = 2 * largest
    minimum = weight_room + kv_bytes(kv_cache, 64) + backend.activation_bytes(16, 64) + backend.reserved_bytes
    if vram_gb is None:  # everything resident: weights, a full-context KV cache, activations twice
        # over, and 10 % slack so that reservations never fragment their way into evicting packs
        device = align_up(model * 11 // 10 + kv_bytes(kv_cache, context, windows, pass_tokens)
                          + 2 * backend.activation_bytes(min(context, 2048), context) + UNLIMITED_SLACK, 256)
    else:
        device = int(vram_gb * GIB)
        if device < minimum:
            raise BudgetError(f"--vram-gb {vram_gb:g} ({device / 2**20:.1f} MiB) is below what this model needs "
                              f"at minimum: {minimum / 2**20:.1f} MiB ({minimum / GIB:.3f} GiB)")
        device -= backend.reserved_bytes  # staging and io buffers live outside the tier
        device = device // 256 * 256  # rounded down: the user's limit is a hard one
    streaming = device < model + kv_bytes(kv_cache, context, windows, pass_tokens)
    # a backend loading from several threads evicts for nearly every load when streaming: planning
    # one window for several loads cuts the planning (Python, under the GIL) several times over
    evict_batch = min(4 * largest, device // 16) if streaming and backend.load_workers > 1 else 0
    ram = (None if ram_gb is None else int(ram_gb * GIB)) if streaming else 0
    return BudgetPlan(device, streaming, ram, weight_room, minimum, evict_batch)
