"""Native CPU kernels (runtime/native) against the numpy reference (runtime/cpu/dequant, itself bit-equal
to gguf-py): dequantize bit-exact, matmul within TOL of a float64 product, for every type, in each
compiled variant (this host's SIMD, AVX2, portable C). Skipped only when there is no C compiler."""

from __future__ import annotations

import logging
import os
import platform
import shlex
import shutil
import stat
import threading

import numpy as np
import pytest

from vkpack.pack_format.constants import DTYPES, GGML_TYPE_IDS
from vkpack.runtime import native
from vkpack.runtime.cpu.dequant import SUPPORTED, dequantize as ref_dequantize
from vkpack.runtime.native import loader

# |y - y_f64| <= TOL * sum_c |x[t,c] * W[r,c]|: f32 accumulation of <= 1280 products in 8-16 lanes
# (the worst case seen here is ~1e-7; n * 2**-24 bounds it at 7.6e-5 for 1280 terms, never approached).
TOL = 1e-5

# f16 fields per block that must be sane halves (random bytes elsewhere): byte offsets.
HALF_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
               "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}
FLOATS = ("F32", "F16", "BF16")


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {w}" in flags for w in ("avx2", "fma", "f16c"))


# The builds under test: this host's (-march=native), AVX2 on an x86 that has it, portable C (on x86
# also for the baseline ISA, so its no-FMA paths compile and run).
VARIANTS = {"native": ()}
if _is_x86() and _has_avx2():
    VARIANTS["avx2"] = ("-march=haswell",)
VARIANTS["portable"] = ("-DVKP_PORTABLE", "-march=x86-64") if _is_x86() else ("-DVKP_PORTABLE",)


def _compiler_missing() -> bool:
    cc = shlex.split(os.environ.get("CC") or "cc")
    return not cc or shutil.which(cc[0]) is None


@pytest.fixture(scope="module", params=list(VARIANTS))
def kern(request) -> native.Kernels:
    if _compiler_missing():
        pytest.skip("no C compiler ($CC or cc) on PATH: the native kernels cannot be built")
    return native.Kernels(native.build(VARIANTS[request.param]))


