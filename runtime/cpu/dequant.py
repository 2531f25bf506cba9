"""Weights as stored (F32/F16/BF16 and GGML blocks) -> float32, vectorized numpy.

Why: the numpy backend converts each tensor once when its pack enters the tier (numpy is fast
only on f32, docs/VULKAN.md §13), so this is on the load path and must be exact and quick.
Results are bit-equal to gguf-py's `gguf.quants.dequantize`: every float op is the same IEEE op
on the same operands in the same order (tests/test_dequant.py checks bits).

Why it looks the way it does: a numpy ufunc costs ~5-10 ns per inner-loop call, which dwarfs the
work on a 16- or 32-byte run, while a strided np.copyto (also a cast) costs ~1 ns per run. So bit
fiddling runs on flat arrays covering whole blocks (sub-block-major, 8 lanes per uint64 op), and
the reorder into element order happens inside the int->float cast straight into `out`; then the
scales are applied in place. Python loops only over chunks of ~512K elements and over bit planes,
never over blocks or rows. Chunks may run on threads (numpy drops the GIL in ufuncs and casts).
Little-endian hosts only (the block fields are read through native integer views).

Throughput, one 4096x4096 tensor into a preallocated `out`, 1 thread (min thread CPU time: the
2-core AMD EPYC VM was shared), numpy 2.4; MB/s counts stored bytes. gguf-py: 0.09-0.33 G el/s.
    F32   3.3 ms  20500 MB/s  5.1 G el/s      Q4_0   8.2 ms  1150 MB/s  2.0 G el/s
    F16   6.3 ms   5300 MB/s  2.7 G el/s      Q4_1  11.1 ms   950 MB/s  1.5 G el/s
    BF16  3.6 ms   9300 MB/s  4.7 G el/s      Q5_0  13.3 ms   870 MB/s  1.3 G el/s
    Q8_0  6.2 ms   2900 MB/s  2.7 G el/s      Q5_1  15.9 ms   790 MB/s  1.1 G el/s
    Q2_K 13.8 ms    400 MB/s  1.2 G el/s      Q4_K  12.5 ms   760 MB/s  1.3 G el/s
    Q3_K 15.5 ms    470 MB/s  1.1 G el/s      Q5_K  14.6 ms   790 MB/s  1.2 G el/s
    Q6_K 11.0 ms   1250 MB/s  1.5 G el/s
IQ4_NL and IQ4_XS came later and were timed on a busy moment of the same VM, against Q4_0 in the same
run: 1.6x and 1.75x Q4_0's time (a table lookup per byte, `_iq4_values`).
Two threads (min wall time in a quieter moment): Q8_0 3.8 ms, F16 3.8 ms, Q4_1 7.1 ms, Q6_K 6.3 ms,
i.e. 1.6-1.8x; on a busy VM they gain nothing. A fresh `out` adds first-touch page faults
(2-30 ms per 64 MiB here).
Re-measure: `pytest tests/test_dequant.py -m slow -s`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...pack_format.constants import DTYPES, tensor_bytes

_CHUNK = 1 << 19          # elements per chunk: measured best here (fewer numpy calls vs. cache-sized scratch)
_MIN_PARALLEL = 1 << 20   # below this many elements threads cost more than they save
_MAX_THREADS = 32
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()

# ---- f16 -> f32 ----
# numpy's astype(float32) on halves runs ~0.6 G values/s here; this integer/float trick is ~4x
# faster and bit-identical (subnormals, infinities and NaN payloads included).
_TWO112 = np.float32(2.0 ** 112)
_KEEP = np.int32(-0x70000001)          # 0x8FFFFFFF: the sign bit and the 28 low bits
_TINY = np.array([1 << 13], np.uint32).view(np.float32)   # 2**-136, a subnormal float32


def _subnormals_exact() -> bool:
    """False if denormals-are-zero is on in this thread (the fast f16 path needs real subnormals)."""
    return bool(np.multiply(_TINY, _TWO112)[0] == np.float32(2.0 ** -24))


def _half_into(h: np.ndarray, out: np.ndarray) -> None:
    """h: uint16 half bits (any strides); out: float32 of the same shape, written in place."""
    w = out.view(np.int32)
    np.copyto(w, h.view(np.int16))            # sign-extended: bits 15..31 hold the sign
    np.left_shift(w, 13, out=w)               # exponent+mantissa at bits 13..27 (f32 layout, bias 15)
    np.bitwise_and(w, _KEEP, out=w)           # clear the sign copies at bits 28..30
    np.multiply(out, _TWO112, out=out)        # rebias 15 -> 127; exact, subnormal halves become normal
    if out.size and (out.max() >= 65536.0 or out.min() <= -65536.0):
        np.bitwise_or(w, 0x7F800000, out=w, where=np.abs(out) >= 65536.0)  # inf/NaN landed at 2**16


def _half_slow(h: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, h.view(np.float16))


def _half_at(b: np.ndarray, off: int, half: Callable) -> np.ndarray:
    """The f16 field at byte `off` of each block, as float32 (c,)."""
    out = np.empty(len(b), np.float32)
    half(b[:, off:off + 2].view(np.uint16)[:, 0], out)
    return out


# ---- shared bit fiddling (all on flat arrays) ----
def _nibbles(b: np.ndarray) -> np.ndarray:
    """(c, S) bytes -> (2, c, S) uint8: [low nibbles, high nibbles] of every byte."""
    q = np.empty((2,) + b.shape, np.uint8)
    np.bitwise_and(b, 0x0F, out=q[0])
    np.right_shift(b, 4, out=q[1])
    return q


def _u64(x: np.ndarray) -> np.ndarray:
    """A contiguous copy of (c, 8k) bytes, viewed as (c, k) uint64 (SWAR lanes: 8 bytes per op)."""
    return np.ascontiguousarray(x).view(np.uint64)


_L01 = np.uint64(0x0101010101010101)


def _spread_bits(x: np.ndarray) -> np.ndarray:
    """(c, n) bytes -> (c, 8n) bytes: bit k of byte j -> byte 8j+k, as 0 or 0x10."""
    v = x.astype(np.uint64)
    v *= _L01                                  # the byte in all 8 lanes
    v &= np.uint64(0x8040201008040201)         # lane k keeps bit k
    v += np.uint64(0x7F7F7F7F7F7F7F7F)         # a set bit carries into the lane's bit 7
    v &= np.uint64(0x8080808080808080)
    v >>= np.uint64(3)
    return v.view(np.uint8).reshape(len(x), -1)


def _bit_planes(x: np.ndarray, shifts: list[int], mask: int, axis: int = 0) -> np.ndarray:
    """x uint64 -> planes `(x << s) & mask` (s < 0: right shift), stacked on a new axis 0 or 1."""
    m = np.uint64(mask)
    out = np.empty(x.shape[:axis] + (len(shifts),) + x.shape[axis:], np.uint64)
    for i, s in enumerate(shifts):
        plane = out[i] if axis == 0 else out[:, i]
        if s >= 0:
            np.left_shift(x, np.uint64(s), out=plane)
        else:
            np.right_shift(x, np.uint64(-s), out=plane)
        np.bitwise_and(plane, m, out=plane)
    return out


def _k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (c, 8) uint8.

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3, 8-11 the low nibbles of scales 4-7
    and mins 4-7; the top 2 bits of bytes 0-7 are the high bits of scales/mins 4-7.
    Done 4 bytes at a time in uint32 lanes, so every op runs over all blocks in one loop.
    """
    w = np.ascontiguousarray(sc).view(np.uint32)          # (c, 3): [a, m, hi]
    a, m, hi = w[:, 0], w[:, 1], w[:, 2]
    out = np.empty((len(sc), 4), np.uint32)              # [scales 0-3, scales 4-7, mins 0-3, mins 4-7]
    np.bitwise_and(a, 0x3F3F3F3F, out=out[:, 0])
    np.bitwise_and(m, 0x3F3F3F3F, out=out[:, 2])
    np.bitwise_or(hi & 0x0F0F0F0F, (a >> 2) & 0x30303030, out=out[:, 1])
    np.bitwise_or((hi >> 4) & 0x0F0F0F0F, (m >> 2) & 0x30303030, out=out[:, 3])
    b = out.view(np.uint8)
    return b[:, 0:8], b[:, 8:16]


