"""Where a pass's data lives on the device: token ids and positions, activations, attention partials, the readback.

Activation widths come from the archive (`Archive.activation_widths`), rows from where in the pass
an activation is written (per token, or per sequence after `last_token`). All activations of a pass
live in ONE reservation of the device tier, laid out once per pass shape; ids and positions go to a
small host-visible io buffer the host rewrites before each pass, and the output rows come back
through a host-visible readback buffer written by the pass's own submission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...pack_format.constants import align_up
from ..alloc import Allocation
from ..backend import PassInputs
from ..graph import seq_row_activations
from .device import Device
from .kernels import BufferSlice
from .ops import Ops
from .recorder import Recorder

ALIGN = 256
MAX_TOKENS_PER_PASS = 4096
READBACK_ROWS = 16  # output rows the readback buffer holds; a bigger batch reads back 16 rows at a time
MAX_LAYOUTS = 64    # pass shapes whose buffer layout is kept
LAST_TOKEN_SCRATCH = ("scratch", "last_token")  # rows `last_token` copies through; no graph name (a str) equals it


def _align(n: int) -> int:
    return align_up(n, ALIGN)


class KvCache:
    """One layer's K or V cache: (n_ctx, width) f32 at a device slice."""

    def __init__(self, sl: BufferSlice, n_ctx: int, width: int):
        self.slice, self.n_ctx, self.width = sl, n_ctx, width
        self.layout: tuple | None = None   # a session's KV places, cached on its first layer's K (kv_layout)


def kv_layout(kv: list[tuple[KvCache, KvCache]]) -> tuple:
    """(the most rows of any layer's cache, where each layer's K and V caches are), computed once per
    session (a windowed layer's ring may have fewer rows than the first layer's, runtime/kv.py)."""
    first = kv[0][0]
    if first.layout is None:
        first.layout = (max(kc.n_ctx for kc, _ in kv),
                        tuple((id(kc.slice.buffer), kc.slice.offset, vc.slice.offset, kc.n_ctx) for kc, vc in kv))
    return first.layout


@dataclass
class PassState:
    """One pass as the kernels see it.

    T: rows (tokens) of the pass; nseq: sequences; ids, pos: their token ids and positions on the device;
    bufs: activation name -> (slice, width, rows); attn: each sequence's split-K attention partials
    (None: the one-pass kernel); split: the linear products' split-K partials (None: no split); layout:
    what a recording depends on besides its packs (row ranges, KV places, where the activations live).
    """

    tokens: np.ndarray
    seqs: list[tuple[int, int, int, Any]]
    T: int
    nseq: int
    ids: BufferSlice
    pos: BufferSlice
    layout: tuple
    bufs: dict[Any, tuple[BufferSlice, int, int]]
    attn: list[BufferSlice | None]
    split: BufferSlice | None = None   # room for split-K partial products (Ops.linear's `split`)
    after_last: bool = False      # a last_token op ran: later ops work on one row per sequence
    embed_keep: bool = False      # a streamed embedding's later chunk: keep rows other chunks wrote

    def buf(self, name: Any) -> BufferSlice:
        return self.bufs[name][0]

    def width(self, name: Any) -> int:
        return self.bufs[name][1]

    def rows(self) -> int:
        """Rows the current op works on: all tokens, or one per sequence after last_token."""
        return self.nseq if self.after_last else self.T