def random_rows(dtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Stored bytes (uint8, rows * row_bytes) of a real-looking tensor: normal floats, or random blocks
    whose f16 scales are small finite halves."""
    if dtype == "F32":
        return rng.standard_normal((rows, cols), np.float32).view(np.uint8).reshape(-1)
    if dtype == "F16":
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8).reshape(-1)
    if dtype == "BF16":
        f = rng.standard_normal((rows, cols), np.float32).view(np.uint32) >> 16
        return f.astype(np.uint16).view(np.uint8).reshape(-1)
    block, size = DTYPES[dtype]
    b = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in HALF_FIELDS[dtype]:
        b[:, off:off + 2] = (rng.standard_normal(len(b)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b.reshape(-1)


def shapes(dtype: str) -> list[tuple[int, int]]:
    """(rows, cols): rows around the 4-row tile and thread splits; one block, several, many."""
    block = DTYPES[dtype][0]
    cols = {1: [1, 7, 32, 33, 300], 32: [32, 96, 256, 768], 256: [256, 512, 1280]}[block]
    return [(r, c) for r in (1, 3, 17, 255) for c in cols if r * c <= 255 * 768]


def test_types_are_the_shared_ids():
    """The kernels cover exactly types the reference decodes, addressed by GGML's ids."""
    assert set(native.TYPES) <= SUPPORTED
    assert {t: GGML_TYPE_IDS[t] for t in native.TYPES} == {
        "F32": 0, "F16": 1, "BF16": 30, "Q8_0": 8, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7,
        "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23}


# ---- numerics ----
@pytest.mark.parametrize("dtype", native.TYPES)
def test_dequantize_bit_exact(kern, dtype):
    rng = np.random.default_rng(GGML_TYPE_IDS[dtype])
    for rows, cols in shapes(dtype):
        w = random_rows(dtype, rows, cols, rng)
        want = ref_dequantize(dtype, w, (rows, cols))
        for threads in (1, 2):
            got = np.full((rows, cols), np.nan, np.float32)
            kern.dequantize(dtype, w, rows, cols, got, threads)
            bad = got.view(np.uint32) != want.view(np.uint32)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                block = DTYPES[dtype][0]
                c0 = c // block * block
                pytest.fail(f"{dtype} {rows}x{cols} threads={threads}: {bad.sum()} elements differ; first at "
                            f"row {r} col {c}, its block: got {got[r, c0:c0 + block]}, want {want[r, c0:c0 + block]}")


@pytest.mark.parametrize("dtype", native.TYPES)
def test_matmul_matches_float64(kern, dtype):
    """Every shape x n_tok x threads; x a column slice (ldx > cols); out a column slice of a wider array."""
    rng = np.random.default_rng(100 + GGML_TYPE_IDS[dtype])
    for rows, cols in shapes(dtype):
        w = random_rows(dtype, rows, cols, rng)
        w64 = ref_dequantize(dtype, w, (rows, cols)).astype(np.float64)
        for n_tok in (1, 2, 5, 9, 33):
            xs = rng.standard_normal((n_tok, cols + 5), np.float32)
            x = xs[:, 3:3 + cols]                                     # row stride cols + 5
            want = x.astype(np.float64) @ w64.T
            bound = np.abs(x.astype(np.float64)) @ np.abs(w64).T
            for threads in (1, 2, 3):
                wide = np.full((n_tok, rows + 7), 7.0, np.float32)
                kern.matmul(dtype, w, rows, cols, x, wide[:, 2:2 + rows], threads)
                got = wide[:, 2:2 + rows]
                err = np.abs(got - want) - TOL * bound
                where = f"{dtype} {rows}x{cols} n_tok={n_tok} threads={threads}"
                assert (wide[:, :2] == 7).all() and (wide[:, 2 + rows:] == 7).all(), f"{where}: wrote outside out"
                if not (err <= 0).all():
                    t, r = np.unravel_index(np.argmax(err), err.shape)
                    pytest.fail(f"{where}: y[{t},{r}] = {got[t, r]}, float64 {want[t, r]}, "
                                f"allowed {TOL * bound[t, r]:.3g}")


def _check_product(kern, dtype, w, rows, cols, x, threads, where):
    """kern.matmul(w, x) within TOL of the float64 product, written only inside out (a column slice)."""
    w64 = ref_dequantize(dtype, w, (rows, cols)).astype(np.float64)
    wide = np.full((x.shape[0], rows + 3), 7.0, np.float32)
    kern.matmul(dtype, w, rows, cols, x, wide[:, 1:1 + rows], threads)
    y = wide[:, 1:1 + rows]
    assert (wide[:, 0] == 7).all() and (wide[:, 1 + rows:] == 7).all(), f"{where}: wrote outside out"
    err = np.abs(y - x.astype(np.float64) @ w64.T) - TOL * (np.abs(x.astype(np.float64)) @ np.abs(w64).T)
    if not (err <= 0).all():
        t, r = np.unravel_index(np.argmax(err), err.shape)
        pytest.fail(f"{where}: y[{t},{r}] off by {err[t, r]:.3g} more than allowed")


@pytest.mark.parametrize("dtype", ["F16", "Q4_0", "Q4_K", "Q6_K"])
def test_matmul_many_tokens(kern, dtype):
    """More tokens than one tile of x (1 MiB / (4 * cols) tokens), rows not a multiple of the row tile;
    gemm.h: several column blocks (cols > KC_MAX), several row blocks (rows > MC), 5 token vectors."""
    rng = np.random.default_rng(7)
    for rows, cols, n_tok in [(6, 4096, 70), (197, 1536, 70)]:
        w = random_rows(dtype, rows, cols, rng)
        x = rng.standard_normal((n_tok, cols), np.float32)
        for threads in (1, 2):
            _check_product(kern, dtype, w, rows, cols, x, threads, f"{dtype} {rows}x{cols} n_tok={n_tok} t={threads}")


@pytest.mark.parametrize("dtype", native.TYPES)
def test_matmul_every_token_count(kern, dtype):
    """n_tok 1..40 for every type: each side of the fast512.h passes (4 tokens) and of the switch to
    gemm.h (8-16 tokens, per type), x a column slice; 13 rows: tails of every row tile."""
    rng = np.random.default_rng(300 + GGML_TYPE_IDS[dtype])
    rows, cols = 13, {1: 96, 32: 544, 256: 512}[DTYPES[dtype][0]]
    w = random_rows(dtype, rows, cols, rng)
    xs = rng.standard_normal((40, cols + 3), np.float32)
    for n_tok in range(1, 41):
        _check_product(kern, dtype, w, rows, cols, xs[:n_tok, 1:1 + cols], 1 + n_tok % 2, f"{dtype} n_tok={n_tok}")


# ops.h against runtime/cpu/ops: f32 in another summation order, exp within 2 ulp of numpy's.
OPS_TOL = 2e-6


@pytest.mark.parametrize("n_tok, pos0, heads, kv_heads, head_dim", [
    (16, 0, 4, 2, 16), (37, 11, 6, 3, 32), (130, 0, 8, 2, 64), (17, 100, 4, 4, 128), (33, 3, 4, 1, 80),
    (1, 40, 2, 1, 64), (70, 0, 2, 2, 48)])
def test_attention_matches_numpy(kern, n_tok, pos0, heads, kv_heads, head_dim):
    """Causal GQA: query blocks of 16 and their tails, a cached prefix (pos0), head_dim not a multiple of 64,
    caches wider and longer than needed, out a column slice; AVX-512 builds only (others say no)."""
    from vkpack.runtime.cpu import ops
    rng = np.random.default_rng(n_tok * 1000 + pos0)
    q = rng.standard_normal((n_tok, heads * head_dim), np.float32)
    kc = rng.standard_normal((pos0 + n_tok + 9, kv_heads * head_dim + 8), np.float32) * 2
    vc = rng.standard_normal((pos0 + n_tok + 9, kv_heads * head_dim + 8), np.float32)
    k, v = kc[:, 8:], vc[:, 8:]
    want = ops.attention(q, k, v, pos0, heads, kv_heads, head_dim, head_dim ** -0.5)
    for threads in (1, 2, 3):
        wide = np.full((n_tok, heads * head_dim + 5), 7.0, np.float32)
        ok = kern.attention(q, k, v, pos0, heads, kv_heads, head_dim, head_dim ** -0.5, wide[:, 2:-3], threads)
        assert ok == (kern.simd == "avx512"), kern.simd
        if not ok:
            assert (wide == 7).all()
            continue
        got = wide[:, 2:-3]
        assert (wide[:, :2] == 7).all() and (wide[:, -3:] == 7).all(), "wrote outside out"
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= OPS_TOL, f"threads={threads}: max error {err:.3g} of the largest output"


def test_attention_rejects(kern):
    q = np.zeros((4, 64), np.float32)
    kc = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError, match="kv heads"):
        kern.attention(q, kc, kc, 0, 3, 2, 16, 0.25, np.zeros((4, 48), np.float32), 1)
    with pytest.raises(ValueError, match="rows"):
        kern.attention(q, kc, kc, 1, 4, 2, 16, 0.25, np.zeros((4, 64), np.float32), 1)
    with pytest.raises(ValueError, match="overlaps"):
        kern.attention(q, kc, kc, 0, 4, 2, 16, 0.25, q, 1)


def test_swiglu_matches_numpy(kern):
    """Every tail length around a vector and a thread's chunk; exp's clip at +-80 (g = +-200)."""
    from vkpack.runtime.cpu import ops
    rng = np.random.default_rng(5)
    for n in (1, 15, 16, 17, 4095, 4096 * 3 + 5):
        g = (rng.standard_normal(n) * 10).astype(np.float32)
        g[:3] = [-200.0, 200.0, 0.0][:min(n, 3)]
        u = rng.standard_normal(n).astype(np.float32)
        want = ops.swiglu(g, u)
        for threads in (1, 2):
            out = np.full(n, 7.0, np.float32)
            ok = kern.swiglu(g, u, out, threads)
            assert ok == (kern.simd == "avx512"), kern.simd
            if ok:
                np.testing.assert_allclose(out, want, rtol=OPS_TOL, atol=1e-30, err_msg=f"n={n} threads={threads}")
    with pytest.raises(ValueError, match="overlaps"):
        kern.swiglu(g, u, g, 1)


@pytest.mark.parametrize("dtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0"])
def test_experts_match_numpy(kern, dtype):
    """vkp_experts (experts.h) against the numpy backend's formula, expert by expert in the given order:
    one row (decode), several rows of a few tokens, every row of a 20-token pass past the fast paths'
    token limits, none; rows in any order; the result overwrites out. Tolerance: the products' (TOL
    of the sum of |terms|, here bounded through the f64 reference's magnitude) and SwiGLU's exp."""
    from vkpack.runtime.cpu import ops

    rng = np.random.default_rng(9)
    ffn, width = (256, 512) if DTYPES[dtype][0] == 256 else (96, 160)
    for n_tok, n_exp, m in ((1, 3, 1), (5, 4, 3), (20, 2, 20), (7, 0, 0)):
        x = rng.standard_normal((n_tok, width)).astype(np.float32)
        want = np.zeros((n_tok, width), np.float64)
        table = []
        for _ in range(n_exp):
            stored = [random_rows(dtype, ffn, width, rng), random_rows(dtype, ffn, width, rng),
                      random_rows(dtype, width, ffn, rng)]
            dense = [ref_dequantize(dtype, memoryview(w), shape).reshape(shape).astype(np.float64)
                     for w, shape in zip(stored, [(ffn, width), (ffn, width), (width, ffn)])]
            rows = rng.permutation(n_tok)[:m].astype(np.int32)
            wt = rng.random(m).astype(np.float32)
            bound = [kern.bind(dtype, w, *d.shape) for w, d in zip(stored, dense)]
            table.append((*bound, rows, wt))
            xr = x[rows].astype(np.float64)
            h = ops.swiglu((xr @ dense[0].T).astype(np.float32), (xr @ dense[1].T).astype(np.float32))
            want[rows] += (h.astype(np.float64) @ dense[2].T) * wt[:, None]
        for threads in (1, 2):
            out = np.full((n_tok, width), np.nan, np.float32)
            kern.experts(table, x, out, threads)
            scale = max(np.abs(want).max(), 1e-30)
            assert np.abs(out - want).max() <= 1e-4 * scale, (n_tok, n_exp, m, threads)
        if table:
            kept, kept_x = table, x
    table, x, n_tok = kept, kept_x, kept_x.shape[0]
    with pytest.raises(ValueError, match="overlaps"):
        kern.experts(table, x, x, 1)
    bad = (table[0][0], table[0][1], table[0][2], np.array([n_tok], np.int32), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="rejected"):   # a row outside x: refused in C before any read
        kern.experts([bad], x, np.empty_like(x), 1)
    with pytest.raises(ValueError, match="gate/up must be"):
        kern.experts([(table[0][2], table[0][1], table[0][0], table[0][3], table[0][4])], x, np.empty_like(x), 1)


