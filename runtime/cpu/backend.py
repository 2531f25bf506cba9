"""The numpy backend: packs become float32 arrays inside the budgeted device tier.

Weights are converted once when their pack enters the tier (numpy is fast only on f32:
docs/VULKAN.md §13), so the tier holds 4 bytes per weight whatever the stored type.

BLAS threads: a BLAS call split over every core waits for its slowest thread, so whenever anything
else holds a core (the prefetch worker converting packs, another process) every call waits out a
scheduler time slice. On the 2-core VM of docs/benchmarks.md ("Run") that made decode 3-35x and
prefill 8-40x slower, while a free second core gains only 1.3-1.4x (decode, memory-bound) and
1.6-1.9x (prefill). So products use one core fewer than the machine has (at least one), leaving
it to the prefetcher and to everything else; `set_threads` sets few-row (decode) and many-row
(prefill) products apart, and OPENBLAS_NUM_THREADS, when set, is taken as it is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ...pack_format.constants import align_up
from ...pack_format.errors import VkpackError
from ...pack_format.records import TensorPart, TensorRecord
from ..alloc import Allocation
from ..backend import PassInputs, Placement, copy_spans
from ..graph import OpWeights, WeightAccess, seq_row_activations
from . import ops
from .dequant import dequantize

if TYPE_CHECKING:
    from ...pack_format.reader import Archive
    from ..prefetch import PackSource

ALIGN = 256


class HostBacking:
    """The device tier's blocks as host memory; an allocation becomes a uint8 view."""

    def __init__(self, block_sizes: list[int]):
        self.blocks = [np.empty(n, dtype=np.uint8) for n in block_sizes]  # pages commit on first write

    def view(self, a: Allocation) -> np.ndarray:
        return self.blocks[a.block][a.offset:a.offset + a.requested]

    def close(self) -> None:
        self.blocks = []


def _part_shape(t: TensorRecord, p: TensorPart) -> tuple[int, ...]:
    if len(t.shape) == 1:
        return t.shape
    return (p.row_end - p.row_start, t.shape[-1])


FEW_ROWS = 8  # below this many rows a product reads its weights once for little arithmetic


