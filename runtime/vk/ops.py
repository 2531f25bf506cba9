"""One recording function per shader: the engine-facing kernel API of the Vulkan backend.

Every function records into a `Recorder` (nothing runs until `rec.submit()`), takes activations as
`Buffer`s or `BufferSlice`s of f32 and weights as `Weight`s (raw GGML/safetensors bytes already in a
device buffer), and picks the shader variant and specialization constants for the device.

Shapes use the engine's row-major convention: x is (T, n) with T tokens; a linear weight is
(rows = out features, cols = in features) and computes y[t, r] = sum_c x[t, c] * W[r, c].
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from .errors import VulkanError
from .kernels import BufferSlice, Kernel, as_slice, get_kernel
from .memory import Buffer
from .recorder import Recorder

# dtype -> (elements per block, bytes per block, elements per shader unit, unit window "SPAN");
# must match common/dequant.glsl
WEIGHT_FORMATS = {
    "F32": (1, 4, 4, 4), "F16": (1, 2, 8, 8), "BF16": (1, 2, 8, 8), "Q8_0": (32, 34, 8, 8),
    "Q4_0": (32, 18, 8, 32), "Q4_1": (32, 20, 8, 32), "Q4_K": (256, 144, 16, 64), "Q6_K": (256, 210, 16, 16),
}


@dataclass(frozen=True)
class Weight:
    """A (rows, cols) weight as stored (GGML blocks or plain floats) at byte `offset` of `buffer`.

    `offset` must be a multiple of 16; every row is a whole number of blocks.
    """

    buffer: Buffer
    offset: int
    dtype: str
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.dtype not in WEIGHT_FORMATS:
            raise VulkanError(f"weight dtype {self.dtype!r} not supported; supported: {', '.join(WEIGHT_FORMATS)}")
        block, _, unit, _ = WEIGHT_FORMATS[self.dtype]
        if self.rows <= 0 or self.cols <= 0 or self.cols % max(block, unit):
            raise VulkanError(f"{self.dtype} weight ({self.rows}, {self.cols}): cols must be a positive multiple of "
                              f"{max(block, unit)}")
        if self.offset % 16:
            raise VulkanError(f"weight offset {self.offset} is not a multiple of 16")
        if self.offset + self.nbytes > self.buffer.size:
            raise VulkanError(f"weight [{self.offset}, {self.offset + self.nbytes}) outside buffer of "
                              f"{self.buffer.size} bytes")

    @property
    def row_bytes(self) -> int:
        block, bb, _, _ = WEIGHT_FORMATS[self.dtype]
        return self.cols // block * bb

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _nbytes(b: Any) -> int:
    return as_slice(b).size


def _sub(b: Any, offset: int, size: int) -> BufferSlice:
    s = as_slice(b)
    return BufferSlice(s.buffer, s.offset + offset, size)


class Ops:
    """Kernel recording for one device. Tunables are attributes (set before recording)."""

    def __init__(self, dev: Any):
        self.dev = dev
        info = dev.info
        self.cpu = info.type == "cpu"
        self.suffix = "" if info.subgroup_arithmetic else "_nosg"
        sg = max(1, info.subgroup_size)
        # lavapipe: one subgroup per workgroup, no barriers, is fastest (VULKAN_NOTES); GPUs: 128-256.
        self.mm_wg = sg if self.cpu else 128
        # Matmul defaults measured on an H200 (8192x8192 F16, T = 1..512) and on lavapipe.
        self.mm_rows = 4 if self.cpu else 2     # rows per workgroup (each x load serves all of them)
        self.mm_max_tokens = 8                  # tokens per workgroup for T > 1 (weight reuse factor)
        self.mm_units = 1 if self.cpu else 2    # weight units loaded per invocation before use
        # from this T on: the shared-memory tiled matmul (on lavapipe, barriers make it slower: never)
        self.mm_tiled_min_tokens = 1 << 30 if self.cpu else 64
        self.mm_tile: tuple[int, int, int, int] | None = None   # (BM, BN, TM, TN); None: chosen by T
        self.red_wg = sg if self.cpu else 256    # rms_norm, argmax
        self.attn_wg = sg if self.cpu else 64
        self.ew_wg = 64 if self.cpu else 256     # elementwise: rope, add, swiglu, kv_store, embed
        self._walign = max(16, info.min_storage_buffer_offset_alignment)

    # ---- helpers ----

    def _k(self, name: str, n_bind: int, push: int, writes: tuple[int, ...], spec: dict[int, Any],
           reduce: bool = False) -> Kernel:
        return get_kernel(self.dev, name + (self.suffix if reduce else ""), n_bind, push, writes, spec)

    def _grid(self, n: int) -> tuple[int, int]:
        """Split n workgroups into (x, z) with x <= the device limit (65535 at least)."""
        lim = self.dev.info.max_workgroup_count[0]
        x = min(n, lim)
        return x, -(-n // x)

    def _weight_slice(self, w: Weight, row0: int, rows: int) -> tuple[BufferSlice, int]:
        """Bind rows [row0, row0+rows) of w: (slice at an aligned offset, byte offset of row0 inside it)."""
        start = w.offset + row0 * w.row_bytes
        base = start // self._walign * self._walign
        end = min(w.buffer.size, -(-(start + rows * w.row_bytes) // 16) * 16)
        return BufferSlice(w.buffer, base, end - base), start - base

    def _row_parts(self, w: Weight) -> list[tuple[int, int]]:
        """Row ranges whose bytes fit one binding (maxStorageBufferRange)."""
        per = (self.dev.info.max_storage_buffer_range - 2 * self._walign) // w.row_bytes
        if per <= 0:
            raise VulkanError(f"one row of {w.row_bytes} bytes exceeds maxStorageBufferRange")
        return [(r, min(per, w.rows - r)) for r in range(0, w.rows, per)]

    # ---- linear ----

    def linear(self, rec: Recorder, w: Weight, x: Any, y: Any, T: int, *, x_stride: int | None = None,
               y_stride: int | None = None, y_col: int = 0, bias: Any = None, bias_off: int = 0,
               accumulate: bool = False) -> None:
        """y[t, y_col + r] (+)= x[t, :] @ W[r, :] (+ bias[bias_off + r]) for r < w.rows, t < T.

        x: (T, x_stride) f32, x_stride default w.cols (multiple of 4). y: (T, y_stride) f32, y_stride
        default w.rows; use y_col/y_stride to write one row-part of a split weight into a shared output.
        Weights larger than one binding are split into several dispatches automatically.
        """
        xs = w.cols if x_stride is None else x_stride
        ys = w.rows if y_stride is None else y_stride
        if xs % 4 or xs < w.cols:
            raise VulkanError(f"linear: x_stride {xs} must be a multiple of 4 and >= cols {w.cols}")
        if y_col + w.rows > ys:
            raise VulkanError(f"linear: y_col {y_col} + rows {w.rows} > y_stride {ys}")
        if _nbytes(x) < ((T - 1) * xs + w.cols) * 4 or _nbytes(y) < ((T - 1) * ys + y_col + w.rows) * 4:
            raise VulkanError(f"linear: x ({_nbytes(x)} B) or y ({_nbytes(y)} B) too small for T={T}")
        if bias is not None and _nbytes(bias) < (bias_off + w.rows) * 4:
            raise VulkanError(f"linear: bias of {_nbytes(bias)} B too small for {bias_off + w.rows} floats")
        if T >= self.mm_tiled_min_tokens:
            bm, bn, tm, tn = self.mm_tile or ((128, 64, 8, 4) if T >= 256 else (64, 64, 4, 4))
            bk = max(32, WEIGHT_FORMATS[w.dtype][3])
            while bk * (bm + bn) * 4 > self.dev.info.max_shared_memory and bn > tn:
                bn //= 2            # Q4_K's 64-wide K step on a 48 KiB device: narrower token tile
            if bk * (bm + bn) * 4 > self.dev.info.max_shared_memory:
                raise VulkanError(f"linear: tile {bm}x{bn}x{bk} needs more shared memory than "
                                  f"{self.dev.info.max_shared_memory} bytes; lower Ops.mm_tile")
            spec = {0: (bm // tm) * (bn // tn), 1: bm, 2: bn, 3: bk, 4: tm, 5: tn}
            k = self._k(f"matmul_tiled_{w.dtype.lower()}", 4, 36, (3,), spec)
            nr, nt = bm, bn
        else:
            nt = 1 if T == 1 else min(self.mm_max_tokens, _pow2_at_least(T))
            nr = self.mm_rows
            k = self._k(f"matmul_{w.dtype.lower()}", 4, 36, (3,), {0: self.mm_wg, 1: nr, 2: nt, 3: self.mm_units},
                        reduce=True)
        flags = (1 if bias is not None else 0) | (2 if accumulate else 0)
        for r0, rows in self._row_parts(w):
            wslice, woff = self._weight_slice(w, r0, rows)
            gx, gz = self._grid(-(-rows // nr))
            push = struct.pack("<9I", rows, w.cols, T, woff, xs, ys, y_col + r0, bias_off + r0, flags)
            rec.dispatch(k, [wslice, x, bias if bias is not None else y, y], (gx, -(-T // nt), gz), push)

    def embed(self, rec: Recorder, w: Weight, ids: Any, out: Any, T: int, *, out_stride: int | None = None,
              id_off: int = 0, keep_outside: bool = False) -> None:
        """out[t, :] = dequantized row (ids[t] - id_off) of w; ids outside give zeros (or are left as they
        are with keep_outside, for tables split into row-parts). ids: (T) uint32; out: (T, out_stride) f32."""
        os_ = w.cols if out_stride is None else out_stride
        if os_ % 4 or os_ < w.cols:
            raise VulkanError(f"embed: out_stride {os_} must be a multiple of 4 and >= cols {w.cols}")
        unit = WEIGHT_FORMATS[w.dtype][2]
        k = self._k(f"embed_{w.dtype.lower()}", 3, 28, (2,), {0: self.ew_wg})
        for i, (r0, rows) in enumerate(self._row_parts(w)):
            wslice, woff = self._weight_slice(w, r0, rows)
            keep = keep_outside or i > 0
            push = struct.pack("<7I", rows, w.cols, T, woff, os_, id_off + r0, 1 if keep else 0)
            rec.dispatch(k, [wslice, ids, out], (-(-(w.cols // unit) // self.ew_wg), T, 1), push)

    # ---- normalization, rope, elementwise ----

    def rms_norm(self, rec: Recorder, x: Any, w: Any, y: Any, n_groups: int, n: int, eps: float) -> None:
        """y[g, :] = x[g, :] / sqrt(mean(x[g, :]^2) + eps) * w for n_groups groups of n floats (y may be x)."""
        k = self._k("rms_norm", 3, 12, (2,), {0: self.red_wg}, reduce=True)
        gx, gz = self._grid(n_groups)
        rec.dispatch(k, [x, w, y], (gx, 1, gz), struct.pack("<2If", n_groups, n, eps))

    def rope(self, rec: Recorder, x: Any, pos: Any, T: int, n_heads: int, head_dim: int, *,
             n_rot: int | None = None, mode: str = "norm", base: float = 10000.0, freq_scale: float = 1.0,
             freq_factors: Any = None, stride: int | None = None) -> None:
        """Rotate x (T, stride) in place; mode "norm" (pairs 2i, 2i+1) or "neox" (pairs i, i + n_rot/2)."""
        n_rot = head_dim if n_rot is None else n_rot
        if n_rot % 2 or n_rot > head_dim or mode not in ("norm", "neox"):
            raise VulkanError(f"rope: n_rot {n_rot} must be even and <= head_dim {head_dim}; mode {mode!r}")
        stride = n_heads * head_dim if stride is None else stride
        k = self._k("rope", 3, 36, (0,), {0: self.ew_wg})
        push = struct.pack("<7I2f", T, n_heads, head_dim, n_rot, stride, 0 if mode == "norm" else 1,
                           1 if freq_factors is not None else 0, base, freq_scale)
        n = n_heads * (n_rot // 2)
        rec.dispatch(k, [x, pos, freq_factors if freq_factors is not None else pos],
                     (-(-n // self.ew_wg), T, 1), push)

    def _elementwise(self, rec: Recorder, name: str, a: Any, b: Any, out: Any, n: int) -> None:
        k = self._k(name, 3, 4, (2,), {0: self.ew_wg})
        gx, gz = self._grid(-(-n // self.ew_wg))
        rec.dispatch(k, [a, b, out], (gx, 1, gz), struct.pack("<I", n))

    def add(self, rec: Recorder, a: Any, b: Any, out: Any, n: int) -> None:
        """out = a + b over n floats (out may be a)."""
        self._elementwise(rec, "add", a, b, out, n)

    def swiglu(self, rec: Recorder, g: Any, u: Any, out: Any, n: int) -> None:
        """out = silu(g) * u over n floats (out may be g or u)."""
        self._elementwise(rec, "swiglu", g, u, out, n)

    def argmax(self, rec: Recorder, x: Any, out: Any, rows: int, n: int, stride: int | None = None) -> None:
        """out[r] = argmax(x[r, :n]) as uint32 (greedy sampling on the device)."""
        k = self._k("argmax", 2, 12, (1,), {0: self.red_wg}, reduce=True)
        gx, gz = self._grid(rows)
        rec.dispatch(k, [x, out], (gx, 1, gz), struct.pack("<3I", rows, n, n if stride is None else stride))

    def last_token(self, rec: Recorder, x: Any, out: Any, T: int, n: int) -> None:
        """out[:n] = x[T-1, :n] (x is (T, n) f32)."""
        self.copy_rows(rec, x, out, [T - 1], n)

    def copy_rows(self, rec: Recorder, x: Any, out: Any, rows: list[int], n: int) -> None:
        """out[i, :] = x[rows[i], :] for (·, n) f32 matrices (the last token of each sequence of a batch)."""
        for i, r in enumerate(rows):
            rec.copy(_sub(x, r * n * 4, n * 4), _sub(out, i * n * 4, n * 4), n * 4)

    # ---- attention ----

    def kv_store(self, rec: Recorder, k: Any, v: Any, k_cache: Any, v_cache: Any, pos: Any, T: int,
                 kv_dim: int, n_ctx: int, *, f16: bool = False, k_stride: int | None = None,
                 v_stride: int | None = None, t0: int = 0) -> None:
        """k_cache[pos[t], :] = k[t, :], v_cache[pos[t], :] = v[t, :] for rows t0..t0+T-1 of k, v, pos;
        caches (n_ctx, kv_dim) f32 or f16. Positions >= n_ctx are skipped (the engine must check them)."""
        ks = kv_dim if k_stride is None else k_stride
        vs = kv_dim if v_stride is None else v_stride
        if kv_dim % 2 or ks % 2 or vs % 2:
            raise VulkanError(f"kv_store: kv_dim {kv_dim} and strides must be even")
        kern = self._k("kv_store_f16" if f16 else "kv_store_f32", 5, 24, (2, 3), {0: self.ew_wg})
        rec.dispatch(kern, [k, v, k_cache, v_cache, pos], (-(-(kv_dim // 2) // self.ew_wg), T, 1),
                     struct.pack("<6I", T, kv_dim, n_ctx, ks, vs, t0))

    def attention(self, rec: Recorder, q: Any, k_cache: Any, v_cache: Any, pos: Any, out: Any, T: int,
                  n_heads: int, n_kv_heads: int, head_dim: int, n_ctx: int, *, f16: bool = False,
                  scale: float | None = None, q_stride: int | None = None, o_stride: int | None = None,
                  t0: int = 0) -> None:
        """out[t, h] = softmax(q[t, h] . K[0..pos[t]] * scale) @ V[0..pos[t]] for rows t0..t0+T-1 of q, pos,
        out (one sequence of a batch; its cache holds rows 0..max pos); grouped-query heads."""
        if n_heads % n_kv_heads or head_dim % 4:
            raise VulkanError(f"attention: n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads} "
                              f"and head_dim {head_dim} a multiple of 4")
        qs = n_heads * head_dim if q_stride is None else q_stride
        os_ = n_heads * head_dim if o_stride is None else o_stride
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        kern = self._k("attention_f16" if f16 else "attention_f32", 5, 32, (4,),
                       {0: self.attn_wg, 1: head_dim}, reduce=True)
        rec.dispatch(kern, [q, k_cache, v_cache, pos, out], (n_heads, T, 1),
                     struct.pack("<6IfI", T, n_heads, n_kv_heads, n_ctx, qs, os_, scale, t0))