def test_empty_products(kern):
    w = random_rows("F32", 3, 0, np.random.default_rng(0))
    y = np.full((2, 3), 5.0, np.float32)
    kern.matmul("F32", w, 3, 0, np.zeros((2, 0), np.float32), y, 2)    # no columns: sums of nothing
    assert (y == 0).all()
    kern.matmul("F32", w[:0], 0, 0, np.zeros((2, 0), np.float32), np.empty((2, 0), np.float32), 1)
    kern.matmul("Q4_0", np.zeros(18 * 2, np.uint8), 2, 32, np.zeros((0, 32), np.float32),
                np.empty((0, 2), np.float32), 1)
    kern.dequantize("Q4_0", np.zeros(0, np.uint8), 0, 32, np.empty((0, 32), np.float32), 1)


# ---- argument checks: a wrong size raises before C sees a pointer ----
def _q4(rows=4, cols=64):
    return random_rows("Q4_0", rows, cols, np.random.default_rng(1))


@pytest.mark.parametrize("case, match", [
    ({"dtype": "Q8_1"}, "no native kernel"),
    ({"dtype": "XX"}, "no native kernel"),
    ({"cols": 48}, "not a multiple of the block size"),
    ({"w": _q4()[:-1]}, "need 144 bytes, got 143"),
    ({"w": _q4().view(np.int8)}, "uint8"),
    ({"w": np.stack([_q4(), _q4()], 1)[:, 0]}, "C-contiguous"),
    ({"x": np.zeros((2, 32), np.float32)}, r"shape \(2, 32\), expected \(2, 64\)"),
    ({"x": np.zeros((2, 64), np.float64)}, "float32"),
    ({"x": np.zeros((2, 128), np.float32)[:, ::2]}, "column stride"),
    ({"x": np.zeros(64, np.float32)}, "2-D"),
    ({"out": np.zeros((2, 3), np.float32)}, r"expected \(2, >= 4\)"),
    ({"out": np.zeros((3, 4), np.float32)}, r"expected \(2, >= 4\)"),
    ({"out": np.zeros((2, 8), np.float32)[:, ::2]}, "column stride"),
    ({"rows": -1}, ">= 0"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"threads": 1.5}, "integer"),
])
def test_matmul_rejects(case, match):
    k = _default_or_skip()
    args = {"dtype": "Q4_0", "w": _q4(), "rows": 4, "cols": 64, "x": np.zeros((2, 64), np.float32),
            "out": np.zeros((2, 4), np.float32), "threads": 1}
    args.update(case)
    with pytest.raises(ValueError, match=match):
        k.matmul(**args)