class _BlasThreads:
    """The thread count of numpy's OpenBLAS, switched only when it changes (about 1 us a switch).

    One per process (`_blas()`), since the library's setting is. Needs threadpoolctl to reach
    the library; without it (or with another BLAS) nothing is changed.
    """

    def __init__(self) -> None:
        self.libs: list[Any] = []
        self.current: int | None = None
        self.default = max(1, (os.cpu_count() or 1) - 1)  # (unused while no library is reachable)
        try:
            from threadpoolctl import ThreadpoolController

            self.libs = [c for c in ThreadpoolController().lib_controllers if c.internal_api == "openblas"]
        except (ImportError, OSError, AttributeError, ValueError, RuntimeError):
            self.libs = []  # threadpoolctl missing, or a library it cannot query: leave BLAS as it is
        if self.libs:
            self.current = self.libs[0].num_threads
            # one core fewer than BLAS would take, unless its thread count was set by hand
            pinned = any(os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"))
            self.default = self.current if pinned else max(1, self.current - 1)

    def use(self, n: int) -> None:
        if n != self.current and self.libs:
            for c in self.libs:
                c.set_num_threads(n)
            self.current = n


_BLAS: _BlasThreads | None = None


def _blas() -> _BlasThreads:
    global _BLAS
    if _BLAS is None:
        _BLAS = _BlasThreads()
    return _BLAS


class CpuBackend:
    """The numpy backend (runtime/backend.py's contract): f32 weights in host memory, op by op."""

    name = "numpy"
    max_block = 1 << 30
    load_workers = 1
    reserved_bytes = 0

    def __init__(self, archive: Archive, threads: int | None = None):
        self.blas = _blas()
        self.set_threads(threads, threads)
        self.archive = archive
        self.steps = archive.graph["steps"]
        self.slices: dict[int, list[tuple[TensorRecord, TensorPart]]] = {}
        for t in archive.tensors.values():
            for p in t.parts:
                self.slices.setdefault(p.pack, []).append((t, p))
        self._bytes = {pid: sum(align_up(4 * math.prod(_part_shape(t, p)), ALIGN) for t, p in sl)
                       for pid, sl in self.slices.items()}
        widths = archive.activation_widths
        per_seq = seq_row_activations(self.steps)
        self._token_width = sum(w for n, w in widths.items() if n not in per_seq) + moe_scratch_width(self.steps, archive.tensors)
        self._seq_width = sum(w for n, w in widths.items() if n in per_seq)
        self._max_heads = max((op["attrs"]["n_heads"] for s in self.steps for op in s["ops"]
                               if op["op"] == "attention"), default=0)
        self.backing: HostBacking | None = None
        self._seqs: list[tuple[int, int, int, Any]] = []
        self._rope: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def set_threads(self, few_rows: int | None, many_rows: int | None) -> None:
        """BLAS threads for products of fewer than FEW_ROWS rows (decode) and of more (prefill);
        None: the default, one core fewer than the machine has (OPENBLAS_NUM_THREADS if set)."""
        self.threads_few_rows = few_rows or self.blas.default
        self.threads_many_rows = many_rows or self.blas.default

    # ---- memory ----
    def make_backing(self, block_sizes: list[int]) -> HostBacking:
        self.backing = HostBacking(block_sizes)
        return self.backing

    def pack_bytes(self, pack: int) -> int:
        """Bytes a pack takes in the tier (float32 form)."""
        return self._bytes.get(pack, ALIGN)

    def activation_bytes(self, tokens: int, n_ctx: int) -> int:
        """Every activation of a pass over `tokens` tokens (the graph's widths), one layer's attention
        scores, and the last rows twice (numpy allocates each op's output anew)."""
        return 4 * (tokens * self._token_width + self._max_heads * tokens * n_ctx + 2 * self._seq_width)

    def session_activation_bytes(self, tokens: int, n_ctx: int) -> int:
        return self.activation_bytes(tokens, n_ctx)  # each session's passes allocate their own arrays

    def kv_rows(self, n_ctx: int) -> int:
        return n_ctx

    def attach(self, tier: Any, placement: Placement) -> int | None:
        return placement.ram_budget  # decoded packs are worth keeping: converting them is the slow part

    def host_bytes(self) -> int:
        return 0

    def load(self, pack: int, source: PackSource, dest: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
        """Dequantize every tensor slice of the pack into `dest`; returns (name, row_start) -> array."""
        out = {}
        off = 0
        mv = memoryview(source.decoded())
        # ahead of time (a prefetch) the model computes beside us: one core, not all; on demand the
        # executor waits for this pack, so every core helps
        threads = 1 if source.background else None
        for t, p in self.slices.get(pack, []):
            shape = _part_shape(t, p)
            n = math.prod(shape)
            arr = dest[off:off + 4 * n].view(np.float32).reshape(shape)
            dequantize(t.dtype, mv[p.offset:p.offset + p.nbytes], shape, out=arr, threads=threads)
            out[(t.name, p.row_start)] = arr
            off += align_up(4 * n, ALIGN)
        return out

    def kv_view(self, mem: np.ndarray, n_ctx: int, width: int) -> np.ndarray:
        return mem[:n_ctx * width * 4].view(np.float32).reshape(n_ctx, width)

    def copy_kv(self, src: list[tuple[Any, Any]], dst: list[tuple[Any, Any]], n: int) -> None:
        """Row copies between host arrays (the native backend's views are the same arrays)."""
        for pair_src, pair_dst in zip(src, dst, strict=True):
            for s, d in zip(pair_src, pair_dst, strict=True):
                for a, b, k in copy_spans(n, s.shape[0], d.shape[0]):
                    d[b:b + k] = s[a:a + k]

    def close(self) -> None:
        if self.backing is not None:
            self.backing.close()

    # ---- one pass ----
    def host_steps(self, tokens: int) -> frozenset[int]:
        return frozenset()  # every weight comes through the tier

    def placement(self) -> dict[str, Any]:
        return {}

    def forward(self, inputs: PassInputs, weights: WeightAccess) -> np.ndarray:
        acts = self.begin(inputs)
        self.run_steps(range(len(self.steps)), acts, weights)
        return acts[inputs.output]

    def begin(self, inputs: PassInputs) -> dict[str, Any]:
        """A pass's activations by name, holding its inputs (a hybrid plan runs some steps here)."""
        self._seqs = inputs.seqs
        self._rope = {}  # rope tables of this pass's positions, once for every layer
        return {"tokens": inputs.tokens, "positions": inputs.positions}

    def run_steps(self, order: Sequence[int], acts: dict[str, Any], weights: Any) -> None:
        """Steps `order` of the pass `begin` started, op by op (`weights.part(si, oi, name, i)`)."""
        for si in order:
            for oi, op in enumerate(self.steps[si]["ops"]):
                self.run_op(op, acts, OpWeights(weights, si, oi))

    def run_op(self, op: dict[str, Any], env: dict[str, Any], weights: OpWeights) -> None:
        getattr(self, "op_" + op["op"])(op, env, weights)

    # ---- ops (each gets the op dict, the pass's activations by name, and the op's weights) ----
    def op_embed(self, op, env, weights) -> None:
        tokens = env["tokens"]
        name = op["w"][0]
        t = self.archive.tensors[name]
        check_token_ids(tokens, t)
        x = np.zeros((len(tokens), t.shape[-1]), dtype=np.float32)  # never uninitialised rows, whatever the parts
        for part_idx, p in enumerate(t.parts):
            mask = (tokens >= p.row_start) & (tokens < p.row_end)
            if mask.any():
                with weights.part(name, part_idx) as w:
                    self.gather_rows(w, tokens[mask] - p.row_start, x, np.flatnonzero(mask))
        env[op["out"]] = x

    def gather_rows(self, w: Any, rows: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        """out[at[i]] = row rows[i] of the embedding part `w` (this backend's form of it)."""
        out[at] = w[rows]

    def op_rms_norm(self, op, env, weights) -> None:
        a = op["attrs"]
        with weights.part(op["w"][0], 0) as w:
            env[op["out"]] = ops.rms_norm(env[op["in"][0]], w, a["eps"], a.get("group"), a.get("offset") or 0.0)

    def op_linear(self, op, env, weights) -> None:
        x = env[op["in"][0]]
        name = op["w"][0]
        t = self.archive.tensors[name]
        self.blas.use(self.threads_few_rows if x.shape[0] < FEW_ROWS else self.threads_many_rows)
        y = np.empty((x.shape[0], t.shape[0]), dtype=np.float32)
        for part_idx, p in enumerate(t.parts):
            with weights.part(name, part_idx) as w:
                np.matmul(x, w.T, out=y[:, p.row_start:p.row_end])
        if len(op["w"]) > 1:
            with weights.part(op["w"][1], 0) as b:
                y += b
        env[op["out"]] = y

    def matmul(self, w: Any, x: np.ndarray, y: np.ndarray) -> None:
        """y = x @ W.T for one weight part in this backend's form (the native backend's takes it as stored)."""
        self.blas.use(self.threads_few_rows if x.shape[0] < FEW_ROWS else self.threads_many_rows)
        np.matmul(x, w.T, out=y)

    def product(self, name: str, x: np.ndarray, weights: OpWeights) -> np.ndarray:
        """x @ W.T over every row-part of the weight `name`, each part pinned only while it is read."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = self.archive.tensors[name].parts
        y = np.empty((x.shape[0], self.archive.tensors[name].shape[0]), dtype=np.float32)
        for part_idx, p in enumerate(parts):
            with weights.part(name, part_idx) as w:
                self.matmul(w, x, y[:, p.row_start:p.row_end])
        return y

    def op_moe(self, op, env, weights) -> None:
        """Router, top-k experts, optional gated shared expert (docs/FORMAT.md, op moe). Each chosen expert's
        weights are acquired once per pass for all the rows that chose it, and only the chosen ones."""
        a, w = op["attrs"], op["w"]
        x = env[op["in"][0]]                                                      # [T, E]
        idx, gate = ops.route(self.product(w[0], x, weights), a["k"], a["router"], a["norm"])  # [T, k] each
        chosen = np.unique(idx).tolist()
        weights.choose(chosen)
        out = np.zeros(x.shape, dtype=np.float32)
        for e in chosen:  # in expert order, as transformers adds them
            rows, slot = np.nonzero(idx == e)
            out[rows] += self.glu(a["experts"][e], x[rows], weights) * gate[rows, slot][:, None]
        if len(w) >= 4:
            shared = self.glu(w[1:4], x, weights)
            if len(w) == 5:
                shared *= ops.sigmoid(self.product(w[4], x, weights))
            out += shared
        env[op["out"]] = out

    def glu(self, names: list[str], x: np.ndarray, weights: Any) -> np.ndarray:
        """down(silu(gate(x)) * up(x)): one expert (`weights`: anything with `part(name, i)`, as OpWeights)."""
        g = self.product(names[0], x, weights)
        u = self.product(names[1], x, weights)
        return self.product(names[2], ops.swiglu(g, u), weights)

    def op_rope(self, op, env, weights) -> None:
        a = op["attrs"]
        key = ("rope", a["rope_dim"], a["theta"], id(a.get("freq_factors")))
        cache = self._rope
        if key not in cache:  # once per forward pass: every layer rotates by the same angles
            cos, sin = ops.rope_tables(env["positions"], a["rope_dim"], a["theta"], a.get("freq_factors"))
            cache[key] = cos, sin, ops.rope_rotation(cos, sin)
        cos, sin, rot = cache[key]
        env[op["out"]] = ops.rope(env[op["in"][0]], cos, sin, a["n_heads"], a["head_dim"], a["rope_dim"], a["mode"], rot)

    def op_attention(self, op, env, weights) -> None:
        a = op["attrs"]
        q, k, v = (env[n] for n in op["in"])
        seqs = self._seqs
        out = np.empty_like(q) if len(seqs) > 1 else None
        for r0, r1, pos0, kv in seqs:
            kc, vc = kv[a["layer"]]
            ops.kv_store(kc, vc, k[r0:r1], v[r0:r1], pos0, a.get("window"))   # a ring wraps (runtime/kv.py)
            o = ops.attention(q[r0:r1], kc, vc, pos0, a["n_heads"], a["n_kv_heads"], a["head_dim"], a["scale"],
                              a.get("softcap"), a.get("window"))
            if out is None:
                out = o  # one sequence: its rows are the whole output, no copy
            else:
                out[r0:r1] = o
        env[op["out"]] = out

    def op_add(self, op, env, weights) -> None:
        a, b = (env[n] for n in op["in"])
        if op["out"] == op["in"][0] and a.flags.writeable and a.base is None:
            np.add(a, b, out=a)  # the residual stream: its old value is overwritten by name anyway
        else:
            env[op["out"]] = a + b

    def op_swiglu(self, op, env, weights) -> None:
        g, u = (env[n] for n in op["in"])
        env[op["out"]] = ops.swiglu(g, u)

    def op_geglu(self, op, env, weights) -> None:
        g, u = (env[n] for n in op["in"])
        env[op["out"]] = ops.geglu(g, u)

    def op_scale(self, op, env, weights) -> None:
        env[op["out"]] = env[op["in"][0]] * np.float32(op["attrs"]["factor"])

    def op_softcap(self, op, env, weights) -> None:
        env[op["out"]] = ops.softcap(env[op["in"][0]], op["attrs"]["cap"])

    def op_last_token(self, op, env, weights) -> None:
        x = env[op["in"][0]]
        env[op["out"]] = x[[r1 - 1 for _, r1, _, _ in self._seqs]]


def moe_scratch_width(steps: list[dict[str, Any]], tensors: dict[str, TensorRecord]) -> int:
    """Floats per token a moe op allocates besides its output (router scores and choice, one expert's gate,
    up, product and result, the sum): room each pass reserves beside the graph's own activations."""
    width = 0
    for s in steps:
        for op in s["ops"]:
            if op["op"] == "moe":
                names = [*op["attrs"]["experts"], op["w"][1:4] if len(op["w"]) >= 4 else []]
                ffn = max(tensors[n[0]].shape[0] for n in names if n)
                width = max(width, 2 * len(op["attrs"]["experts"]) + 2 * op["attrs"]["k"] + 3 * ffn
                            + 2 * tensors[op["w"][0]].shape[1])
    return width


def check_token_ids(tokens: np.ndarray, table: TensorRecord) -> None:
    """Every id must name a row of the embedding table that its parts cover (docs/FORMAT.md, embed):
    a row outside them would otherwise be left unwritten."""
    covered = np.zeros(len(tokens), dtype=bool)
    for p in table.parts:
        covered |= (tokens >= p.row_start) & (tokens < p.row_end)
    if not covered.all():
        bad = int(tokens[np.flatnonzero(~covered)[0]])
        raise VkpackError(f"token id {bad} is outside the embedding table {table.name!r} "
                          f"({table.shape[0]} rows)")
