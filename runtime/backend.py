"""The engine-backend contract: everything the engine, the executor and the pack loader ask of a backend.

A backend turns packs into its compute form inside the device tier's memory and runs forward passes
over the archive's graph. The numpy backend (`cpu/`), the Vulkan backend (`vk/`) and any later one
(native CPU kernels, a hybrid plan) implement `Backend` in full; the engine never probes for optional
methods. How a pack travels, in order:

    Engine            sizes the tiers from `pack_bytes`, `reserved_bytes`, `activation_bytes`
    DeviceTier        owns `make_backing(block sizes)`: the budget as real memory blocks
    Backend.attach    learns the tier and the placement (resident or streamed, RAM budget)
    PackLoader        finds room in the tier, then `Backend.load(pack, PackSource, dest view)`
    Executor          `Backend.forward(PassInputs, WeightAccess)` -> output rows (logits)

`PackSource` (runtime/prefetch.py) lets the backend choose where the bytes come from: the decoded
bytes (read, checked, decompressed, cached in the RAM tier on the way); for a pack stored raw, the
archive file read straight into the backend's memory and checked there (`read_into`); or, for a raw
pack checked before, the file's span for the backend's own reader (`file_span`). A backend may also keep packs of its
own (the Vulkan backend's pinned host cache) and skip the source entirely.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from ..pack_format.reader import Archive
    from .alloc import Allocation
    from .graph import WeightAccess
    from .prefetch import PackSource
    from .tiers import DeviceTier


@dataclass(frozen=True)
class Placement:
    """What the engine decided about memory before the first pass (runtime/budget.py).

    resident: the device budget holds every pack, the KV cache and activations: packs are loaded
        once at start and never evicted, so a whole pass may stay pinned.
    pass_tokens: the longest pass the engine expects to run often (activation room to set aside).
    ram_budget: bytes of system memory for streamed packs (None: unlimited; 0: none).
    model_bytes: all packs in their compute form (`sum(pack_bytes)`).
    """

    resident: bool
    pass_tokens: int
    ram_budget: int | None
    model_bytes: int


@dataclass(frozen=True)
class PassInputs:
    """One forward pass over several sequences' new tokens, stacked by rows.

    tokens, positions: int64 [T]; seqs: (first row, end row, position of the first, kv) per sequence,
    where kv is that sequence's [(K view, V view)] per layer from `Backend.kv_view`.
    output: the graph output to return (`graph.outputs[0]`, the logits), one row per sequence.
    """

    tokens: np.ndarray
    positions: np.ndarray
    seqs: list[tuple[int, int, int, Any]]
    output: str


@runtime_checkable
class Backing(Protocol):
    """The device tier's blocks as memory the backend computes on."""

    def view(self, a: Allocation) -> Any:
        """The memory of one allocation (a numpy uint8 array, a device buffer slice, ...)."""

    def close(self) -> None:
        """Free the blocks."""


@runtime_checkable
class Backend(Protocol):
    """A compute backend. Every member is required; there are no optional ones."""

    name: str
    max_block: int       # largest memory block the device tier may ask of `make_backing`
    load_workers: int    # packs the loader may load side by side (threads)

    @property
    def reserved_bytes(self) -> int:
        """Device memory the backend allocates outside the tier (staging, io), counted in the budget."""

    def make_backing(self, block_sizes: list[int]) -> Backing:
        """Allocate the device tier's blocks."""

    def pack_bytes(self, pack: int) -> int:
        """Bytes `pack` takes in the device tier in compute form (a multiple of 256)."""

    def activation_bytes(self, tokens: int, n_ctx: int) -> int:
        """Tier bytes the activations of one pass of `tokens` tokens over `n_ctx` positions take."""

    def session_activation_bytes(self, tokens: int, n_ctx: int) -> int:
        """Activation bytes each KV session reserves beside its cache (0 when the backend reserves
        its activation room itself, once, in `attach` and `forward`)."""

    def kv_rows(self, n_ctx: int) -> int:
        """Rows a KV session asked for `n_ctx` positions gets (a backend may round it up)."""

    def attach(self, tier: DeviceTier, placement: Placement) -> int | None:
        """Start working in `tier` under `placement`; returns the RAM budget left for the engine's
        RAM tier of decoded packs (0 when the backend keeps streamed packs itself, None: unlimited)."""

    def load(self, pack: int, source: PackSource, dest: Any) -> Any:
        """Put `pack` into `dest` (a view of its tier allocation) in compute form; returns its payload:
        {(tensor name, first row): what the backend's ops read}."""

    def kv_view(self, mem: Any, n_ctx: int, width: int) -> Any:
        """One layer's K or V cache, [n_ctx, width] float32, in the tier memory `mem` (`n_ctx` rows: the
        session's, or a windowed layer's ring, runtime/kv.py)."""

    def copy_kv(self, src: list[tuple[Any, Any]], dst: list[tuple[Any, Any]], n: int) -> None:
        """Give the session `dst` what the session `src` holds for positions [0, n): per layer and
        kind, the rows `copy_spans(n, src rows, dst rows)` names (a ring keeps only its last rows).
        Done before the next `forward` reads `dst`. Sessions share a prompt's KV this way (the
        choices of one request, a cached prefix), so it must work wherever the cache lives."""

    def host_steps(self, tokens: int) -> frozenset[int]:
        """Steps a pass of `tokens` tokens computes from weights the backend holds in system memory
        itself (a hybrid plan's CPU steps): their packs are not acquired through the tier in that
        pass, and the schedule leaves them out. Empty for a backend that reads every weight through
        the tier."""

    def forward(self, inputs: PassInputs, weights: WeightAccess) -> np.ndarray:
        """Run the graph's steps over `inputs`, acquiring weights through `weights`; returns the
        output rows, float32 [len(inputs.seqs), width]. When it returns, no pack stays pinned."""

    def placement(self) -> dict[str, Any]:
        """For a backend that places steps on several devices (runtime/hybrid): the measured rates and
        the plans made so far ({"rates": {...}, "plans": [...], "lines": [readable]}); {} otherwise."""

    def host_bytes(self) -> int:
        """System memory the backend holds for packs (counted in the RAM budget)."""

    def close(self) -> None:
        """Release everything the backend allocated, the tier's backing included."""


BackendFactory = Callable[["Archive"], Backend]


def copy_spans(n: int, src_rows: int, dst_rows: int, lo: int = 0) -> list[tuple[int, int, int]]:
    """(source row, destination row, rows) runs that carry positions [lo, n) from a cache of `src_rows`
    rows to one of `dst_rows`, position p living at row p % rows on each side: only the last
    min(n, src_rows, dst_rows) positions, the ones both can hold, cut where either side wraps.

    Example: copy_spans(10, 4, 6) -> [(2, 0, 2), (0, 2, 2)] (positions 6, 7 then 8, 9).
    """
    out: list[tuple[int, int, int]] = []
    p = max(lo, n - min(src_rows, dst_rows))
    while p < n:
        s, d = p % src_rows, p % dst_rows
        k = min(n - p, src_rows - s, dst_rows - d)
        out.append((s, d, k))
        p += k
    return out