def test_rejects_read_only_and_overlap():
    k = _default_or_skip()
    w, x = _q4(), np.zeros((2, 64), np.float32)
    ro = np.zeros((2, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        k.matmul("Q4_0", w, 4, 64, x, ro, 1)
    with pytest.raises(ValueError, match="overlaps"):
        k.matmul("Q4_0", w, 4, 64, x, x[:, :4], 1)
    with pytest.raises(ValueError, match=r"shape \(4, 64\)"):
        k.dequantize("Q4_0", w, 4, 64, np.zeros((4, 32), np.float32), 1)
    with pytest.raises(ValueError, match=r"shape \(4, 64\)"):
        k.dequantize("Q4_0", w, 4, 64, np.zeros((4, 128), np.float32)[:, ::2], 1)


def test_c_rejects_unknown_type_and_short_rows(monkeypatch):
    """vkp_matmul/vkp_dequantize return -1 for a type they lack or rows shorter than cols need; the
    wrapper turns -1 into ValueError."""
    k = _default_or_skip()
    w, x, y = _q4(), np.zeros((1, 64), np.float32), np.zeros((1, 4), np.float32)
    lib = k._lib
    assert lib.vkp_abi_version() == loader.ABI_VERSION
    args = (w.ctypes.data, 36, 4, 64, x.ctypes.data, 64, 1, y.ctypes.data, 4, 1)
    assert lib.vkp_matmul(GGML_TYPE_IDS["Q4_0"], *args) == 0
    assert lib.vkp_matmul(GGML_TYPE_IDS["Q8_1"], *args) == -1                 # a GGML type without a kernel
    assert lib.vkp_matmul(99, *args) == -1
    assert lib.vkp_matmul(GGML_TYPE_IDS["Q4_0"], w.ctypes.data, 35, *args[2:]) == -1   # row_bytes < 2 blocks
    assert lib.vkp_matmul(GGML_TYPE_IDS["Q4_0"], w.ctypes.data, 36, 4, 48, *args[4:]) == -1  # 1.5 blocks
    assert lib.vkp_dequantize(99, w.ctypes.data, 36, 4, 64, y.ctypes.data, 1) == -1
    monkeypatch.setattr(loader, "TYPES", loader.TYPES + ("Q8_1",))           # past the Python check
    with pytest.raises(ValueError, match="vkp_matmul rejected Q8_1"):
        k.matmul("Q8_1", np.zeros(40 * 2 * 4, np.uint8), 4, 64, x, y, 1)
    with pytest.raises(ValueError, match="vkp_dequantize rejected Q8_1"):
        k.dequantize("Q8_1", np.zeros(40 * 2 * 4, np.uint8), 4, 64, np.zeros((4, 64), np.float32), 1)


def test_module_functions_use_the_default_build():
    if _compiler_missing():
        pytest.skip("no C compiler")
    w = np.frombuffer(np.float32([[1, 2], [3, 4]]).tobytes(), np.uint8)
    y = np.zeros((1, 2), np.float32)
    native.matmul("F32", w, 2, 2, np.float32([[1, 1]]), y, 1)
    assert y.tolist() == [[3, 7]]
    out = np.empty((2, 2), np.float32)
    native.dequantize("F32", w, 2, 2, out, 1)
    assert out.tolist() == [[1, 2], [3, 4]]
    ok, why = native.available()
    assert ok and why.endswith(".so")


def _default_or_skip() -> native.Kernels:
    if _compiler_missing():
        pytest.skip("no C compiler ($CC or cc) on PATH")
    k = native.load()
    assert k is not None, native.available()[1]
    return k


# ---- loading: disabled, no compiler, failed compile, cache ----
@pytest.fixture
def fresh_state(monkeypatch):
    """A process that has not loaded the kernels yet."""
    monkeypatch.setattr(loader, "_state", {})


def test_disabled_by_env(fresh_state, monkeypatch, caplog):
    monkeypatch.setenv("VKPACK_NATIVE", "0")
    with caplog.at_level(logging.INFO, logger=loader.__name__):
        assert native.load() is None
        assert native.available() == (False, "disabled by VKPACK_NATIVE=0")
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    with pytest.raises(native.NativeUnavailable, match="VKPACK_NATIVE"):
        native.matmul("F32", np.zeros(4, np.uint8), 1, 1, np.zeros((1, 1), np.float32),
                      np.zeros((1, 1), np.float32), 1)


def test_no_compiler_warns_once(fresh_state, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("VKPACK_CACHE", str(tmp_path))
    monkeypatch.delenv("VKPACK_NATIVE", raising=False)
    with caplog.at_level(logging.INFO, logger=loader.__name__):
        assert native.load() is None
        assert native.load() is None
        ok, why = native.available()
    assert not ok and "no C compiler" in why
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def _fake_cc(tmp_path, exit_code=0):
    """A stand-in compiler: logs each compile to calls.txt and writes `-o`'s file (or fails)."""
    cc = tmp_path / "fakecc"
    cc.write_text("#!/bin/sh\n"
                  'if [ "$1" = "--version" ]; then echo "fakecc 1.0"; exit 0; fi\n'
                  'while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
                  f'echo "$out" >> "{tmp_path}/calls.txt"\n'
                  f'if [ {exit_code} -ne 0 ]; then echo "kernels.c:1: error: no good" >&2; exit {exit_code}; fi\n'
                  'printf "library" > "$out"\n')
    cc.chmod(cc.stat().st_mode | stat.S_IXUSR)
    return cc


def test_compile_failure_warns_with_the_reason(fresh_state, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CC", str(_fake_cc(tmp_path, exit_code=1)))
    monkeypatch.setenv("VKPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VKPACK_NATIVE", raising=False)
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        assert native.load() is None
    assert len(caplog.records) == 1 and "error: no good" in caplog.records[0].getMessage()
    assert list((tmp_path / "cache" / "native").iterdir()) == []          # the temp file is gone


def test_build_caches_by_source_flags_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(_fake_cc(tmp_path)))
    d = tmp_path / "cache"
    a = native.build(directory=d)
    assert native.build(directory=d) == a                                # cached: not compiled again
    b = native.build(("-DVKP_PORTABLE",), directory=d)
    assert b != a and a.read_bytes() == b.read_bytes() == b"library"
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 2
    assert sorted(p.name for p in d.iterdir()) == sorted([a.name, b.name])   # no temp files left
    src = tmp_path / "src"                                  # a copy of the sources with one header edited
    src.mkdir()
    for f in loader.SOURCE.parent.glob("*.[ch]"):
        (src / f.name).write_bytes(f.read_bytes())
    (src / "decoders.h").write_bytes((src / "decoders.h").read_bytes() + b"\n/* edited */\n")
    monkeypatch.setattr(loader, "SOURCE", src / "kernels.c")
    assert native.build(directory=d) not in (a, b)


def test_concurrent_builds_each_see_a_whole_library(monkeypatch, tmp_path):
    """Two builders at once both compile into temp files; os.replace leaves one whole file."""
    monkeypatch.setenv("CC", str(_fake_cc(tmp_path)))
    d, results = tmp_path / "cache", []
    threads = [threading.Thread(target=lambda: results.append(native.build(directory=d))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0].read_bytes() == b"library"
    assert [p.name for p in d.iterdir()] == [results[0].name]


def test_bench_tool_smoke(tmp_path, capsys):
    """tools/bench_native.py runs end to end (tiny sizes) and writes its JSON."""
    if _compiler_missing():
        pytest.skip("no C compiler")
    import json

    import bench_native

    assert bench_native.main(["--quick", "--json", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert {r["dtype"] for r in res["native"]} == {"F16", "Q4_K"} and all(r["gbs"] > 0 for r in res["native"])
    assert set(res["read_gbs"]) == {"1", "2"} and len(res["numpy"]) == 2
    assert "numpy f32" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["F16", "Q4_1", "Q4_K"])
def test_bound_weight_equals_matmul_and_checks_its_inputs(dtype):
    """`Kernels.bind` checks the weight once; each call still checks x and out."""
    k = native.load()
    rng = np.random.default_rng(7)
    rows, cols = 37, 512
    w = random_rows(dtype, rows, cols, rng)
    bound = k.bind(dtype, w, rows, cols)
    x = rng.standard_normal((3, cols), np.float32)
    want = np.zeros((3, rows), np.float32)
    k.matmul(dtype, w, rows, cols, x, want, 2)
    got = np.full((3, rows + 4), 9.0, np.float32)
    bound(x, got[:, 1:1 + rows], 2)
    np.testing.assert_array_equal(got[:, 1:1 + rows], want)
    assert (got[:, 0] == 9).all() and (got[:, 1 + rows:] == 9).all()
    for bad_x, bad_out in [(x[:, :-32], want), (x.astype(np.float64), want), (x, want[:, :-1]), (x[:2], want),
                           (x.T.copy(), want), ([[0.0] * cols], want)]:
        with pytest.raises(ValueError):
            bound(bad_x, bad_out, 1)
    with pytest.raises(ValueError, match="overlaps"):
        bound(x, x[:, :rows], 1)