# ---- block kernels: b (c, type_size) uint8 blocks, o (c, block) float32 out ----
def _q8_0(b, o, half):
    np.copyto(o, b[:, 2:].view(np.int8))
    np.multiply(o, _half_at(b, 0, half)[:, None], out=o)


def _q4_0(b, o, half):
    q = _nibbles(b)
    np.subtract(q, 8, out=q)                   # uint8 wraps: as int8 this is q - 8
    np.copyto(o.reshape(len(b), 2, 16), q[:, :, 2:].view(np.int8).transpose(1, 0, 2))
    np.multiply(o, _half_at(b, 0, half)[:, None], out=o)


def _q4_1(b, o, half):
    q = _nibbles(b)
    np.copyto(o.reshape(len(b), 2, 16), q[:, :, 4:].transpose(1, 0, 2))
    np.multiply(o, _half_at(b, 0, half)[:, None], out=o)
    np.add(o, _half_at(b, 2, half)[:, None], out=o)


def _q5(b, off, sub):
    """Q5_0/Q5_1 quants (c, 32) uint8 in element order, minus `sub` (uint8 wrap)."""
    q = _nibbles(b)
    u = np.empty((len(b), 2, 16), np.uint8)
    np.copyto(u, q[:, :, off + 4:].transpose(1, 0, 2))
    u = u.reshape(len(b), 32)
    np.bitwise_or(u, _spread_bits(b[:, off:off + 4]), out=u)
    if sub:
        np.subtract(u, sub, out=u)
    return u


