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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vkpack.pack_format.constants import DTYPES
from vkpack.shaders.variants import COOP_TYPES, WEIGHT_TYPES

from .errors import VulkanError
from .kernels import BufferSlice, Kernel, as_slice, get_kernel
from .memory import Buffer
from .recorder import Recorder

MOE_MAX_BLOCKS = 16   # moe_matvec.comp's MAX_BLOCKS: the tier blocks one dispatch can read experts from
MOE_GROUP_SLOTS = 32  # moe_matmul.comp's BN: the slots (rows of one expert) one workgroup's tile holds
MOE_BATCH_SLOTS = 64  # the batched experts' table (moe_matvec.comp, moe_route.comp): (row, expert) slots at most

if TYPE_CHECKING:
    from vkpack.pack_format.records import TensorRecord

# dtype -> (elements per shader unit, unit window "SPAN"); must match common/dequant.glsl
_SHADER_UNITS = {
    "F32": (4, 4), "F16": (8, 8), "BF16": (8, 8), "Q8_0": (8, 8),
    "Q4_0": (8, 32), "Q4_1": (8, 32), "Q5_0": (8, 32), "Q5_1": (8, 32), "IQ4_NL": (8, 32), "IQ4_XS": (8, 32),
    "Q2_K": (16, 16), "Q3_K": (16, 16), "Q4_K": (16, 64), "Q5_K": (16, 64), "Q6_K": (16, 16),
}
assert _SHADER_UNITS.keys() == WEIGHT_TYPES.keys(), "a weight format needs both a WTYPE and its shader units"
# dtype -> (elements per block, bytes per block, elements per shader unit, unit window "SPAN");
# the block sizes are the format's (pack_format.constants.DTYPES)
WEIGHT_FORMATS = {name: (*DTYPES[name], *unit) for name, unit in _SHADER_UNITS.items()}


def unreadable_types(tensors: Iterable[TensorRecord]) -> list[str]:
    """The stored types among `tensors` (an archive's records) that the Vulkan backend cannot read, sorted:
    matrices are read as stored by the shaders (WEIGHT_FORMATS); vectors get an f32 copy from the numpy
    dequantizer on upload (uploads.py). Needs no device, so a backend can be chosen before one opens."""
    from ..cpu.dequant import SUPPORTED

    return sorted({t.dtype for t in tensors if t.dtype not in (WEIGHT_FORMATS if len(t.shape) > 1 else SUPPORTED)})


def unsupported_message(types: list[str]) -> str:
    """One line: the stored types the Vulkan backend cannot run, the ones it can, and what to do."""
    return (f"the Vulkan backend has no kernel for the archive's weight type(s) {', '.join(types)} (its shaders "
            f"read {', '.join(WEIGHT_FORMATS)}); run it with --device cpu")


SPLIT_COUNTER_BYTES = 4 << 20  # split-K attention counters: 4096 token rows x 256 head groups


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


def live_rows(n_ctx: int, window: int) -> int:
    """Cache rows one query may read: all n_ctx, or the last `window` (what the split plan covers)."""
    return min(n_ctx, window) if window else n_ctx


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _nbytes(b: Any) -> int:
    return as_slice(b).size


def _sub(b: Any, offset: int, size: int) -> BufferSlice:
    s = as_slice(b)
    return BufferSlice(s.buffer, s.offset + offset, size)


def _rope_args(rope: dict[str, Any], hd: int, who: str) -> tuple[int, int, Any, float, float]:
    """(n_rot, 1 if neox else 0, freq_factors, base, freq_scale) of a kernel's fused RoPE (kv_store's
    `rope` dict), checked against head_dim `hd`."""
    n_rot, mode = rope.get("n_rot") or hd, rope.get("mode", "norm")
    if rope.get("head_dim", hd) != hd or hd % 2 or n_rot % 2 or n_rot > hd or mode not in ("norm", "neox"):
        raise VulkanError(f"{who}: rope n_rot {n_rot}, mode {mode!r}, head_dim {rope.get('head_dim')} "
                          f"do not fit head_dim {hd}")
    return n_rot, 0 if mode == "norm" else 1, rope.get("freq_factors"), rope["base"], rope.get("freq_scale", 1.0)


