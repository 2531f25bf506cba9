"""KV sessions: one sequence's K and V caches (and the backend's per-session activation room) in the device tier."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..pack_format.constants import align_up
from .alloc import Allocation
from .backend import Backend
from .tiers import DeviceTier


class KvSession:
    """Reserves one sequence's KV cache as ONE range of the device tier, cut into per-layer views,
    so that sessions do not scatter small holes across the budget.

    `with KvSession(...) as kv:` gives [(K view, V view)] per layer; BudgetError when the tier cannot
    hold it next to pinned packs. `nbytes` is what it reserves, known before entering.
    """

    def __init__(self, tier: DeviceTier, backend: Backend, kv_cache: dict[str, int], n_ctx: int, context: int,
                 max_pass_tokens: int | None = None):
        self.tier = tier
        self.backend = backend
        self.n_ctx = max(1, min(backend.kv_rows(n_ctx), context))
        self.layers = kv_cache["n_layers"]
        self.width = kv_cache["n_kv_heads"] * kv_cache["head_dim"]
        self.per = align_up(self.n_ctx * self.width * 4, 256)
        t = self.n_ctx if max_pass_tokens is None else max(1, min(max_pass_tokens, self.n_ctx))
        self.act = backend.session_activation_bytes(t, self.n_ctx)
        self.nbytes = 2 * self.layers * self.per + self.act
        self.allocs: list[Allocation] = []

    @property
    def reserved_bytes(self) -> int:
        """Tier bytes held now (0 outside the `with`)."""
        return sum(a.size for a in self.allocs)

    def __enter__(self) -> list[tuple[Any, Any]]:
        tier = self.tier
        try:
            if self.act:
                self.allocs.append(tier.reserve(self.act, "activations"))
            kv_bytes = 2 * self.layers * self.per
            if kv_bytes <= tier.allocator.max_request:
                block = tier.reserve(kv_bytes, "kv")
                self.allocs.append(block)
                views = [self._cut(block, i) for i in range(2 * self.layers)]
            else:  # larger than one block of the tier: one range per layer and kind
                views = []
                for _ in range(2 * self.layers):
                    a = tier.reserve(self.per, "kv")
                    self.allocs.append(a)
                    views.append(self.backend.kv_view(tier.view(a), self.n_ctx, self.width))
        except BaseException:
            self.__exit__()
            raise
        return [(views[2 * i], views[2 * i + 1]) for i in range(self.layers)]

    def _cut(self, block: Allocation, i: int) -> Any:
        sub = replace(block, offset=block.offset + i * self.per, size=self.per, requested=self.per)
        return self.backend.kv_view(self.tier.view(sub), self.n_ctx, self.width)

    def __exit__(self, *exc: object) -> None:
        for a in self.allocs:
            self.tier.release(a)
        self.allocs = []