def _q5_0(b, o, half):
    np.copyto(o, _q5(b, 2, 16).view(np.int8))
    np.multiply(o, _half_at(b, 0, half)[:, None], out=o)


def _q5_1(b, o, half):
    np.copyto(o, _q5(b, 4, 0))
    np.multiply(o, _half_at(b, 0, half)[:, None], out=o)
    np.add(o, _half_at(b, 2, half)[:, None], out=o)


def _k_affine(b, o, half, q):
    """Q4_K/Q5_K tail: q (8, c, 32) quants by sub-block -> o = (d*sc)*q - dmin*m."""
    c = len(b)
    sc, mn = _k_scales(b[:, 4:16])
    d = _half_at(b, 0, half)[:, None] * sc.astype(np.float32)
    dm = _half_at(b, 2, half)[:, None] * mn.astype(np.float32)
    f = o.reshape(c, 8, 32)
    np.copyto(f, q.transpose(1, 0, 2))
    np.multiply(f, d[:, :, None], out=f)
    np.subtract(f, dm[:, :, None], out=f)


def _k_nibbles(qs):
    """(c, 128) bytes -> (8, c, 32) uint8: sub-block 2j is the low nibbles of bytes 32j.., 2j+1 the high."""
    c = len(qs)
    q = np.empty((4, 2, c, 32), np.uint8)
    t = np.empty((4, c, 32), np.uint8)
    np.copyto(t, qs.reshape(c, 4, 32).transpose(1, 0, 2))
    np.bitwise_and(t, 0x0F, out=q[:, 0])
    np.right_shift(t, 4, out=q[:, 1])
    return q.reshape(8, c, 32)


def _q4_k(b, o, half):
    _k_affine(b, o, half, _k_nibbles(b[:, 16:144]))


def _q5_k(b, o, half):
    q = _k_nibbles(b[:, 48:176])
    hb = _bit_planes(_u64(b[:, 16:48]), [4 - k for k in range(8)], 0x1010101010101010)
    np.bitwise_or(q, hb.view(np.uint8).reshape(q.shape), out=q)    # bit k of qh[l] -> bit 4 of sub-block k
    _k_affine(b, o, half, q)


def _q6_k(b, o, half):
    c = len(b)
    t = np.empty((2, c, 2, 32), np.uint8)                   # ql as [which 32, block, half, l]
    np.copyto(t, b[:, 0:128].reshape(c, 2, 2, 32).transpose(2, 0, 1, 3))
    q = np.empty((2, 2, c, 2, 32), np.uint8)                # [nibble, which, block, half, l] = [s, ...]
    np.bitwise_and(t, 0x0F, out=q[0])
    np.right_shift(t, 4, out=q[1])
    q = q.reshape(4, c, 2, 32)
    hb = _bit_planes(_u64(b[:, 128:192]), [4, 2, 0, -2], 0x3030303030303030)   # bits 2s,2s+1 -> 4,5
    np.bitwise_or(q, hb.view(np.uint8).reshape(q.shape), out=q)
    np.subtract(q, 32, out=q)                               # uint8 wraps: as int8 this is q - 32
    np.copyto(o.reshape(c, 2, 4, 32), q.view(np.int8).transpose(1, 2, 0, 3))   # element 128*half + 32*s + l
    d = _half_at(b, 208, half)[:, None] * b[:, 192:208].view(np.int8).astype(np.float32)
    f = o.reshape(c, 16, 16)
    np.multiply(f, d[:, :, None], out=f)