def _cover(parts: list[Any]) -> tuple[BufferSlice, list[int]]:
    """One binding over slices of one buffer (descriptor sets hold 8): (the slice, float offset of each)."""
    ss = [as_slice(b) for b in parts]
    lo, hi = min(s.offset for s in ss), max(s.offset + s.size for s in ss)
    if any(s.buffer is not ss[0].buffer or (s.offset - lo) % 4 for s in ss):
        raise VulkanError("attention: q and new_kv must be float-aligned slices of one buffer")
    return BufferSlice(ss[0].buffer, lo, hi - lo), [(s.offset - lo) // 4 for s in ss]


class Ops:
    """Kernel recording for one device. Tunables are attributes (set before recording)."""

    def __init__(self, dev: Any):
        self.dev = dev
        info = dev.info
        self.cpu = info.type == "cpu"
        self.suffix = "" if info.subgroup_arithmetic else "_nosg"
        sg = max(1, info.subgroup_size)
        # lavapipe: one subgroup per workgroup, no barriers, is fastest (docs/VULKAN.md §9). GPUs, T > 1: H100,
        # 8B Q4_K_M, steps of 8 sequences (`tools/device/splitk.sh sweep`, workgroup x rows): 128 x 2 517 tok/s,
        # 128 x 4 513, 64 x 4 562, 32 x 2 461 (the tiled kernel: 379-385).
        self.mm_wg = sg if self.cpu else 64
        self.mm_rows = 4                        # rows per workgroup (each x load serves all of them)
        self.mm_max_tokens = 8                  # tokens per workgroup for T > 1 (weight reuse factor)
        self.mm_units = 1                       # weight units loaded per invocation before use (sweep_matvec)
        # matmul.comp's sums of a workgroup of several subgroups: all in one barrier (False: two barriers each)
        self.mm_one_barrier = True
        # T = 1 in matmul.comp: (workgroup, rows, units) by fusion (0 none, 1 norm, 2 SwiGLU) where they
        # differ from mm_*: a fused product loads x (and the norm weight or u) again in every workgroup.
        # H100, `tools/sweep_matvec.py --by-role`: two units in flight won 1-4 % on the 1B and 8B shapes
        # except under SwiGLU (8B down projection); decode 675.6 -> 701.9 tok/s (1B), 151.0 -> 153.2 (8B).
        self.mv_config: dict[int, tuple[int, int, int]] = {} if self.cpu else {0: (128, 2, 2), 1: (128, 2, 2),
                                                                               2: (128, 2, 1)}
        # T = 1 weight types that run faster unfused, with their own (workgroup, rows, units): their decoders,
        # not memory, bound them, and loading the norm (or u) in every workgroup costs them more than the norm's
        # and SwiGLU's own dispatches. H100, `tools/sweep_matvec.py --shape 8b --dtype T --layers 4`, fused
        # default -> unfused below: Q4_K 467 -> 713 GB/s, Q8_0 1470 -> 1946, Q4_0 802 -> 997, Q6_K 822 -> 945
        # (F16: 2489 -> 2650, less than the extra dispatches cost; it stays fused). Q4_K since codes became
        # floats without conversions (common/dequant.glsl), H200: 949 GB/s at (128, 1, 1), 980 at (128, 2, 1).
        self.mv_unfused: dict[str, tuple[int, int, int]] = {} if self.cpu else {
            "Q4_K": (128, 2, 1), "Q6_K": (128, 2, 1), "Q8_0": (128, 2, 2), "Q4_0": (128, 2, 1)}
        # up to this T the mv_unfused types skip the fusions too: H100, 8B Q4_K_M, 8 sequences a step
        # (tools/bench_batch.py --ops): 281.7 tok/s fused, 389.8 unfused (32 rows take the tensor cores)
        self.unfused_max_tokens = 8
        # T = 1 weight types that run shaders/matvec_k.comp (scales applied per sub-block, x loaded once for
        # the rows a subgroup computes), with its (workgroup, rows a subgroup computes together, rows per
        # workgroup, chunks in flight per lane). H200, `tools/sweep_matvec.py --shape 8b --dtype T`: Q6_K 1256
        # GB/s at one subgroup of one row, against 956 for matmul.comp (1055 at (128, 2, 8, 1)); Q4_K 969, and
        # matmul.comp 980, so Q4_K stays there.
        self.mv_kquant: dict[str, tuple[int, int, int, int]] = {} if self.cpu else {"Q6_K": (sg, 1, 1, 1)}
        # T = 1: one subgroup per row group, no barriers (shaders/matvec.comp); False: matmul.comp
        self.mv_subgroup = False
        self.mv_wg, self.mv_rows, self.mv_units = (sg, 4, 1) if self.cpu else (128, 1, 4)
        # from this T on: the shared-memory tiled matmul (on lavapipe, barriers make it slower: never)
        self.mm_tiled_min_tokens = 1 << 30 if self.cpu else 64
        self.mm_tile: tuple[int, int, int, int] | None = None   # (BM, BN, TM, TN); None: chosen by T
        # tensor cores (matmul_coop.comp, VK_NV_cooperative_matrix) from this T on, for COOP_TYPES weights
        self.coop = bool(getattr(dev, "coopmat_f16", False))
        self.mm_coop_min_tokens = 32
        self.mm_coop_tile: tuple[int, int, int, int, int] | None = None  # (BM, BN, BK, WM, WN); None: by size
        self.mm_coop_min_groups = 128           # default tile: the widest that still gives this many workgroups
        # split-K for the tiled and tensor-core matmuls: a product with fewer workgroups than this has its K
        # cut into slices (summed in order by splitk_sum.comp) until it has about as many. H100 profile, 8B
        # Q4_K_M: a 32-sequence step's tensor-core products took 282 us each (224 workgroups of 2 subgroups,
        # latency-bound) where one sequence's matrix-vector products take 20 us. 0: never split.
        self.mm_split_groups = 0 if self.cpu else 1024
        self.mm_split_min_steps = 4             # K steps a slice keeps at least
        self.mm_split_bytes = 16 << 20          # the pass's room for the slices' partial products
        self.red_wg = sg if self.cpu else 256    # rms_norm, argmax
        # rms_norm of one row (a decode token): one wide workgroup, few elements per invocation
        self.red_wg_single = (self.red_wg if self.cpu
                              else 1 << (min(1024, info.max_workgroup_invocations).bit_length() - 1))
        self.attn_wg = sg if self.cpu else 64
        # split-K decode attention (attention_split + attention_merge) for T <= attn_split_max_tokens
        self.attn_split_max_tokens = 16          # more tokens: the one-pass kernel has workgroups enough
        # H200, 8B shape, n_ctx 8192: rows 64 / wg 128 best at L <= 4096; 128 rows (the cap) at L = 8192
        self.attn_split_rows = 256 if self.cpu else 64   # cache rows per split (at least: attention_splits)
        self.attn_max_splits = 64                # caps the splits (and scratch): longer splits at long n_ctx
        self.attn_split_wg = sg if self.cpu else 128
        self.attn_merge_wg = sg if self.cpu else 128
        self.ew_wg = 64 if self.cpu else 256     # elementwise: rope, add, swiglu, kv_store, embed
        self._walign = max(16, info.min_storage_buffer_offset_alignment)
        self.attn_fused_merge = True   # the split kernel's last workgroup merges (no attention_merge pass)
        self.attn_fused_store = True   # decode: the split kernel takes rope(q) and the KV store (fusion.py)
        self._counters: Buffer | None = None

    # ---- helpers ----

    def configure(self, workgroup_size: int | None = None, subgroups: bool = True, fp32: bool = False) -> None:
        """The user's kernel settings (--workgroup-size, --no-subgroups, --fp32) over the defaults.

        workgroup_size: invocations of every workgroup-size specialization constant (the tiled and
        cooperative-matrix matmuls size theirs from their tiles). subgroups=False: shared-memory
        reductions everywhere (the `_nosg` variants; split-K attention needs subgroups, so the
        one-pass kernel runs). fp32: no kernel rounds activations to fp16 (the tensor-core prefill
        does; it is left out)."""
        if not subgroups:
            self.suffix = "_nosg"
        if workgroup_size is not None:
            lim = self.dev.info.max_workgroup_invocations
            if not 1 <= workgroup_size <= lim:
                raise VulkanError(f"--workgroup-size {workgroup_size}: must be 1..{lim} on {self.dev.info.name}")
            if self.suffix and workgroup_size & (workgroup_size - 1):
                raise VulkanError(f"--workgroup-size {workgroup_size}: must be a power of 2 without subgroups "
                                  "(shared-memory tree reductions)")
            for attr in ("mm_wg", "mv_wg", "red_wg", "red_wg_single", "attn_wg", "ew_wg", "attn_split_wg",
                         "attn_merge_wg"):
                setattr(self, attr, workgroup_size)
            self.mv_config = {f: (workgroup_size, nr, nu) for f, (_, nr, nu) in self.mv_config.items()}
        if fp32:
            self.coop = False

    def _k(self, name: str, n_bind: int, push: int, writes: tuple[int, ...], spec: dict[int, Any],
           reduce: bool = False, arrays: dict[int, int] | None = None) -> Kernel:
        return get_kernel(self.dev, name + (self.suffix if reduce else ""), n_bind, push, writes, spec, arrays)

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

    def _coop_kernel(self, dtype: str, T: int, rows: int) -> tuple[Kernel, int, int]:
        """The cooperative-matrix matmul for dtype: (kernel, rows per workgroup, tokens per workgroup)."""
        tile = self.mm_coop_tile
        if tile is None:    # H200: 32x32 per subgroup is best; narrower tiles when workgroups are few
            tiles = ((128, 64, 32, 4, 2), (128, 32, 32, 4, 1), (64, 32, 32, 2, 1))
            tile = next((t for t in tiles if -(-rows // t[0]) * -(-T // t[1]) >= self.mm_coop_min_groups),
                        tiles[-1])
        bm, bn, bk, wm, wn = tile
        span = WEIGHT_FORMATS[dtype][3]
        bk = -(-max(bk, span) // span) * span

        def smem(bm: int, bn: int) -> int:  # 2 x f16 tiles of (bm + bn) x bk (+16 B a row), f32 staging
            return 2 * (bm + bn) * (bk // 8 + 1) * 16 + wm * wn * 1024

        while smem(bm, bn) > self.dev.info.max_shared_memory:   # Q4_K's 64-wide K step on a 48 KiB device
            if bm >= bn and bm > 16 * wm:
                bm //= 2
            elif bn > 16 * wn:
                bn //= 2
            else:
                break
        if bm % (16 * wm) or bn % (16 * wn) or bk % 16 or bm > 64 * wm or bn > 64 * wn \
                or smem(bm, bn) > self.dev.info.max_shared_memory:
            raise VulkanError(f"linear: coop tile {bm}x{bn}x{bk} with {wm}x{wn} subgroups (64x64 at most each) is "
                              f"invalid or needs more than {self.dev.info.max_shared_memory} B of shared memory")
        spec = {0: wm * wn * self.dev.info.subgroup_size, 1: bm, 2: bn, 3: bk, 4: wm, 5: wn}
        return self._k(f"matmul_coop_{dtype.lower()}", 4, 44, (3,), spec), bm, bn

    def split_scratch_bytes(self, T: int) -> int:
        """Bytes of the `split` room linear() wants for passes of T tokens (0: it never splits them)."""
        tiled = T >= self.mm_tiled_min_tokens or (self.coop and T >= self.mm_coop_min_tokens)
        return self.mm_split_bytes if self.mm_split_groups and tiled else 0

    def _k_slices(self, groups: int, T: int, rows: int, cols: int, bk: int, room: int) -> tuple[int, int]:
        """(K steps per slice, slices) for a tiled product of `groups` workgroups: enough slices to reach
        mm_split_groups, each at least mm_split_min_steps steps, their partials within `room` bytes.
        (0, 1): no split."""
        nk = -(-cols // bk)
        want = min(-(-self.mm_split_groups // groups), nk // self.mm_split_min_steps, room // (4 * T * rows))
        if want < 2:
            return 0, 1
        ksteps = -(-nk // want)
        return ksteps, -(-nk // ksteps)

    # ---- linear ----

    def linear(self, rec: Recorder, w: Weight, x: Any, y: Any, T: int, *, x_stride: int | None = None,
               y_stride: int | None = None, y_col: int = 0, bias: Any = None, bias_off: int = 0,
               accumulate: bool = False, norm: tuple[Any, float] | None = None, glu_up: Any = None,
               split: Any = None) -> None:
        """y[t, y_col + r] (+)= x[t, :] @ W[r, :] (+ bias[bias_off + r]) for r < w.rows, t < T.

        Fusions (only where `fuses(T)`): norm=(weight, eps) uses rms_norm(x[t]) * weight as x;
        glu_up=u uses silu(x) * u as x (u laid out as x).

        x: (T, x_stride) f32, x_stride default w.cols (multiple of 4). y: (T, y_stride) f32, y_stride
        default w.rows; use y_col/y_stride to write one row-part of a split weight into a shared output.
        Weights larger than one binding are split into several dispatches automatically.
        split: room (split_scratch_bytes(T) bytes) where the tiled and tensor-core kernels may keep the
        partial products of K slices when they would have few workgroups; None: no split.
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
        fuse = (1 if norm is not None else 0) | (2 if glu_up is not None else 0)
        kind = self._linear_kernel(T, w.dtype)
        if fuse and kind != "matmul":
            raise VulkanError(f"linear: norm/glu fusion is not available for T={T} ({w.dtype})")
        bk = 0  # the K step of a tiled kernel (split-K cuts K into whole steps)
        if kind == "coop":
            k, nr, nt = self._coop_kernel(w.dtype, T, w.rows)
            bk = k.spec[3]
        elif kind == "tiled":
            bm, bn, tm, tn = self.mm_tile or ((128, 64, 8, 4) if T >= 256 else (64, 64, 4, 4))
            bk = max(32, WEIGHT_FORMATS[w.dtype][3])
            while bk * (bm + bn) * 4 > self.dev.info.max_shared_memory and bn > tn:
                bn //= 2            # Q4_K's 64-wide K step on a 48 KiB device: narrower token tile
            if bk * (bm + bn) * 4 > self.dev.info.max_shared_memory:
                raise VulkanError(f"linear: tile {bm}x{bn}x{bk} needs more shared memory than "
                                  f"{self.dev.info.max_shared_memory} bytes; lower Ops.mm_tile")
            spec = {0: (bm // tm) * (bn // tn), 1: bm, 2: bn, 3: bk, 4: tm, 5: tn}
            k = self._k(f"matmul_tiled_{w.dtype.lower()}", 4, 44, (3,), spec)
            nr, nt = bm, bn
        elif kind == "matvec":
            nr, nt = self.mv_rows * max(1, self.mv_wg // max(1, self.dev.info.subgroup_size)), 1
            k = self._k(f"matvec_{w.dtype.lower()}", 4, 36, (3,),
                        {0: self.mv_wg, 1: self.mv_rows, 2: nr, 3: self.mv_units})
        elif kind == "matvec_k":
            wg, nr_sg, nr, nc = self.mv_kquant[w.dtype]
            if wg % self.dev.info.subgroup_size or nr % nr_sg:
                raise VulkanError(f"linear: mv_kquant {w.dtype} {self.mv_kquant[w.dtype]}: the workgroup must be a "
                                  f"multiple of the subgroup ({self.dev.info.subgroup_size}) and the rows of the rows "
                                  "a subgroup computes")
            k, nt = self._k(f"matvec_k_{w.dtype.lower()}", 4, 36, (3,), {0: wg, 1: nr_sg, 2: nr, 3: nc}), 1
        else:
            nt = 1 if T == 1 else min(self.mm_max_tokens, _pow2_at_least(T))
            wg, nr, nu = self.mm_wg, self.mm_rows, self.mm_units
            if T == 1:
                wg, nr, nu = (self.mv_unfused[w.dtype] if not fuse and w.dtype in self.mv_unfused
                              else self.mv_config.get(fuse, (wg, nr, nu)))
            k = self._k(f"matmul_{w.dtype.lower()}", 6, 40, (3,),
                        {0: wg, 1: nr, 2: nt, 3: nu, 4: fuse, 5: self.mm_one_barrier}, reduce=True)
        flags = (1 if bias is not None else 0) | (2 if accumulate else 0)
        room = _nbytes(split) if split is not None and bk else 0
        for r0, rows in self._row_parts(w):
            wslice, woff = self._weight_slice(w, r0, rows)
            gx, gz = self._grid(-(-rows // nr))
            ksteps, slices = self._k_slices(-(-rows // nr) * -(-T // nt), T, rows, w.cols, bk, room) if room else (0, 1)
            if slices > 1:   # partials into `split`, then their sum into y
                push = struct.pack("<11I", rows, w.cols, T, woff, xs, rows, 0, 0, 0, ksteps, T * rows)
                parts = _sub(split, 0, 4 * slices * T * rows)
                rec.dispatch(k, [wslice, x, x, parts], (gx, -(-T // nt) * slices, gz), push)
                self._split_sum(rec, parts, bias if bias is not None else x, y, rows, T, slices,
                                (ys, y_col + r0, bias_off + r0, flags))
                continue
            push = struct.pack("<9I", rows, w.cols, T, woff, xs, ys, y_col + r0, bias_off + r0, flags)
            if kind in ("coop", "tiled"):
                push += struct.pack("<2I", 0, 0)
            # the rows this dispatch writes (one token: a contiguous range), so that the row-parts
            # of a split weight are not separated by barriers; an unused bias slot binds x (read anyway)
            touched = {3: (4 * (y_col + r0), 4 * (y_col + r0 + rows))} if T == 1 else None
            binds = [wslice, x, bias if bias is not None else x, y]
            if kind == "matmul":  # matmul.comp: the fusion inputs (x again where unused)
                push += struct.pack("<f", norm[1] if norm is not None else 0.0)
                binds += [glu_up if glu_up is not None else x, norm[0] if norm is not None else x]
            rec.dispatch(k, binds, (gx, -(-T // nt), gz), push, touched)

    def _split_sum(self, rec: Recorder, parts: Any, bias: Any, y: Any, rows: int, T: int, slices: int,
                   out: tuple[int, int, int, int]) -> None:
        """y[t, y_off + r] (+)= the slices' partials summed in order (+ bias); out: (y_stride, y_off, b_off, flags)."""
        k = self._k("splitk_sum", 3, 32, (2,), {0: self.ew_wg})
        gx, gz = self._grid(-(-(rows * T) // self.ew_wg))
        rec.dispatch(k, [parts, bias, y], (gx, 1, gz), struct.pack("<8I", rows, T, slices, T * rows, *out))

    def _linear_kernel(self, T: int, dtype: str) -> str:
        """Which kernel linear() runs for T tokens: "coop", "tiled", "matvec_k", "matvec" or "matmul"."""
        if self.coop and T >= self.mm_coop_min_tokens and dtype in COOP_TYPES:
            return "coop"
        if T >= self.mm_tiled_min_tokens:
            return "tiled"
        if T == 1 and dtype in self.mv_kquant and not self.suffix:
            return "matvec_k"
        if T == 1 and self.mv_subgroup and not self.suffix:
            return "matvec"
        return "matmul"

    def fuses(self, T: int, dtype: str) -> bool:
        """Whether linear() runs matmul.comp for T tokens (the kernel with the norm/GLU fusions) and the
        fusions pay for this weight type (not the `mv_unfused` ones up to `unfused_max_tokens`)."""
        return self._linear_kernel(T, dtype) == "matmul" and not (T <= self.unfused_max_tokens
                                                                   and dtype in self.mv_unfused)

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

    def rms_norm(self, rec: Recorder, x: Any, w: Any, y: Any, n_groups: int, n: int, eps: float,
                 offset: float = 0.0) -> None:
        """y[g, :] = x[g, :] / sqrt(mean(x[g, :]^2) + eps) * (w + offset) for n_groups groups of n floats (y may be x)."""
        # one group (a decode token): one wide workgroup, few elements per invocation (latency bound)
        wg = self.red_wg if n_groups > 1 else self.red_wg_single
        k = self._k("rms_norm", 3, 16, (2,), {0: wg}, reduce=True)
        gx, gz = self._grid(n_groups)
        rec.dispatch(k, [x, w, y], (gx, 1, gz), struct.pack("<2I2f", n_groups, n, eps, offset))

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

    def geglu(self, rec: Recorder, g: Any, u: Any, out: Any, n: int) -> None:
        """out = gelu(g) * u over n floats, gelu's tanh form (gemma's MLP; out may be g or u)."""
        self._elementwise(rec, "geglu", g, u, out, n)

    def _unary(self, rec: Recorder, x: Any, out: Any, n: int, mode: int, c: float) -> None:
        k = self._k("unary", 2, 12, (1,), {0: self.ew_wg})
        gx, gz = self._grid(-(-n // self.ew_wg))
        rec.dispatch(k, [x, out], (gx, 1, gz), struct.pack("<2If", n, mode, c))

    def scale(self, rec: Recorder, x: Any, out: Any, n: int, factor: float) -> None:
        """out = factor * x over n floats (out may be x)."""
        self._unary(rec, x, out, n, 0, factor)

    def softcap(self, rec: Recorder, x: Any, out: Any, n: int, cap: float) -> None:
        """out = cap * tanh(x / cap) over n floats (out may be x)."""
        self._unary(rec, x, out, n, 1, cap)

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

    def _moe_rows(self, rec: Recorder, src: Any, dst: Any, route: Any, m: int, n: int, idx_off: int, w_off: int,
                  mode: int, src_stride: int | None, dst_stride: int | None, rows: int | None = None) -> None:
        ss, ds = n if src_stride is None else src_stride, n if dst_stride is None else dst_stride
        k = self._k("moe_rows", 3, 28, (1,), {0: self.ew_wg})
        rec.dispatch(k, [src, dst, route], (-(-n // self.ew_wg), m if rows is None else rows, 1),
                     struct.pack("<7I", m, n, ss, ds, idx_off, w_off, mode))

    def sum_rows(self, rec: Recorder, src: Any, dst: Any, route: Any, m: int, n: int, rows: int, idx_off: int,
                 w_off: int) -> None:
        """dst[r, :n] += sum over i < m with idx[i] == r (in order) of w[i] * src[i, :n], for r < rows: the
        batched experts' slots added to their rows (several slots per row)."""
        self._moe_rows(rec, src, dst, route, m, n, idx_off, w_off, 2, None, None, rows)

    def sum_rows_by_list(self, rec: Recorder, src: Any, dst: Any, table: Any, m: int, n: int, base: int,
                         rows: int) -> None:
        """dst[r, :n] += sum of w[s] * src[s, :n] over the slots s listed for each row r (moe_rows.comp's mode 3:
        the lists, rows and weights from uint `base` of `table`, laid out for m slots; at most `rows` rows)."""
        self._moe_rows(rec, src, dst, table, m, n, base, 0, 3, None, None, rows)

    def moe_route(self, rec: Recorder, logits: Any, places: Any, table: Any, shared: Any, ids: Any, T: int, n: int,
                  k: int, sigmoid: bool, norm: bool, has_shared: bool, ids_off: int, places_off: int) -> None:
        """The router's top-k on the device (moe_route.comp): from logits (T, n + 1) f32, the batched experts'
        table for T * k slots (row-major, each row's experts in order) with each expert's places read from
        `places` (3 x (block, byte offset) per expert from uint places_off), the chosen experts into `ids`
        from uint ids_off, and with `has_shared` the shared expert's rows and gate weights into `shared`."""
        if k > 16:
            raise VulkanError(f"moe_route: k={k} > 16")
        kern = self._k("moe_route", 5, 28, (2, 3, 4), {})
        flags = (1 if sigmoid else 0) | (2 if norm else 0) | (4 if has_shared else 0)
        rec.dispatch(kern, [logits, places, table, shared, ids], (-(-T // 64), 1, 1),
                     struct.pack("<7I", T, n, k, n + 1, flags, ids_off, places_off))

    def moe_matmul_fits(self, dtype: str) -> bool:
        """Whether moe_matmul.comp's tiles of `dtype` fit the device's shared memory (24.7 KB for the K-quants'
        64-wide step; Vulkan guarantees 16 KB)."""
        bm, bn, bk = _moe_tile(dtype)
        return 4 * (bk * bm + bk * bn + bn) <= self.dev.info.max_shared_memory   # Ws, Xs, xrow

    def moe_matmul(self, rec: Recorder, dtype: str, blocks: list[Any], x: Any, table: Any, y: Any, rows: int,
                   cols: int, groups: int, x_stride: int, y_stride: int, tbl_off: int, rows_off: int | None) -> None:
        """y[j, :rows] = x[xrow(j), :] @ W_g.T for the slots j of every group g < groups (moe_matmul.comp): per
        group (4 uint32 from uint tbl_off of `table`) its weight's tier block and byte offset, its first slot and
        its count (at most MOE_GROUP_SLOTS; 0: unused); xrow(j) = table[rows_off + j], or j where rows_off is None."""
        if not self.moe_matmul_fits(dtype):
            raise VulkanError(f"moe_matmul: {dtype} tiles need more than {self.dev.info.max_shared_memory} B of "
                              "shared memory")
        (bm, bn, bk), tm, tn = _moe_tile(dtype), 4, 2
        k = self._k(f"moe_matmul_{dtype.lower()}", MOE_MAX_BLOCKS + 3, 24, (MOE_MAX_BLOCKS + 2,),
                    {0: (bm // tm) * (bn // tn), 1: bm, 2: bn, 3: bk, 4: tm, 5: tn}, arrays={0: MOE_MAX_BLOCKS})
        gx, gz = self._grid(-(-rows // bm))
        push = struct.pack("<6I", rows, cols, x_stride, y_stride, tbl_off, 0xFFFFFFFF if rows_off is None else rows_off)
        rec.dispatch(k, [*_tier_binds("moe_matmul", blocks), x, table, y], (gx, groups, gz), push)

    def moe_matvec(self, rec: Recorder, dtype: str, blocks: list[Any], x: Any, table: Any, y: Any, rows: int,
                   cols: int, slots: int, x_stride: int, y_stride: int, tbl_off: int) -> None:
        """y[yrow(s), r] = x[xrow(s), :] @ W_s[r, :] for every slot s < slots, each W_s (rows, cols) of `dtype`
        at (tier block, byte offset) given by `table` (4 uint32 a slot from uint tbl_off: block, offset, x row,
        y row), `blocks` the tier's buffers (at most MOE_MAX_BLOCKS; unused slots of the array bind the first)."""
        nr = self.mv_rows * max(1, self.mv_wg // max(1, self.dev.info.subgroup_size))
        k = self._k(f"moe_matvec_{dtype.lower()}", MOE_MAX_BLOCKS + 3, 20, (MOE_MAX_BLOCKS + 2,),
                    {0: self.mv_wg, 1: self.mv_rows, 2: nr, 3: self.mv_units}, arrays={0: MOE_MAX_BLOCKS})
        gx, gz = self._grid(-(-rows // nr))
        rec.dispatch(k, [*_tier_binds("moe_matvec", blocks), x, table, y], (gx, slots, gz),
                     struct.pack("<5I", rows, cols, x_stride, y_stride, tbl_off))

    def gather_rows(self, rec: Recorder, src: Any, dst: Any, route: Any, m: int, n: int, idx_off: int, *,
                    src_stride: int | None = None, dst_stride: int | None = None) -> None:
        """dst[i, :n] = src[idx[i], :n] for i < m, idx: m uint32 at uint offset idx_off of `route`
        (the rows that chose one expert, packed)."""
        self._moe_rows(rec, src, dst, route, m, n, idx_off, 0, 0, src_stride, dst_stride)

    def scatter_add_rows(self, rec: Recorder, src: Any, dst: Any, route: Any, m: int, n: int, idx_off: int,
                         w_off: int, *, src_stride: int | None = None, dst_stride: int | None = None) -> None:
        """dst[idx[i], :n] += w[i] * src[i, :n] for i < m; idx (uint32) and w (f32) at uint offsets idx_off
        and w_off of `route`. The idx must be distinct (one expert's rows)."""
        self._moe_rows(rec, src, dst, route, m, n, idx_off, w_off, 1, src_stride, dst_stride)

    # ---- attention ----

    def kv_store(self, rec: Recorder, k: Any, v: Any, k_cache: Any, v_cache: Any, pos: Any, T: int,
                 kv_dim: int, n_ctx: int, *, f16: bool = False, k_stride: int | None = None,
                 v_stride: int | None = None, t0: int = 0, rope: dict[str, Any] | None = None,
                 ring: int = 0) -> None:
        """k_cache[pos[t], :] = k[t, :], v_cache[pos[t], :] = v[t, :] for rows t0..t0+T-1 of k, v, pos;
        caches (n_ctx, kv_dim) f32 or f16. Positions >= n_ctx are skipped (the engine must check them).
        ring > 0: the caches are rings of `ring` rows (sliding-window layers, runtime/kv.py), position p
        at row p % ring, and no position is skipped.

        rope: rotate the keys on the way in, as rope() would (keys: head_dim, n_rot, mode, base, and
        optionally freq_scale, freq_factors): the decode fusion of rope(k) and the store."""
        ks = kv_dim if k_stride is None else k_stride
        vs = kv_dim if v_stride is None else v_stride
        if kv_dim % 2 or ks % 2 or vs % 2:
            raise VulkanError(f"kv_store: kv_dim {kv_dim} and strides must be even")
        if rope is not None:
            hd = rope["head_dim"]
            if kv_dim % hd:
                raise VulkanError(f"kv_store: rope head_dim {hd} does not divide kv_dim {kv_dim}")
            n_rot, neox, ff, base, fscale = _rope_args(rope, hd, "kv_store")
            kern = self._k("kv_store_rope_f16" if f16 else "kv_store_rope_f32", 6, 52, (2, 3), {0: self.ew_wg})
            push = struct.pack("<10I2fI", T, kv_dim, n_ctx, ks, vs, t0, hd, n_rot, neox,
                               1 if ff is not None else 0, base, fscale, ring)
            rec.dispatch(kern, [k, v, k_cache, v_cache, pos, ff if ff is not None else pos],
                         (-(-(kv_dim // 2) // self.ew_wg), T, 1), push)
            return
        kern = self._k("kv_store_f16" if f16 else "kv_store_f32", 5, 28, (2, 3), {0: self.ew_wg})
        rec.dispatch(kern, [k, v, k_cache, v_cache, pos], (-(-(kv_dim // 2) // self.ew_wg), T, 1),
                     struct.pack("<7I", T, kv_dim, n_ctx, ks, vs, t0, ring))

    def attention_splits(self, T: int, n_ctx: int) -> tuple[int, int] | None:
        """(rows per split at least, n_splits) when attention() takes the split kernels for T tokens, else
        None. A split holds R = max(rows, ceil(L / n_splits)) of the L live rows, computed on the device."""
        if self.suffix or T > self.attn_split_max_tokens:
            return None  # the split kernel needs subgroup ops
        return self.attn_split_rows, max(1, min(self.attn_max_splits, -(-n_ctx // self.attn_split_rows)))

    @property
    def split_counter_bytes(self) -> int:
        """Device bytes of the split kernel's finished-split counters (none where it never runs)."""
        return 0 if self.attention_splits(1, 1) is None else SPLIT_COUNTER_BYTES

    def attention_scratch_bytes(self, T: int, n_heads: int, head_dim: int, n_ctx: int, window: int = 0) -> int:
        """Bytes of the `scratch` that attention() needs for these sizes (0: it needs none)."""
        plan = self.attention_splits(T, live_rows(n_ctx, window))
        if plan is None:
            return 0
        n, acc_bytes = self._split_partials(T, n_heads, head_dim, plan[1])
        return acc_bytes + n * 8

    def _split_partials(self, T: int, n_heads: int, head_dim: int, n_splits: int) -> tuple[int, int]:
        """(partials, bytes of their sums) in the split kernel's scratch; their (m, l) pairs follow."""
        n = T * n_heads * n_splits
        return n, -(-n * head_dim * 4 // self._walign) * self._walign

    def _split_counters(self, n: int) -> Buffer:
        """Zeroed uint32 counters the split kernel counts finished splits in (each group's last
        workgroup resets its counter, so they stay zero between passes)."""
        if self._counters is None or self._counters.size < 4 * n:
            if self._counters is not None:
                self.dev.wait_idle()
                self._counters.destroy()
            self._counters = self.dev.alloc(max(4 * n, SPLIT_COUNTER_BYTES))
            rec = Recorder(self.dev, label="zero counters")
            try:
                rec.fill(self._counters, 0)
                rec.run()
            finally:
                rec.destroy()
        return self._counters

    def attention(self, rec: Recorder, q: Any, k_cache: Any, v_cache: Any, pos: Any, out: Any, T: int,
                  n_heads: int, n_kv_heads: int, head_dim: int, n_ctx: int, *, f16: bool = False,
                  scale: float | None = None, q_stride: int | None = None, o_stride: int | None = None,
                  t0: int = 0, scratch: Any = None, new_kv: tuple[Any, Any] | None = None,
                  rope: dict[str, Any] | None = None, window: int = 0, softcap: float = 0.0,
                  ring: int = 0) -> None:
        """out[t, h] = softmax(q[t, h] . K[0..pos[t]] * scale) @ V[0..pos[t]] for rows t0..t0+T-1 of q, pos,
        out (one sequence of a batch; its cache holds rows 0..max pos); grouped-query heads.

        With `scratch` (attention_scratch_bytes(T, ...) bytes, if not 0) few tokens take the split-K
        kernels: many workgroups per token, each K/V row read once per kv head. Without, one workgroup
        per (head, token) walks all rows (fine for prefill, where T gives the parallelism).

        new_kv = (k, v), (·, n_kv_heads * head_dim) f32 rows t0.., slices of q's buffer (one binding
        covers all three): the pass's keys and values at the consecutive positions pos[t0].., not yet
        in the caches. The split kernel reads those rows from k, v and writes them into the caches as
        kv_store() would; rope (kv_store's dict) rotates q and the new keys as rope() would. The decode
        fusion: no rope or kv_store dispatch, no barrier before attention. Needs the split kernel
        (attention_splits, scratch). window > 0: query t sees rows pos[t] - window + 1 .. pos[t] only;
        softcap > 0: each scaled score s becomes softcap * tanh(s / softcap). ring > 0 (with a window): the
        caches are rings of `ring` rows, position j at row j % ring (kv_store's), which must hold the
        live rows of the pass at once (window + T - 1 once positions pass the ring's rows); the splits
        cover the live rows, min(n_ctx, window)."""
        if n_heads % n_kv_heads or head_dim % 4:
            raise VulkanError(f"attention: n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads} "
                              f"and head_dim {head_dim} a multiple of 4")
        qs = n_heads * head_dim if q_stride is None else q_stride
        os_ = n_heads * head_dim if o_stride is None else o_stride
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        if ring and (not window or T > ring):   # (the session keeps passes within its ring: runtime/kv.py)
            raise VulkanError(f"attention: a ring of {ring} rows needs a window and at most {ring} new rows, "
                              f"not window {window} and {T}")
        plan = self.attention_splits(T, live_rows(n_ctx, window)) if scratch is not None else None
        if (new_kv is not None or rope is not None) and (plan is None or new_kv is None):
            raise VulkanError("attention: new_kv and rope need the split kernel (scratch, attention_splits) "
                              "and rope needs new_kv")
        if plan is not None:
            need = self.attention_scratch_bytes(T, n_heads, head_dim, n_ctx, window)
            if _nbytes(scratch) < need:
                raise VulkanError(f"attention: scratch of {_nbytes(scratch)} B < {need} B")
            self._attention_split(rec, q, k_cache, v_cache, pos, out, T, n_heads, n_kv_heads, head_dim, n_ctx,
                                  f16, scale, qs, os_, t0, scratch, plan, new_kv, rope, window, softcap, ring)
            return
        kern = self._k("attention_f16" if f16 else "attention_f32", 5, 44, (4,),
                       {0: self.attn_wg, 1: head_dim}, reduce=True)
        rec.dispatch(kern, [q, k_cache, v_cache, pos, out], (n_heads, T, 1),
                     struct.pack("<6IfIIfI", T, n_heads, n_kv_heads, n_ctx, qs, os_, scale, t0, window, softcap,
                                 ring))

    def _attention_split(self, rec: Recorder, q: Any, kc: Any, vc: Any, pos: Any, out: Any, T: int, n_heads: int,
                         n_kv: int, hd: int, n_ctx: int, f16: bool, scale: float, qs: int, os_: int, t0: int,
                         scratch: Any, plan: tuple[int, int], new_kv: tuple[Any, Any] | None = None,
                         rope: dict[str, Any] | None = None, window: int = 0, softcap: float = 0.0,
                         ring: int = 0) -> None:
        """attention_split (partials into scratch) + attention_merge. Cost, Llama-3-8B layer (32 heads,
        8 kv heads, head_dim 128), one token, n_ctx 8192: K/V are read once per kv head, 2 * L * 1024 * (2 B
        f16, 4 B f32). Measured on an H200 (both dispatches, barriers included; an empty dispatch + barrier
        is 2.2 us): L = 512 13 us (latency bound); L = 4096 16 us f16 / 22 us f32; L = 8192 23 / 38 us
        (1.5-1.9 TB/s); the one-pass kernel took 87 / 673-993 us at L = 512 / 4096. The merge pass was ~2.5 us
        over the floor; with attn_fused_merge the last workgroup of each group merges instead."""
        rows, ns = plan
        wg, sg = self.attn_split_wg, max(1, self.dev.info.subgroup_size)
        lpr = min(8, sg, wg)
        if wg % lpr or lpr & (lpr - 1):
            raise VulkanError(f"attention: attn_split_wg {wg} must be a multiple of {lpr}")
        rc = min(64, _pow2_at_least(rows))
        g = n_heads // n_kv
        vu = hd // 4
        rg = wg // vu if wg >= vu else 1
        nr = _pow2_at_least(T) if new_kv is not None else 1   # new rows staged (a pipeline per power of 2)

        def smem(gb: int) -> int:  # qs, ps, red, racc, rl, kns of attention_split.comp
            return gb * (hd * 4 + rc * 4 + wg * 4 + rg * 4) + (rg * gb * hd * 4 if rg > 1 else 16) + nr * hd * 4

        gb = min(g, 8)
        while gb > 1 and smem(gb) > self.dev.info.max_shared_memory:
            gb = (gb + 1) // 2
        n, acc_bytes = self._split_partials(T, n_heads, hd, ns)
        merge = 1 if self.attn_fused_merge else 0
        ny = n_kv * -(-g // gb)
        fuse = 1 if new_kv is not None else 0
        # fused: the kernel also writes the caches (bindings 1, 2)
        k1 = self._k("attention_split_f16" if f16 else "attention_split_f32", 8, 84,
                     (1, 2, 4, 5, 6) if fuse else (4, 5, 6),
                     {0: wg, 1: hd, 2: gb, 3: lpr, 4: rc, 5: merge, 6: fuse, 7: nr})
        counters = self._split_counters((t0 + T) * ny)
        act, (q_off, k_off, v_off) = _cover([q, *new_kv] if new_kv is not None else [q, q, q])
        n_rot, flags, base, fscale, ff = 0, 0, 10000.0, 1.0, None
        if rope is not None:
            n_rot, neox, ff, base, fscale = _rope_args(rope, hd, "attention")
            flags = neox | (2 if ff is not None else 0)
        rec.dispatch(k1, [act, kc, vc, pos, _sub(scratch, 0, acc_bytes + n * 8), out, counters,
                          ff if ff is not None else pos], (ns, ny, T),
                     struct.pack("<8If7I2fIfI", T, n_heads, n_kv, n_ctx, qs, t0, rows, ns, scale, os_, q_off, k_off,
                                 v_off, acc_bytes // 8, n_rot, flags, base, fscale, window, softcap, ring),
                     # rows t0.. only: the sequences of a batch run without barriers between them
                     {5: (4 * t0 * os_, 4 * (t0 + T) * os_), 6: (4 * t0 * ny, 4 * (t0 + T) * ny)})
        if merge:
            return
        pacc, pml = _sub(scratch, 0, n * hd * 4), _sub(scratch, acc_bytes, n * 8)
        k2 = self._k("attention_merge", 4, 32, (3,), {0: self.attn_merge_wg, 1: hd})
        rec.dispatch(k2, [pacc, pml, pos, out], (n_heads, T, 1),
                     struct.pack("<8I", T, n_heads, n_ctx, os_, t0, rows, ns, window))


def _moe_tile(dtype: str) -> tuple[int, int, int]:
    """moe_matmul.comp's tile for `dtype`: (weight rows, slots, K step)."""
    return 64, MOE_GROUP_SLOTS, max(32, WEIGHT_FORMATS[dtype][3])


def _tier_binds(kernel: str, blocks: list[Any]) -> list[Any]:
    """Binding 0's array of the moe kernels: the tier's blocks, the unused slots binding the first."""
    if len(blocks) > MOE_MAX_BLOCKS:
        raise VulkanError(f"{kernel}: {len(blocks)} tier blocks > {MOE_MAX_BLOCKS}")
    return [*blocks, *[blocks[0]] * (MOE_MAX_BLOCKS - len(blocks))]