class ActivationLayout:
    """The device memory of passes: the io and readback buffers (outside the tier, counted in the
    backend's reserved bytes) and the activation reservation (inside the tier)."""

    def __init__(self, dev: Device, ops: Ops, graph: dict[str, Any], widths: dict[str, int]):
        self.dev = dev
        self.ops = ops
        steps = graph["steps"]
        self.output = graph["outputs"][0]
        self.widths: dict[Any, int] = dict(widths)
        self.seq_rows: set[Any] = set(seq_row_activations(steps))
        self.attention = [op["attrs"] for st in steps for op in st["ops"] if op["op"] == "attention"]
        last_w = max((widths[op["in"][0]] for st in steps for op in st["ops"] if op["op"] == "last_token"), default=0)
        if last_w:  # last_token copies its rows through rows of its own (source and destination overlap)
            self.widths[LAST_TOKEN_SCRATCH] = last_w
            self.seq_rows.add(LAST_TOKEN_SCRATCH)
        self.tier: Any = None
        self._scratch: tuple[Allocation, BufferSlice] | None = None
        # per-pass inputs the host rewrites before each pass: token ids and positions (uint32)
        self.io = dev.alloc(8 * MAX_TOKENS_PER_PASS, "upload")
        self._io_u32 = np.frombuffer(self.io.view(), dtype=np.uint32)
        self._layouts: dict[tuple, tuple[dict, list]] = {}
        # host-visible copy of a pass's output (logits), written by the pass's own submission
        self.readback = dev.alloc(4 * READBACK_ROWS * self.widths[self.output], "readback")
        self._readback_recs: dict[tuple, Recorder] = {}

    @property
    def device_bytes(self) -> int:
        """Device-local bytes of the io and readback buffers (0 where they live in system memory)."""
        return sum(b.size for b in (self.io, self.readback) if b.block.device_local)

    def attach(self, tier: Any, pass_tokens: int) -> None:
        """Reserve activation room for passes of `pass_tokens` now, before any pack: growing it later
        needs one contiguous range, which packs scattered over the blocks may only give by being
        evicted (measured: 357 MB re-uploaded in an 8B resident prefill)."""
        self.tier = tier
        while pass_tokens > 1 and self.scratch_bytes(pass_tokens, 1) > tier.budget // 8:
            pass_tokens //= 2  # a small budget keeps its room for packs; bigger passes grow it then
        self._scratch_slice(self.scratch_bytes(pass_tokens, 1))

    def attention_partials(self, tokens: int, n_ctx: int) -> int:
        """Bytes of one sequence's split-K attention partials (0: the one-pass kernel runs)."""
        return max((self.ops.attention_scratch_bytes(tokens, a["n_heads"], a["head_dim"], n_ctx)
                    for a in self.attention), default=0)

    def scratch_bytes(self, tokens: int, n_seqs: int, attn: tuple[int, ...] = ()) -> int:
        """Activation bytes of a pass, plus `attn` (bytes of each sequence's attention partials) and the
        linear products' split-K room."""
        return (sum(_align(4 * (n_seqs if n in self.seq_rows else tokens) * w) for n, w in self.widths.items())
                + sum(_align(n) for n in attn) + _align(self.ops.split_scratch_bytes(tokens)))

    def begin(self, inputs: PassInputs) -> PassState:
        """Write token ids and positions; lay out the activations in the tier reservation (grown if
        needed). The device must be done with the previous pass (its io buffer is rewritten)."""
        tokens, seqs = inputs.tokens, inputs.seqs
        t, nseq = len(tokens), len(seqs)
        if t > MAX_TOKENS_PER_PASS:
            raise ValueError(f"{t} tokens in one pass; at most {MAX_TOKENS_PER_PASS}")
        io = self._io_u32  # host-visible: written in place, read by the next submission
        io[:t] = tokens
        io[MAX_TOKENS_PER_PASS:MAX_TOKENS_PER_PASS + t] = inputs.positions
        # what a recording depends on besides its packs: row ranges and where each KV cache lives
        # (positions are read from the io buffer, so a decode step replays at every position)
        kv_places = tuple((r0, r1) + kv_layout(kv) for r0, r1, _p0, kv in seqs)
        attn = tuple(self.attention_partials(r1 - r0, kv_layout(kv)[0]) for r0, r1, _p0, kv in seqs)
        scratch = self._scratch_slice(self.scratch_bytes(t, nseq, attn))
        key = (t, nseq, attn, id(scratch.buffer), scratch.offset)
        laid = self._layouts.get(key)
        if laid is None:
            laid = self._layouts[key] = self._lay_out(scratch, t, nseq, attn)
            if len(self._layouts) > MAX_LAYOUTS:
                self._layouts.pop(next(iter(self._layouts)))
        return PassState(tokens=tokens, seqs=seqs, T=t, nseq=nseq,
                         ids=BufferSlice(self.io, 0, 4 * t), pos=BufferSlice(self.io, 4 * MAX_TOKENS_PER_PASS, 4 * t),
                         layout=kv_places + ((id(scratch.buffer), scratch.offset),), bufs=laid[0], attn=laid[1],
                         split=laid[2])

    def _lay_out(self, scratch: BufferSlice, t: int, nseq: int, attn: tuple[int, ...]) -> tuple[dict, list, Any]:
        """Activation buffers of a pass (name -> (slice, width, rows)), the attention partials and the
        split-K room (None: none)."""
        off, bufs = scratch.offset, {}
        for name, w in self.widths.items():
            rows = nseq if name in self.seq_rows else t
            size = _align(4 * rows * w)
            bufs[name] = (BufferSlice(scratch.buffer, off, size), w, rows)
            off += size
        parts: list[BufferSlice | None] = []
        for size in attn:
            parts.append(BufferSlice(scratch.buffer, off, size) if size else None)
            off += _align(size)
        room = self.ops.split_scratch_bytes(t)
        return bufs, parts, BufferSlice(scratch.buffer, off, room) if room else None

    def _scratch_slice(self, need: int) -> BufferSlice:
        if self._scratch is not None and self._scratch[0].requested >= need:
            return self._scratch[1]
        if self._scratch is not None:
            self.tier.release(self._scratch[0])
            self._scratch = None
        a = self.tier.reserve(need, "activations")
        self._scratch = (a, self.tier.view(a))
        return self._scratch[1]

    # ---- the output ----
    def readback_recording(self, ps: PassState, name: str, r0: int, r1: int) -> Recorder:
        """A recorded copy of output rows [r0, r1) (at most READBACK_ROWS) into the readback buffer
        (one recording per place and size)."""
        sl, w, _ = ps.bufs[name]
        start, size = sl.offset + 4 * w * r0, 4 * w * (r1 - r0)
        key = (id(sl.buffer), start, size)
        rec = self._readback_recs.get(key)
        if rec is None:
            rec = Recorder(self.dev, label="readback")
            rec.copy(BufferSlice(sl.buffer, start, size), BufferSlice(self.readback, 0, size))
            rec.host_barrier()
            rec.finish()
            self._readback_recs[key] = rec
        return rec

    def read(self, ps: PassState, name: str, rows: int) -> np.ndarray:
        """The first `rows` rows of the readback buffer, once the recording that filled it is done."""
        w = ps.width(name)
        return np.frombuffer(self.readback.view(0, rows * w * 4), dtype=np.float32).reshape(rows, w).copy()

    def _destroy_readback_recs(self) -> None:
        for rec in self._readback_recs.values():
            rec.destroy()
        self._readback_recs.clear()

    def close(self) -> None:
        self.io.destroy()
        self._destroy_readback_recs()
        self.readback.destroy()