def _q2_k(b, o, half):
    c = len(b)
    q = _bit_planes(_u64(b[:, 16:80]), [0, -2, -4, -6], 0x0303030303030303)   # (4, c, 8): [s, block, half*4+w]
    f = o.reshape(c, 2, 4, 32)
    np.copyto(f, q.view(np.uint8).reshape(4, c, 2, 32).transpose(1, 2, 0, 3))
    sc = b[:, 0:16]
    dl = _half_at(b, 80, half)[:, None] * (sc & 0x0F).astype(np.float32)
    ml = _half_at(b, 82, half)[:, None] * (sc >> 4).astype(np.float32)
    f = f.reshape(c, 16, 16)
    np.multiply(f, dl[:, :, None], out=f)
    np.subtract(f, ml[:, :, None], out=f)


def _q3_k(b, o, half):
    c = len(b)
    qs = np.empty((2, c, 32), np.uint8)                     # [half, block, l]
    np.copyto(qs, b[:, 32:96].reshape(c, 2, 32).transpose(1, 0, 2))
    q = _bit_planes(qs.view(np.uint64), [0, -2, -4, -6], 0x0303030303030303, axis=1)  # [half, s, block, l]
    hm = _bit_planes(_u64(b[:, 0:32]), [2 - k for k in range(8)], 0x0404040404040404)  # [4*half+s, block, l]
    u = q.view(np.uint8).reshape(8, c, 32)
    np.bitwise_or(u, hm.view(np.uint8).reshape(u.shape), out=u)
    np.subtract(u, 4, out=u)                  # q - 4 where the hmask bit is clear, q where it is set
    np.copyto(o.reshape(c, 8, 32), u.view(np.int8).transpose(1, 0, 2))
    s = b[:, 96:108]
    lo = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)                      # (c, 16)
    hi = (s[:, 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)).transpose(0, 2, 1).reshape(c, 16) & 3
    scales = ((lo | (hi << 4)).view(np.int8) - np.int8(32)).astype(np.float32)
    d = _half_at(b, 108, half)[:, None] * scales
    f = o.reshape(c, 16, 16)
    np.multiply(f, d[:, :, None], out=f)


# IQ4_NL/IQ4_XS: a 4-bit index into ggml's non-linear table `kvalues_iq4nl` (int8 values). A byte's two
# values are one uint64 (two floats) of a 256-entry table: one `take` per byte instead of per nibble.
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
_IQ4_PAIRS = np.stack([KVALUES_IQ4NL[np.arange(256) & 15], KVALUES_IQ4NL[np.arange(256) >> 4]], 1).view(np.uint64)[:, 0]


def _iq4_values(qs, o):
    """qs (c, 16k) bytes -> o (c, k, 32) table values: per 16 bytes, their 16 low nibbles, then the 16 high."""
    c = len(qs)
    pairs = _IQ4_PAIRS.take(qs).view(np.float32).reshape(c, -1, 16, 2)      # (c, k, byte, nibble)
    np.copyto(o.reshape(c, -1, 2, 16), pairs.transpose(0, 1, 3, 2))


def _iq4_nl(b, o, half):
    _iq4_values(b[:, 2:18], o)
    np.multiply(o, _half_at(b, 0, half)[:, None], out=o)


def _iq4_xs(b, o, half):
    c = len(b)
    lo = _nibbles(b[:, 4:8]).transpose(1, 2, 0).reshape(c, 8)              # sub-block 2j: low nibble of byte j
    hi = (b[:, 2:4].view(np.uint16) >> np.arange(0, 16, 2, dtype=np.uint16)) & 3   # bits 2s, 2s+1 of scales_h
    ls = (lo | (hi.astype(np.uint8) << 4)).astype(np.float32) - np.float32(32)
    dl = _half_at(b, 0, half)[:, None] * ls                                 # (c, 8): d * (ls - 32)
    f = o.reshape(c, 8, 32)
    _iq4_values(b[:, 8:136], f)
    np.multiply(f, dl[:, :, None], out=f)


