"""runtime.cpu.dequant against gguf-py's numpy dequantize, bit for bit.

gguf-py is an independent implementation (itself checked against ggml's C), so every test
compares float32 bit patterns, not values: NaN payloads, -0.0 and subnormals must match too
(tolerance: none; every type, IQ4_NL and IQ4_XS included, does the same IEEE ops as gguf-py).
Shapes are awkward on purpose: 1, 3, 7 and 33 rows (never a multiple of 8) of 1, 2, 5, 11 and many blocks.
"""

from __future__ import annotations

import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants
from vkpack.pack_format.constants import DTYPES, tensor_bytes
from vkpack.runtime.cpu import dequant as dq
from vkpack.runtime.cpu.dequant import SUPPORTED, dequantize

FLOATS = ["F32", "F16", "BF16"]
QUANTS = sorted(SUPPORTED - set(FLOATS))
QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]        # gguf-py can quantize these
# Byte offsets of the f16 fields (d, dmin/m) inside one block of each type.
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
              "IQ4_NL": [0], "IQ4_XS": [0]}
ROWS = [1, 3, 7, 33]


def _reference(dtype: str, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's answer for `raw` (uint8) holding a tensor of `shape` (numpy order)."""
    rows = raw.reshape(int(np.prod(shape[:-1])) if len(shape) > 1 else 1, -1)
    return np.asarray(quants.dequantize(rows, Q[dtype]), dtype=np.float32).reshape(shape)


def _assert_bits(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.dtype == np.float32 and ours.flags.c_contiguous, what
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    a, b = ours.reshape(-1).view(np.uint32), np.ascontiguousarray(ref).reshape(-1).view(np.uint32)
    bad = np.flatnonzero(a != b)
    if bad.size:
        i = int(bad[0])
        pytest.fail(f"{what}: {bad.size} of {a.size} elements differ; first at flat index {i}: "
                    f"ours {ours.reshape(-1)[i]!r} ({a[i]:#010x}) vs gguf {ref.reshape(-1)[i]!r} ({b[i]:#010x})")


def _random_blocks(dtype: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes as (n_blocks, type_size) uint8, with every f16 scale field finite.

    Real files may hold any bits in the quants, so everything but the scales is left random;
    a scale with the inf/NaN exponent gets its lowest exponent bit cleared (so large, small,
    subnormal, zero and negative scales all still occur).
    """
    raw = rng.integers(0, 256, (n_blocks, DTYPES[dtype][1]), dtype=np.uint8)
    for off in F16_FIELDS[dtype]:
        h = raw[:, off:off + 2].view(np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= np.uint16(0xFBFF)
    return raw


def _cols(dtype: str) -> list[int]:
    block = DTYPES[dtype][0]
    return [block, 2 * block, 5 * block, 11 * block, 4096]


# ---- quantized types ----
@pytest.mark.parametrize("dtype", QUANTS)
def test_random_blocks_match_gguf(dtype):
    rng = np.random.default_rng(sum(map(ord, dtype)))
    for rows in ROWS:
        for cols in _cols(dtype):
            raw = _random_blocks(dtype, rows * cols // DTYPES[dtype][0], rng).reshape(-1)
            ours = dequantize(dtype, raw.tobytes(), (rows, cols))
            _assert_bits(ours, _reference(dtype, raw, (rows, cols)), f"{dtype} random ({rows}, {cols})")


def test_iq4_blocks_built_by_hand():
    """The IQ4 layouts from ggml's spec, independently of gguf-py: a nibble indexes kvalues_iq4nl; IQ4_XS
    sub-block s has the 6-bit scale (low nibble of scales_l[s/2] >> 4(s%2)) | (bits 2s.. of scales_h) << 4."""
    kv = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
    qs = np.arange(16, dtype=np.uint8) | (np.arange(15, -1, -1, dtype=np.uint8) << 4)   # low 0..15, high 15..0
    nl = np.concatenate([np.frombuffer(np.float16(0.5).tobytes(), np.uint8), qs])
    _assert_bits(dequantize("IQ4_NL", nl, (1, 32)), (np.concatenate([kv, kv[::-1]]) * np.float32(0.5))[None],
                 "IQ4_NL by hand")
    ls = np.array([0, 1, 31, 32, 33, 47, 62, 63])                     # scale - 32: -32 .. 31
    scales_h = sum(int(v >> 4) << (2 * s) for s, v in enumerate(ls))
    scales_l = [int(ls[2 * j] & 15) | int(ls[2 * j + 1] & 15) << 4 for j in range(4)]
    xs = np.concatenate([np.frombuffer(np.float16(0.25).tobytes(), np.uint8),
                         np.frombuffer(np.uint16(scales_h).tobytes(), np.uint8), np.uint8(scales_l), np.tile(qs, 8)])
    want = np.concatenate([np.float32(0.25) * np.float32(v - 32) * np.concatenate([kv, kv[::-1]]) for v in ls])
    _assert_bits(dequantize("IQ4_XS", xs, (1, 256)), want[None], "IQ4_XS by hand")


@pytest.mark.parametrize("dtype", QUANTIZABLE)
def test_quantized_floats_match_gguf(dtype):
    rng = np.random.default_rng(7)
    for rows in ROWS:
        for cols in _cols(dtype):
            x = rng.standard_normal((rows, cols)).astype(np.float32)
            x *= np.float32(10.0) ** rng.uniform(-6, 3, (rows, 1)).astype(np.float32)
            x[:, :DTYPES[dtype][0]] = 0                       # an all-zero block: d = 0
            raw = np.ascontiguousarray(quants.quantize(x, Q[dtype])).reshape(-1)
            ours = dequantize(dtype, raw, (rows, cols))
            _assert_bits(ours, _reference(dtype, raw, (rows, cols)), f"{dtype} quantized ({rows}, {cols})")


@pytest.mark.parametrize("dtype", QUANTS + FLOATS)
def test_many_chunks_and_threads(dtype, monkeypatch):
    """Small chunks force a ragged last chunk and real work for every thread."""
    monkeypatch.setattr(dq, "_CHUNK", 3 * 256)
    rng = np.random.default_rng(3)
    shape = (33, 4 * 256)
    if dtype in FLOATS:
        raw = rng.integers(0, 256, tensor_bytes(dtype, shape), dtype=np.uint8)
    else:
        raw = _random_blocks(dtype, tensor_bytes(dtype, shape) // DTYPES[dtype][1], rng).reshape(-1)
    ref = _reference(dtype, raw, shape)
    for threads in (1, 2, 3):
        _assert_bits(dequantize(dtype, raw, shape, threads=threads), ref, f"{dtype} threads={threads}")


def test_infinite_and_nan_scales_propagate_like_gguf():
    """Real files can hold any bits: inf/NaN scales must give gguf's inf/NaN, without warnings."""
    rng = np.random.default_rng(11)
    for dtype in QUANTS:
        raw = rng.integers(0, 256, tensor_bytes(dtype, (4, 1024)), dtype=np.uint8)
        with np.errstate(all="ignore"):
            ref = _reference(dtype, raw, (4, 1024))
        with np.errstate(all="raise"):
            ours = dequantize(dtype, raw, (4, 1024))
        _assert_bits(ours, ref, f"{dtype} unmasked")


# ---- float types ----
def test_f16_every_bit_pattern(monkeypatch):
    h = np.random.default_rng(0).permutation(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16))
    _assert_bits(dequantize("F16", h, (16, 4096)), h.view(np.float16).astype(np.float32).reshape(16, 4096),
                 "F16 all patterns")
    # Small chunks: some hold no inf/NaN (fast path), some do (fix-up path).
    monkeypatch.setattr(dq, "_CHUNK", 1024)
    finite = np.sort(h)                                 # specials sorted to the ends
    _assert_bits(dequantize("F16", finite, (64, 1024)), _reference("F16", finite.view(np.uint8), (64, 1024)),
                 "F16 sorted patterns")


def test_bf16_every_bit_pattern():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    _assert_bits(dequantize("BF16", h, (256, 256)), _reference("BF16", h.view(np.uint8), (256, 256)),
                 "BF16 all patterns")


def test_f32_copies_bits():
    w = np.random.default_rng(5).integers(0, 1 << 32, (7, 96), dtype=np.uint32)
    w[0, :4] = [0x7F800001, 0xFFC00000, 0x80000000, 0x00000001]   # sNaN, -qNaN, -0, subnormal
    _assert_bits(dequantize("F32", w.tobytes(), (7, 96)), w.view(np.float32), "F32")


def test_exact_without_fast_half_path(monkeypatch):
    """If denormals-are-zero were on, the fallback (numpy's own cast) must give the same bits."""
    assert dq._subnormals_exact()
    monkeypatch.setattr(dq, "_subnormals_exact", lambda: False)
    rng = np.random.default_rng(9)
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    _assert_bits(dequantize("F16", h, (64, 1024)), _reference("F16", h.view(np.uint8), (64, 1024)), "F16 slow")
    raw = _random_blocks("Q4_K", 40, rng).reshape(-1)
    _assert_bits(dequantize("Q4_K", raw, (5, 2048)), _reference("Q4_K", raw, (5, 2048)), "Q4_K slow")


# ---- API ----
def test_input_kinds_shapes_and_out():
    rng = np.random.default_rng(2)
    raw = _random_blocks("Q8_0", 2 * 3 * 4, rng).reshape(-1)
    ref = _reference("Q8_0", raw, (2, 3, 128))
    for data in (raw.tobytes(), bytearray(raw.tobytes()), memoryview(raw.tobytes()), raw, raw.view(np.uint16)):
        _assert_bits(dequantize("Q8_0", data, (2, 3, 128)), ref, f"input {type(data).__name__}")
    out = np.full((2, 3, 128), np.nan, np.float32)
    assert dequantize("Q8_0", raw, (2, 3, 128), out=out) is out
    _assert_bits(out, ref, "out=")
    one_d = dequantize("Q8_0", raw, (768,))
    _assert_bits(one_d, ref.reshape(768), "1-d")
    assert dequantize("Q4_K", b"", (0, 256)).shape == (0, 256)
    assert SUPPORTED >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                         "Q6_K", "IQ4_NL", "IQ4_XS"}


def test_errors_name_the_problem():
    ok = bytes(tensor_bytes("Q4_0", (2, 64)))
    with pytest.raises(ValueError, match=r"Q4_0 tensor of shape \(2, 64\) needs 72 bytes, got 71"):
        dequantize("Q4_0", ok[:-1], (2, 64))
    with pytest.raises(ValueError, match="needs 72 bytes, got 73"):
        dequantize("Q4_0", ok + b"\0", (2, 64))
    for bad in ("Q8_K", "Q8_1", "I32", "iq4_nl", "nope"):
        with pytest.raises(ValueError, match=f"dtype '{bad}' is not supported; supported: BF16, F16"):
            dequantize(bad, ok, (2, 64))
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        dequantize("Q4_0", ok, (4, 36))
    with pytest.raises(ValueError, match="negative"):
        dequantize("F32", b"", (-1, 0))
    for out in (np.empty((2, 64), np.float64), np.empty((64, 2), np.float32), np.empty((2, 128), np.float32)[:, ::2]):
        with pytest.raises(ValueError, match=r"out must be a writeable C-contiguous float32 array of shape \(2, 64\)"):
            dequantize("Q4_0", ok, (2, 64), out=out)


# ---- the real model ----
def test_smollm2_every_tensor_matches_gguf():
    try:
        import smollm2
        path = smollm2.smollm2_gguf()
    except Exception as e:  # any failure to obtain the model means "skip", with the reason
        pytest.skip(f"SmolLM2-135M GGUF unavailable: {type(e).__name__}: {e}")
    reader = gguf.GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        name = t.tensor_type.name
        shape = tuple(int(d) for d in reversed(t.shape))   # GGML lists ne0 (contiguous) first
        ours = dequantize(name, t.data, shape)
        _assert_bits(ours, np.asarray(quants.dequantize(t.data, t.tensor_type)).reshape(shape), f"{t.name} ({name})")
        seen.add(name)
    assert {"Q4_1", "Q8_0", "F32"} <= seen


# ---- throughput (run with -m slow) ----
@pytest.mark.slow
def test_throughput_report():
    """Print stored MB/s and elements/s per dtype on a 4096x4096 tensor (the module docstring's table),
    and check what the table is for: the timed conversions are exact, and each is quicker than
    gguf-py's dequantize on the same bytes (for F32, where both only copy, no slower than
    np.copyto). Timings are relative so that a slower or busier machine does not fail it.

    1 thread: min CPU time of this thread (steady on a shared machine); 2 threads: min wall time.
    """
    rng = np.random.default_rng(0)
    out = np.empty((4096, 4096), np.float32)
    weights = (rng.standard_normal(out.shape, dtype=np.float32) * 0.02).reshape(-1)   # as in real models
    slower = []
    for dtype in FLOATS + QUANTS:
        n = tensor_bytes(dtype, out.shape)
        if dtype in FLOATS:
            raw = {"F32": weights, "F16": weights.astype(np.float16),
                   "BF16": (weights.view(np.uint32) >> 16).astype(np.uint16)}[dtype].view(np.uint8)
        else:
            raw = _random_blocks(dtype, n // DTYPES[dtype][1], rng).reshape(-1)
        ref = _reference(dtype, raw, out.shape)
        line = []
        for threads, clock in ((1, time.thread_time), (2, time.perf_counter)):
            best = min(_timed(dtype, raw, out, threads, clock) for _ in range(9))
            _assert_bits(out, ref, f"{dtype} timed, {threads} thread(s)")
            line.append(f"{best * 1e3:5.1f} ms {n / best / 1e6:5.0f} MB/s {out.size / best / 1e9:4.2f} G/s")
            if threads == 1:
                ours = best
        if dtype == "F32":
            theirs = min(_clocked(lambda o=out, r=raw: np.copyto(o.reshape(-1), r.view(np.float32))) for _ in range(9))
        else:
            rows = raw.reshape(out.shape[0], -1)
            theirs = min(_clocked(lambda r=rows, q=Q[dtype]: quants.dequantize(r, q)) for _ in range(3))
        line.append(f"{theirs / ours:4.1f}x {'np.copyto' if dtype == 'F32' else 'gguf-py'}")
        print(f"    {dtype:6s}  " + "  |  ".join(line))
        if ours > (1.5 if dtype == "F32" else 1.0) * theirs:
            slower.append(f"{dtype}: {ours * 1e3:.1f} ms vs {theirs * 1e3:.1f} ms")
    assert not slower, f"slower than the reference: {slower}"


def _clocked(fn) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def _timed(dtype, raw, out, threads, clock) -> float:
    t = clock()
    dequantize(dtype, raw, out.shape, out=out, threads=threads)
    return clock() - t
