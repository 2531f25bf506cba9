"""The native CPU backend: weights stay as stored in host memory; products run in the native kernels.

The numpy backend converts every weight to f32 (4 to 8 times the bytes) and multiplies with BLAS;
this one keeps each pack's bytes as the archive stores them (F16, BF16, GGML blocks) and reads them
in place with `vkp_matmul` (runtime/native/kernels.c): the bytes streamed per token are the model's
own size, which is what bounds decode on a CPU. Everything but the products (norms, rope, attention,
residual adds, SwiGLU) is the numpy backend's own code, its numeric reference, except at prefill
(`NATIVE_OPS_MIN_TOKENS` tokens and more) on AVX-512: causal attention and SwiGLU then run in the
kernels too (runtime/native/ops.h, on both cores; numpy's took ~0.9 s of a 512-token prefill of a
2048-wide model on one core, the native ones ~0.15 s), within a few f32 ulps of the reference.

Passes of a few tokens (decode, small batches) run as native programs instead (program.py, program.h):
a run of steps (every layer of a resident model or of a hybrid plan's CPU segment; a streamed model's
steps whose packs two of the largest hold) written once as a table of instructions and run in one
parallel region, where op by op a decode step went back to Python ~10 times (SmolLM2 on the 2-core VM:
81 tok/s against 52-58; streamed in a 59 MiB tier, 25-30 against 20-23; `VKPACK_STEP_PROGRAMS=0` turns
them off).

Products of many tokens (prefill) are compute bound rather than memory bound: the kernels switch to
a GEMM on decoded panels of the stored rows (runtime/native/gemm.h), on all the backend's threads;
measured on the 2-core AVX-512 VM at 128 and 512 tokens it ran 1.2-3x faster than dequantizing tiles
for numpy's BLAS (on one thread, the numpy backend's rule, or two). A portable-C build (no x86 SIMD,
e.g. ARM) keeps the tiles + BLAS from `BLAS_MIN_TOKENS` on: its GEMM was never measured against BLAS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...pack_format.constants import align_up
from ...pack_format.records import TensorRecord
from ..cpu.backend import CpuBackend
from ..cpu.dequant import dequantize as dequantize_reference
from ..tiers import BudgetError
from . import dequantize as native_dequantize
from . import load as load_kernels
from .loader import BoundWeight, NativeUnavailable
from .program import StepProgram

if TYPE_CHECKING:
    from ...pack_format.reader import Archive
    from ..prefetch import PackSource

ALIGN = 256
BLAS_MIN_TOKENS = 16        # portable builds: from this many tokens on, dequantized tiles + BLAS
TILE_BYTES = 8 << 20        # f32 bytes of one dequantized tile (a few MiB: stays in the last-level cache)
NATIVE_OPS_MIN_TOKENS = 16  # from this many tokens attention and SwiGLU run in ops.h (decode keeps numpy's)


@dataclass(frozen=True)
class StoredMatrix:
    """Rows [row_start, row_end) of a weight as stored: `data` is rows * row_bytes bytes (uint8);
    `product(x, out, threads)` multiplies them into activations (checked once, at load)."""

    data: np.ndarray
    dtype: str
    rows: int
    cols: int
    row_bytes: int
    product: BoundWeight


class NativeCpuBackend(CpuBackend):
    """Weights as stored, products by the native kernels, every other op the numpy reference's."""

    name = "cpu"

    def __init__(self, archive: Archive, threads: int | None = None):
        super().__init__(archive, threads)
        kernels = load_kernels()
        if kernels is None:
            raise NativeUnavailable("native kernels unavailable (see the warning above)")
        self.kernels = kernels
        self.threads = threads or os.cpu_count() or 1
        self._extra = {pid: sum(align_up(4 * t.shape[0], ALIGN) for t, _p in sl if _vector_needs_f32(t))
                       for pid, sl in self.slices.items()}
        self._tile: np.ndarray | None = None
        # tiles + BLAS only where the kernels are portable C; elsewhere their own GEMM is faster
        self.blas_min_tokens = BLAS_MIN_TOKENS if kernels.simd == "portable" else None
        # the f32 tile of the BLAS path: TILE_BYTES, or the largest weight part when that is smaller
        parts = [4 * (p.row_end - p.row_start) * t.shape[-1] for t in archive.tensors.values() if len(t.shape) == 2
                 for p in t.parts]
        self.tile_bytes = min(TILE_BYTES, max(parts, default=0)) if self.blas_min_tokens else 0
        self._max_cols = max((t.shape[-1] for t in archive.tensors.values() if len(t.shape) == 2), default=0)
        # decode steps as one native call each (program.h); VKPACK_STEP_PROGRAMS=0 runs them op by op
        self.programs = (StepProgram(kernels.run_program, self.steps, archive.tensors, archive.activation_widths,
                                     self.threads)
                         if os.environ.get("VKPACK_STEP_PROGRAMS", "1").strip().lower() not in ("0", "off", "no")
                         else None)
        self.resident = False
        # what a streamed tier may pin at once (`_can_pin`): two of the largest packs, as the budgets keep
        self._weight_room = 2 * max((self.pack_bytes(p) for p in range(len(archive.packs))), default=0)
        self._pinnable: dict[tuple[int, int], bool] = {}

    # ---- memory ----
    def pack_bytes(self, pack: int) -> int:
        """The pack's bytes as stored, plus f32 copies of vectors stored in another type."""
        return align_up(self.archive.packs[pack].raw_size, ALIGN) + self._extra.get(pack, 0)

    def activation_bytes(self, tokens: int, n_ctx: int) -> int:
        extra = self.tile_bytes if self._blas(tokens) else self._gemm_bytes(tokens)
        if tokens >= NATIVE_OPS_MIN_TOKENS:
            extra = max(extra, self._attention_bytes(n_ctx))
        return super().activation_bytes(tokens, n_ctx) + extra

    def _gemm_bytes(self, tokens: int) -> int:
        """What gemm.h mallocs in one product: x transposed (tokens rounded up to 16), and per thread
        a decoded panel and the accumulators of 96 rows or C_BLOCK (512 KiB), whichever is more (an
        upper bound for every SIMD path)."""
        t = align_up(tokens, 16)
        return 4 * t * (self._max_cols + 16) + self.threads * (max(4 * 96 * t, 512 << 10) + 4 * 6 * 1040)

    def _attention_bytes(self, n_ctx: int) -> int:
        """What ops.h's attention mallocs: the keys transposed, and per thread 16 rows of scores."""
        att = [op["attrs"] for s in self.steps for op in s["ops"] if op["op"] == "attention"]
        kv = max((a["n_kv_heads"] * a["head_dim"] for a in att), default=0)
        hd = max((a["head_dim"] for a in att), default=0)
        return 4 * (kv * (n_ctx + 80) + self.threads * 16 * (2 * hd + n_ctx + 80))

    def _blas(self, tokens: int) -> bool:
        return self.blas_min_tokens is not None and tokens >= self.blas_min_tokens

    def load(self, pack: int, source: PackSource, dest: np.ndarray) -> dict[tuple[str, int], Any]:
        """The pack's bytes into `dest` (read from the file when it is stored raw: no mmap pages, no copy
        in between), described as stored matrices and f32 vectors."""
        raw_size = self.archive.packs[pack].raw_size
        if not source.read_into(dest[:raw_size]):
            dest[:raw_size] = np.frombuffer(memoryview(source.decoded()).cast("B"), dtype=np.uint8)
        return self.describe(pack, dest[:raw_size], dest)

    def describe(self, pack: int, raw: np.ndarray, dest: np.ndarray | None = None) -> dict[tuple[str, int], Any]:
        """The pack's parts over its bytes `raw` (uint8, wherever they are: nothing is copied), as stored
        matrices and f32 vectors; vectors stored in another type are converted into `dest` after its
        first `raw_size` bytes (`pack_bytes` counts that room), which a pack holding such vectors needs."""
        raw_size = self.archive.packs[pack].raw_size
        out: dict[tuple[str, int], Any] = {}
        extra = align_up(raw_size, ALIGN)
        for t, p in self.slices.get(pack, []):
            part = raw[p.offset:p.offset + p.nbytes]
            if len(t.shape) == 1:
                if _vector_needs_f32(t):
                    if dest is None:
                        raise ValueError(f"pack {pack}: {t.name} needs an f32 copy, and no room was given")
                    vec = dest[extra:extra + 4 * t.shape[0]].view(np.float32)
                    dequantize_reference(t.dtype, memoryview(part), t.shape, out=vec)
                    extra += align_up(4 * t.shape[0], ALIGN)
                else:
                    vec = part.view(np.float32)
                out[(t.name, p.row_start)] = vec
            else:
                rows = p.row_end - p.row_start
                out[(t.name, p.row_start)] = StoredMatrix(part, t.dtype, rows, t.shape[-1], p.nbytes // rows,
                                                          self.kernels.bind(t.dtype, part, rows, t.shape[-1]))
        return out

    def attach(self, tier: Any, placement: Any) -> int | None:
        self.resident = placement.resident   # every pack stays: a whole step may be pinned at once
        return super().attach(tier, placement)

    def begin(self, inputs: Any) -> dict[str, Any]:
        """As the numpy backend's, with numpy's BLAS on one thread: here it only runs attention's small
        products, and its idle threads spin on the cores the kernels' OpenMP threads need (a product then
        waits 10-20 ms for a descheduled thread: measured, SmolLM2 prefill 2-3x slower)."""
        self.blas.use(1)
        if self.programs is not None:
            self.programs.begin()
        return super().begin(inputs)

    def run_steps(self, order: Sequence[int], acts: dict[str, Any], weights: Any) -> None:
        """Runs of steps as native programs where they can be (`_program`), the rest op by op."""
        order = list(order)
        i = 0
        while i < len(order):
            n = self._program(order, i, acts, weights)
            if n == 0:
                super().run_steps(order[i:i + 1], acts, weights)
                n = 1
            i += n

    def _program(self, order: list[int], i: int, acts: dict[str, Any], weights: Any) -> int:
        """Steps order[i:i + n] through program.py, their packs held meanwhile; returns n, 0 where
        order[i] is not for a program (prefill, an op without an instruction, a step too big to pin in
        a streamed tier). A run is as long as its steps are consecutive, supported and can all be pinned
        at once (`_can_pin`)."""
        programs = self.programs
        si = order[i]
        if (programs is None or not programs.supported[si] or not 0 < len(acts["positions"]) < programs.max_tokens
                or not self._can_pin(weights, range(si, si + 1))):
            return 0
        end = i + 1
        while (end < len(order) and order[end] == order[end - 1] + 1 and programs.supported[order[end]]
               and self._can_pin(weights, range(si, order[end] + 1))):
            end += 1
        steps = range(si, order[end - 1] + 1)
        held: list[Any] = []
        payloads: dict[int, list[dict[Any, Any]]] = {}
        try:
            for s in steps:
                try:
                    entries = weights.hold_step(s, self.steps[s], None)
                except BudgetError:
                    return 0   # the packs pinned so far split the room: op by op, a part at a time
                held += entries
                payloads[s] = [e.payload for e in entries]
            tensors = self.archive.tensors

            def lookup(s: int, name: str, part_idx: int) -> Any:
                key = (name, tensors[name].parts[part_idx].row_start)
                for p in payloads[s]:
                    w = p.get(key)
                    if w is not None:
                        return w.product if isinstance(w, StoredMatrix) else w
                raise KeyError(key)

            return len(steps) if programs.run(steps, acts, lookup, self._seqs) else 0
        finally:
            weights.release(held)

    def _can_pin(self, weights: Any, steps: range) -> bool:
        """Whether every pack of `steps` may be pinned at once: always where weights stay put (a resident
        tier, a hybrid's held ones); in a streamed tier while they are at most two of the largest packs,
        the weight room every budget keeps (runtime/tiers.py). Bigger steps go op by op, part by part."""
        if self.resident or weights.holds_every_weight:
            return True
        key = (steps.start, steps.stop)
        ok = self._pinnable.get(key)
        if ok is None:
            tensors = self.archive.tensors
            packs = {p.pack for s in steps for op in self.steps[s]["ops"] for name in op["w"]
                     for p in tensors[name].parts}
            ok = self._pinnable[key] = sum(self.pack_bytes(p) for p in packs) <= self._weight_room
        return ok

    # ---- ops that read weights as stored ----
    def gather_rows(self, w: StoredMatrix, rows: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        """Each embedding row dequantized from its stored bytes (the numpy backend's op_embed calls this)."""
        rb = w.row_bytes
        for r, i in zip(rows.tolist(), at.tolist()):
            native_dequantize(w.dtype, w.data[r * rb:(r + 1) * rb], 1, w.cols, out[i:i + 1], 1)

    def op_linear(self, op, env, weights) -> None:
        x = np.ascontiguousarray(env[op["in"][0]], dtype=np.float32)
        name = op["w"][0]
        t = self.archive.tensors[name]
        n_tok = x.shape[0]
        y = np.empty((n_tok, t.shape[0]), dtype=np.float32)
        for part_idx, p in enumerate(t.parts):
            with weights.part(name, part_idx) as w:
                self.matmul(w, x, y[:, p.row_start:p.row_end])
        if len(op["w"]) > 1:
            with weights.part(op["w"][1], 0) as b:
                y += b
        env[op["out"]] = y

    # ---- prefill ops in the kernels (ops.h) ----
    def op_attention(self, op, env, weights) -> None:
        """As the numpy backend's, each sequence's rows by `vkp_attention` on all threads (prefill only;
        softcap and sliding windows, and builds without the kernel, keep numpy's: a windowed layer's
        cache may be a ring, runtime/kv.py, which only numpy's path indexes)."""
        a = op["attrs"]
        q, k, v = (env[n] for n in op["in"])
        if q.shape[0] < NATIVE_OPS_MIN_TOKENS or a.get("softcap") or a.get("window"):
            return super().op_attention(op, env, weights)
        out = np.empty((q.shape[0], a["n_heads"] * a["head_dim"]), dtype=np.float32)
        for r0, r1, pos0, kv in self._seqs:
            kc, vc = kv[a["layer"]]
            kc[pos0:pos0 + r1 - r0] = k[r0:r1]
            vc[pos0:pos0 + r1 - r0] = v[r0:r1]
            if not self.kernels.attention(q[r0:r1], kc, vc, pos0, a["n_heads"], a["n_kv_heads"], a["head_dim"],
                                          a["scale"], out[r0:r1], self.threads):
                return super().op_attention(op, env, weights)   # rewrites the same cache rows
        env[op["out"]] = out

    def op_swiglu(self, op, env, weights) -> None:
        g, u = (env[n] for n in op["in"])
        if (g.shape[0] >= NATIVE_OPS_MIN_TOKENS and g.shape == u.shape and g.dtype == u.dtype == np.float32
                and g.flags.c_contiguous and u.flags.c_contiguous):
            out = np.empty_like(g)
            if self.kernels.swiglu(g, u, out, self.threads):
                env[op["out"]] = out
                return
        super().op_swiglu(op, env, weights)

    def stored_matrix(self, dtype: str, data: np.ndarray, rows: int, cols: int) -> StoredMatrix:
        """A `rows` x `cols` weight stored as `dtype` in `data` (uint8), bound for the kernels."""
        return StoredMatrix(data, dtype, rows, cols, len(data) // rows, self.kernels.bind(dtype, data, rows, cols))

    def matmul(self, w: StoredMatrix, x: np.ndarray, y: np.ndarray) -> None:
        """y = x @ W.T by the product this backend runs for x's row count (the hybrid planner's rates
        time this very call)."""
        if self._blas(x.shape[0]):
            self._blas_product(w, x, y)
        elif self.programs is not None and 0 < x.shape[0] < self.programs.max_tokens:
            self.programs.product(w.product, x, y)   # as a step's products run: the planner times this
        else:
            w.product(x, y, self.threads)

    def _blas_product(self, w: StoredMatrix, x: np.ndarray, y: np.ndarray) -> None:
        """y = x @ W.T, W dequantized a tile of rows at a time into one reused f32 buffer."""
        tile_rows = max(1, self.tile_bytes // (4 * w.cols))
        if self._tile is None or self._tile.size < tile_rows * w.cols:
            self._tile = np.empty(tile_rows * w.cols, dtype=np.float32)
        self.blas.use(self.threads_many_rows)
        for r0 in range(0, w.rows, tile_rows):
            r1 = min(w.rows, r0 + tile_rows)
            tile = self._tile[:(r1 - r0) * w.cols].reshape(r1 - r0, w.cols)
            native_dequantize(w.dtype, w.data[r0 * w.row_bytes:r1 * w.row_bytes], r1 - r0, w.cols, tile, self.threads)
            np.matmul(x, tile.T, out=y[:, r0:r1])


def _vector_needs_f32(t: TensorRecord) -> bool:
    return len(t.shape) == 1 and t.dtype != "F32"