_KERNELS: dict[str, Callable] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}


# ---- float types: flat kernels over (n,) raw bytes -> (n,) f32 ----
def _f32(raw, o, half):
    np.copyto(o, raw.view("<f4"))


def _f16(raw, o, half):
    half(raw.view("<u2"), o)


def _bf16(raw, o, half):
    w = o.view(np.uint32)
    np.copyto(w, raw.view("<u2"))
    np.left_shift(w, 16, out=w)


_FLOATS: dict[str, Callable] = {"F32": _f32, "F16": _f16, "BF16": _bf16}

SUPPORTED: frozenset[str] = frozenset(_KERNELS) | frozenset(_FLOATS)


# ---- driver ----
def _as_bytes(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as e:
        raise ValueError(f"data must be a contiguous bytes-like object or ndarray: {e}") from e


def _out_array(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}, "
                         f"got {out.dtype} {out.shape} (contiguous={out.flags.c_contiguous})")
    return out


def _run_group(kernel: Callable, tasks: list[tuple[np.ndarray, np.ndarray]]) -> None:
    half = _half_into if _subnormals_exact() else _half_slow   # checked per thread: MXCSR is per thread
    with np.errstate(all="ignore"):            # inf/NaN in stored scales propagate, as in gguf-py
        for b, o in tasks:
            kernel(b, o, half)


def _get_pool() -> ThreadPoolExecutor:
    """One shared pool; each call uses at most its `threads` workers (it submits that many groups)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_MAX_THREADS, thread_name_prefix="vkpack-dequant")
        return _pool


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                                  # not on Linux
        return os.cpu_count() or 1


def dequantize(dtype: str, data: bytes | memoryview | np.ndarray, shape: tuple[int, ...],
               out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """Convert one stored tensor to float32, bit-equal to gguf-py's dequantize.

    Args:
        dtype: a name from `pack_format.constants.DTYPES` that is in `SUPPORTED`.
        data: exactly `tensor_bytes(dtype, shape)` little-endian bytes, as stored.
        shape: numpy order (rows first); the last dim is a whole number of blocks.
        out: optional preallocated C-contiguous float32 array of `shape` to write into.
        threads: worker threads; default: all cores (up to 8) for tensors of 1M+ elements, else 1.
            Pass 1 when another thread needs the cores (e.g. loading while the model runs).
    Returns:
        `out` (or a new array): float32, C-contiguous, `shape`.
    Example:
        >>> dequantize("BF16", b"\\x80\\x3f", (1,))
        array([1.], dtype=float32)
    """
    if dtype not in SUPPORTED:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    expected = tensor_bytes(dtype, shape)                  # ValueError if a row is not whole blocks
    raw = _as_bytes(data)
    if raw.size != expected:
        raise ValueError(f"{dtype} tensor of shape {shape} needs {expected} bytes, got {raw.size}")
    res = _out_array(out, shape)
    n = res.size
    if n == 0:
        return res
    flat = res.reshape(-1)
    block, size = DTYPES[dtype]
    if dtype in _FLOATS:
        kernel = _FLOATS[dtype]
        tasks = [(raw[s * size:(s + _CHUNK) * size], flat[s:s + _CHUNK]) for s in range(0, n, _CHUNK)]
    else:
        kernel = _KERNELS[dtype]
        blocks, o = raw.reshape(-1, size), flat.reshape(-1, block)
        step = max(1, _CHUNK // block)
        tasks = [(blocks[s:s + step], o[s:s + step]) for s in range(0, len(blocks), step)]
    if threads is None:
        threads = min(_cores(), 8) if n >= _MIN_PARALLEL else 1
    threads = max(1, min(threads, len(tasks), _MAX_THREADS))
    k = -(-len(tasks) // threads)                           # contiguous groups, one per thread
    groups = [tasks[i:i + k] for i in range(0, len(tasks), k)]
    futures = [_get_pool().submit(_run_group, kernel, g) for g in groups[1:]]
    _run_group(kernel, groups[0])                           # the caller works too
    for f in futures:
        f.result()
    return res
