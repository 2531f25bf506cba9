"""KV sessions: one sequence's K and V caches (and the backend's per-session activation room) in the device tier."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..pack_format.constants import align_up
from .alloc import Allocation
from .backend import Backend
from .tiers import DeviceTier


def layer_windows(graph: dict[str, Any]) -> dict[int, int]:
    """Layer -> sliding window of its attention op (attrs `layer`, `window`), for windowed layers only."""
    return {op["attrs"]["layer"]: op["attrs"]["window"] for s in graph["steps"] for op in s["ops"]
            if op["op"] == "attention" and op["attrs"].get("window")}


def ring_rows(n_ctx: int, window: int | None, max_pass_tokens: int) -> int:
    """Rows one layer's K (or V) cache keeps: all n_ctx, or for a windowed layer the ring a pass of
    `max_pass_tokens` tokens needs alive at once (keys pos0 - window + 1 .. pos0 + T - 1)."""
    return n_ctx if not window else min(n_ctx, window + max_pass_tokens - 1)


class KvViews(list):
    """[(K view, V view)] per layer, and the most tokens one pass may feed them (`max_pass_tokens`)."""

    max_pass_tokens: int


class KvSession:
    """Reserves one sequence's KV cache as ONE range of the device tier, cut into per-layer views,
    so that sessions do not scatter small holes across the budget.

    A layer with a sliding window keeps only a ring of `ring_rows` rows: position p lives at row
    p % rows (a full layer's rows are n_ctx, so p itself). The ring holds what a pass of up to
    `max_pass_tokens` tokens reads, so no pass may feed more (the engine and the scheduler chunk).

    `with KvSession(...) as kv:` gives [(K view, V view)] per layer; BudgetError when the tier cannot
    hold it next to pinned packs. `nbytes` is what it reserves, known before entering.
    """

    def __init__(self, tier: DeviceTier, backend: Backend, kv_cache: dict[str, int], n_ctx: int, context: int,
                 max_pass_tokens: int | None = None, windows: dict[int, int] | None = None):
        self.tier = tier
        self.backend = backend
        self.n_ctx = max(1, min(backend.kv_rows(n_ctx), context))
        self.layers = kv_cache["n_layers"]
        self.width = kv_cache["n_kv_heads"] * kv_cache["head_dim"]
        # the longest pass a sequence may feed: with no ring (no window, or no limit given) any pass fits
        self.max_pass_tokens = self.n_ctx if max_pass_tokens is None else max(1, min(max_pass_tokens, self.n_ctx))
        self.windows = windows or {}
        self.rows = [ring_rows(self.n_ctx, self.windows.get(i), self.max_pass_tokens) for i in range(self.layers)]
        self.pers = [align_up(r * self.width * 4, 256) for r in self.rows]   # bytes of one K (or V) view
        self.act = backend.session_activation_bytes(self.max_pass_tokens, self.n_ctx)
        self.kv_bytes = 2 * sum(self.pers)
        self.nbytes = self.kv_bytes + self.act
        self.allocs: list[Allocation] = []
        self.views: KvViews | None = None     # what `__enter__` returned, while entered

    @property
    def reserved_bytes(self) -> int:
        """Tier bytes held now (0 outside the `with`)."""
        return sum(a.size for a in self.allocs)

    def __enter__(self) -> KvViews:
        tier = self.tier
        try:
            if self.act:
                self.allocs.append(tier.reserve(self.act, "activations"))
            if self.kv_bytes <= tier.allocator.max_request:
                block = tier.reserve(self.kv_bytes, "kv")
                self.allocs.append(block)
                views, off = [], block.offset
                for i in range(2 * self.layers):
                    per = self.pers[i // 2]
                    sub = replace(block, offset=off, size=per, requested=per)
                    views.append(self.backend.kv_view(tier.view(sub), self.rows[i // 2], self.width))
                    off += per
            else:  # larger than one block of the tier: one range per layer and kind
                views = []
                for i in range(2 * self.layers):
                    a = tier.reserve(self.pers[i // 2], "kv")
                    self.allocs.append(a)
                    views.append(self.backend.kv_view(tier.view(a), self.rows[i // 2], self.width))
        except BaseException:
            self.__exit__()
            raise
        out = KvViews((views[2 * i], views[2 * i + 1]) for i in range(self.layers))
        out.max_pass_tokens = self.max_pass_tokens
        self.views = out
        return out

    def __exit__(self, *exc: object) -> None:
        for a in self.allocs:
            self.tier.release(a)
        self.allocs = []
        self.views = None

    def copy_from(self, src: KvSession, n: int) -> None:
        """Take what `src` (another entered session of this engine) holds for positions [0, n), through
        the backend's `copy_kv`: the n choices of one request prefill their prompt once, and a new
        request reuses a cached prefix (runtime/server/prefix.py). Check `src.serves(n, ...)` first."""
        if self.views is None or src.views is None:
            raise RuntimeError("copy_from needs both KV sessions entered")
        self.backend.copy_kv(src.views, self.views, n)

    def serves(self, n: int, written: int) -> bool:
        """Whether this session, fed positions [0, written), still holds all that a sequence going on
        at position n reads: every position below n, except that a windowed layer reads only the
        window - 1 before it (keys n - window + 1 ..), which its ring must not have overwritten since."""
        return n <= written and all(written - rows <= max(0, n - self.windows[i] + 1)
                                    for i, rows in enumerate(self.rows) if i in self.windows)
