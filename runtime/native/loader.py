"""Compile kernels.c once per machine, load it with ctypes, and check every call's arguments.

The library is built on first use with `$CC` (default `cc`) and `FLAGS` into `cache_dir()`, under a
name that hashes the sources (kernels.c and the headers beside it), the flags, the compiler's
`--version` and `platform.machine()`: a new
compiler, CPU architecture or source gets a new file, and an unchanged machine compiles once. The
compiler writes a temp file in the same folder that `os.replace` renames into place, so two processes
that compile at once both end with a whole library. ctypes drops the GIL for the whole call.

Every array is checked here before C sees a pointer (dtype, shape, strides, byte counts): a wrong
size raises ValueError and C never reads or writes outside the arrays it is given. The checks and the
ctypes call cost ~10 us per product here (the bare ctypes call ~2 us), which matters only for small
weights (576x1536 Q4_0 is ~0.5 MB, ~80 us at 6 GB/s).
GNU OpenMP is not fork-safe: a child forked after the parent ran multi-threaded kernels may hang in them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import operator
import os
import platform
import shlex
import shutil
import subprocess
from typing import Any
import tempfile
import threading
from pathlib import Path

import numpy as np

from ...pack_format.constants import GGML_TYPE_IDS, row_bytes

log = logging.getLogger(__name__)

ABI_VERSION = 6
SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off keeps the decoders bit-equal to GGML (kernels.c says why); -march=native picks the
# host's SIMD at compile time.
FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")
TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
_OFF = {"0", "false", "no", "off"}
_CHAR = ctypes.c_char
_COMPILE_TIMEOUT_S = 300

_lock = threading.Lock()
_state: dict[str, object] = {}       # "kernels": Kernels | None, "reason": str, once loaded or failed


class NativeUnavailable(RuntimeError):
    """No compiler, the compile failed, or the library would not load."""


def cache_root() -> Path:
    """vkpack's per-machine cache: `$VKPACK_CACHE`, else `~/.cache/vkpack`."""
    root = os.environ.get("VKPACK_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "vkpack"


def cache_dir() -> Path:
    """Where built libraries live: `cache_root()/native`."""
    return cache_root() / "native"


def _compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        raise NativeUnavailable(f"no C compiler: {' '.join(cc) or '$CC'!r} is not on PATH")
    return cc


def build(extra_flags: tuple[str, ...] = (), directory: Path | None = None) -> Path:
    """Compile kernels.c (unless this exact build is cached) and return the library's path.

    Args:
        extra_flags: appended to `FLAGS`, e.g. `("-DVKP_PORTABLE",)` or `("-march=haswell",)` (tests).
        directory: the cache folder; default `cache_dir()`.
    Raises:
        NativeUnavailable: no compiler, or it failed (the message ends with its last output lines).
    """
    cc = _compiler()
    flags = FLAGS + tuple(extra_flags)
    src = b"".join(p.name.encode() + b"\0" + p.read_bytes() for p in [SOURCE, *sorted(SOURCE.parent.glob("*.h"))])
    try:
        ver = subprocess.run([*cc, "--version"], capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{cc[0]} --version failed: {e}") from e
    h = hashlib.sha256()
    for part in (src, "\0".join(flags).encode(), ver, platform.machine().encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / f"kernels-{h.hexdigest()[:20]}.so"
    if path.exists():
        return path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as e:
        raise NativeUnavailable(f"cache folder {directory} is not writable: {e}") from e
    try:
        cmd = [*cc, *flags, "-o", tmp, str(SOURCE), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
            raise NativeUnavailable(f"{shlex.join(cmd)} exited {r.returncode}:\n{tail}")
        os.replace(tmp, path)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"compiling {SOURCE.name} with {cc[0]} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("native kernels: compiled %s", path)
    return path


# ---- argument checks ----
def _count(name: str, v: object) -> int:
    try:
        n = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(v).__name__}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def _weights(dtype: str, w: np.ndarray, rows: int, cols: int) -> int:
    """Check the stored rows; return the bytes per row."""
    if dtype not in TYPES:
        raise ValueError(f"dtype {dtype!r} has no native kernel; supported: {', '.join(TYPES)}")
    rb = row_bytes(dtype, cols)                    # ValueError unless cols is whole blocks
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or not w.flags.c_contiguous:
        raise ValueError(f"w must be a C-contiguous uint8 array, got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.size != rows * rb:
        raise ValueError(f"{dtype} weights of {rows} rows x {cols} cols need {rows * rb} bytes, got {w.size}")
    return rb


def _rows_view(name: str, a: np.ndarray, n: int, min_cols: int, exact: bool, writeable: bool) -> int:
    """Check a float32 (n, >= min_cols) array whose rows are contiguous; return its row stride in floats."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D float32 array, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} with shape {getattr(a, 'shape', None)}")
    ok_cols = a.shape[1] == min_cols if exact else a.shape[1] >= min_cols
    if a.shape[0] != n or not ok_cols:
        want = f"({n}, {min_cols})" if exact else f"({n}, >= {min_cols})"
        raise ValueError(f"{name} has shape {a.shape}, expected {want}")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if a.size == 0:
        return max(min_cols, 1)                   # numpy gives empty arrays zero strides
    if a.shape[1] > 1 and a.strides[1] != 4:
        raise ValueError(f"{name} rows must be contiguous (column stride 4 bytes), got stride {a.strides[1]}")
    if n <= 1:
        return max(min_cols, 1)                   # a single row's stride is meaningless (and may be anything)
    s0 = a.strides[0]
    if s0 % 4 or s0 < 4 * min_cols:
        raise ValueError(f"{name} row stride {s0} bytes must be a multiple of 4 and >= {4 * min_cols}")
    return s0 // 4


def _addr(a: np.ndarray) -> int:
    """The address of a's first byte. The buffer protocol takes ~0.9 us where it works (writeable and
    contiguous); numpy's `a.ctypes.data` takes ~2.5 us (measured, numpy 2.4): per call that matters for
    small models, whose products take tens of microseconds."""
    try:
        return ctypes.addressof(_CHAR.from_buffer(a))
    except (TypeError, ValueError, BufferError):
        return a.ctypes.data


def _overlap(a0: int, a_len: int, b0: int, b_len: int) -> bool:
    return a0 < b0 + b_len and b0 < a0 + a_len


def _threads(threads: object) -> int:
    n = _count("threads", threads)
    if n < 1:
        raise ValueError("threads must be >= 1")
    return min(n, 1024)


class Kernels:
    """One loaded build of kernels.c (the default one comes from `load()`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
            lib.vkp_abi_version.restype = ctypes.c_int
            lib.vkp_abi_version.argtypes = []
        except (OSError, AttributeError) as e:
            raise NativeUnavailable(f"loading {self.path} failed: {e}") from e
        if lib.vkp_abi_version() != ABI_VERSION:
            raise NativeUnavailable(f"{self.path}: ABI {lib.vkp_abi_version()}, expected {ABI_VERSION}")
        i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.vkp_matmul.argtypes = [c_int, vp, i64, i64, i64, vp, i64, i64, vp, i64, c_int]
        lib.vkp_matmul.restype = c_int
        lib.vkp_dequantize.argtypes = [c_int, vp, i64, i64, i64, vp, c_int]
        lib.vkp_dequantize.restype = c_int
        lib.vkp_bench_read.argtypes = [vp, i64, c_int]
        lib.vkp_bench_read.restype = ctypes.c_uint64
        lib.vkp_attention.argtypes = [vp, i64, i64, vp, vp, i64, i64, c_int, c_int, c_int, ctypes.c_float, vp, i64,
                                      c_int]
        lib.vkp_attention.restype = c_int
        lib.vkp_swiglu.argtypes = [vp, vp, vp, i64, c_int]
        lib.vkp_swiglu.restype = c_int
        lib.vkp_experts.argtypes = [c_int, vp, i64, i64, vp, i64, vp, c_int]
        lib.vkp_experts.restype = c_int
        lib.vkp_program.argtypes = [vp, i64, c_int]
        lib.vkp_program.restype = c_int
        # program.h's entry: its table comes from program.py, which checks every array it names
        self.run_program = lib.vkp_program
        lib.vkp_simd.argtypes = []
        lib.vkp_simd.restype = c_int
        self.simd = {2: "avx512", 1: "avx2"}.get(lib.vkp_simd(), "portable")   # the SIMD path compiled in
        self._lib = lib

    def matmul(self, dtype: str, w: np.ndarray, rows: int, cols: int, x: np.ndarray, out: np.ndarray,
               threads: int) -> None:
        """out[t, r] = sum_c x[t, c] * W[r, c] for the stored W; see the module-level `matmul`."""
        rows, cols, nth = _count("rows", rows), _count("cols", cols), _threads(threads)
        rb = _weights(dtype, w, rows, cols)
        if not isinstance(x, np.ndarray) or x.ndim != 2:
            raise ValueError(f"x must be a 2-D float32 array, got {getattr(x, 'shape', type(x).__name__)}")
        n_tok = x.shape[0]
        ldx = _rows_view("x", x, n_tok, cols, exact=True, writeable=False)
        ldy = _rows_view("out", out, n_tok, rows, exact=False, writeable=True)
        if n_tok == 0 or rows == 0:
            return
        pw, px, py = _addr(w), _addr(x), _addr(out)
        y_len = 4 * ((n_tok - 1) * ldy + rows)                # the bytes spanned by out[:, :rows]
        if _overlap(py, y_len, px, 4 * ((n_tok - 1) * ldx + cols)) or _overlap(py, y_len, pw, w.size):
            raise ValueError("out overlaps x or w")
        rc = self._lib.vkp_matmul(GGML_TYPE_IDS[dtype], pw, rb, rows, cols, px, ldx, n_tok, py, ldy, nth)
        if rc != 0:
            raise ValueError(f"vkp_matmul rejected {dtype} {rows}x{cols} (n_tok {n_tok}, ldx {ldx}, ldy {ldy})")

    def bind(self, dtype: str, w: np.ndarray, rows: int, cols: int) -> BoundWeight:
        """`matmul` for one stored weight, its checks made once: a decode token multiplies each weight
        once, and for a small model the per-call checks cost as much as the product."""
        rows, cols = _count("rows", rows), _count("cols", cols)
        rb = _weights(dtype, w, rows, cols)
        return BoundWeight(self._lib.vkp_matmul, GGML_TYPE_IDS[dtype], w, _addr(w), rb, rows, cols)

    def dequantize(self, dtype: str, w: np.ndarray, rows: int, cols: int, out: np.ndarray,
                   threads: int) -> None:
        """out[r, c] = W[r, c] as f32; see the module-level `dequantize`."""
        rows, cols, nth = _count("rows", rows), _count("cols", cols), _threads(threads)
        rb = _weights(dtype, w, rows, cols)
        if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (rows, cols)
                or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {(rows, cols)}, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', None)}")
        if out.size == 0:
            return
        pw, po = _addr(w), _addr(out)
        if _overlap(po, 4 * out.size, pw, w.size):
            raise ValueError("out overlaps w")
        rc = self._lib.vkp_dequantize(GGML_TYPE_IDS[dtype], pw, rb, rows, cols, po, nth)
        if rc != 0:
            raise ValueError(f"vkp_dequantize rejected {dtype} {rows}x{cols}")

    def attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, n_heads: int,
                  n_kv_heads: int, head_dim: int, scale: float, out: np.ndarray, threads: int) -> bool:
        """Causal grouped-query attention as runtime.cpu.ops.attention (no softcap, no window) into out
        (n_tok, >= n_heads * head_dim); the caches' first pos0 + n_tok rows are read. False where this
        build has no such kernel (not AVX-512, head_dim not a multiple of 16): the caller keeps numpy."""
        pos0, n_heads, n_kv_heads, head_dim = (_count(n, v) for n, v in (("pos0", pos0), ("n_heads", n_heads),
                                                ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)))
        if n_kv_heads < 1 or head_dim < 1 or n_heads % n_kv_heads:
            raise ValueError(f"{n_heads} heads over {n_kv_heads} kv heads of {head_dim} dims")
        n_tok = q.shape[0] if isinstance(q, np.ndarray) and q.ndim == 2 else -1
        ldq = _rows_view("q", q, n_tok, n_heads * head_dim, exact=True, writeable=False)
        ldo = _rows_view("out", out, n_tok, n_heads * head_dim, exact=False, writeable=True)
        rows = pos0 + n_tok
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not isinstance(c, np.ndarray) or c.ndim != 2 or c.shape[0] < rows:
                raise ValueError(f"{name} must be 2-D with >= {rows} rows, got {getattr(c, 'shape', None)}")
        ldk = _rows_view("k_cache", k_cache[:rows], rows, n_kv_heads * head_dim, exact=False, writeable=False)
        ldv = _rows_view("v_cache", v_cache[:rows], rows, n_kv_heads * head_dim, exact=False, writeable=False)
        if ldk != ldv:
            raise ValueError(f"k_cache and v_cache row strides differ ({ldk}, {ldv})")
        if n_tok == 0:
            return True
        po, o_len = _addr(out), 4 * ((n_tok - 1) * ldo + n_heads * head_dim)
        ins = ((_addr(q), 4 * ((n_tok - 1) * ldq + n_heads * head_dim)),
               (_addr(k_cache), 4 * (rows - 1) * ldk + 4 * n_kv_heads * head_dim),
               (_addr(v_cache), 4 * (rows - 1) * ldv + 4 * n_kv_heads * head_dim))
        if any(_overlap(po, o_len, a, n) for a, n in ins):
            raise ValueError("out overlaps q or the caches")
        rc = self._lib.vkp_attention(ins[0][0], ldq, n_tok, ins[1][0], ins[2][0], ldk, pos0, n_heads, n_kv_heads,
                                     head_dim, float(scale), po, ldo, _threads(threads))
        if rc == -1:
            raise ValueError(f"vkp_attention rejected {n_heads}/{n_kv_heads} heads x {head_dim}")
        return rc == 0

    def swiglu(self, g: np.ndarray, u: np.ndarray, out: np.ndarray, threads: int) -> bool:
        """out = silu(g) * u as runtime.cpu.ops.swiglu, all three C-contiguous float32 of one shape.
        False where this build has no such kernel (not AVX-512): the caller keeps numpy."""
        for name, a in (("g", g), ("u", u), ("out", out)):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous or a.shape != g.shape:
                raise ValueError(f"{name} must be a C-contiguous float32 array of g's shape {getattr(g, 'shape', None)}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        po, n = _addr(out), 4 * out.size
        if n and (_overlap(po, n, _addr(g), n) or _overlap(po, n, _addr(u), n)):
            raise ValueError("out overlaps g or u")
        return self._lib.vkp_swiglu(_addr(g), _addr(u), po, out.size, _threads(threads)) == 0

    def experts(self, experts: list[tuple[BoundWeight, BoundWeight, BoundWeight, np.ndarray, np.ndarray]],
                x: np.ndarray, out: np.ndarray, threads: int) -> None:
        """out = sum over `experts` (gate, up, down, rows, weights) of weights[:, None] * down(silu(gate(x[rows])) *
        up(x[rows])) scattered to `rows`, in the order given, in one parallel region (experts.h). x and
        out: C-contiguous float32 (n_tok, width); gate and up: (ffn, width), down: (width, ffn)."""
        for name, a in (("x", x), ("out", out)):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2 or not a.flags.c_contiguous:
                raise ValueError(f"{name} must be a C-contiguous 2-D float32 array")
        if out.shape != x.shape or not out.flags.writeable:
            raise ValueError(f"out must be writeable and of x's shape {x.shape}")
        n_tok, width = x.shape
        if _overlap(_addr(out), 4 * out.size, _addr(x), 4 * x.size):
            raise ValueError("out overlaps x")
        ffn = experts[0][0].rows if experts else 1
        table = (_Expert * max(1, len(experts)))()
        keep = []
        for i, (g, u, d, rows, wts) in enumerate(experts):
            if (g.rows, g.cols, u.rows, u.cols, d.rows, d.cols) != (ffn, width, ffn, width, width, ffn):
                raise ValueError(f"expert {i}: gate/up must be ({ffn}, {width}) and down ({width}, {ffn})")
            rows = np.ascontiguousarray(rows, dtype=np.int32)
            wts = np.ascontiguousarray(wts, dtype=np.float32)
            if rows.ndim != 1 or wts.shape != rows.shape:
                raise ValueError(f"expert {i}: rows and weights must be 1-D of one length")
            keep += [rows, wts]
            t = table[i]
            for j, bw in enumerate((g, u, d)):
                t.type[j], t.w[j], t.row_bytes[j] = bw._type, bw._pw, bw._rb
            t.n_rows, t.rows, t.weight = len(rows), _addr(rows), _addr(wts)
        rc = self._lib.vkp_experts(len(experts), ctypes.addressof(table), ffn, width, _addr(x), n_tok, _addr(out),
                                   _threads(threads))
        if rc != 0:
            raise ValueError(f"vkp_experts rejected {len(experts)} experts of ({ffn}, {width}) over {n_tok} rows "
                             f"(rc {rc})")

    def bench_read(self, buf: np.ndarray, threads: int) -> int:
        """Read all of `buf` (C-contiguous uint8, a multiple of 8 bytes) on `threads` threads: the
        memory-bandwidth yardstick of tools/bench_native.py. Returns a checksum."""
        nth = _threads(threads)
        if (not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or not buf.flags.c_contiguous
                or buf.size % 8):
            raise ValueError("buf must be a C-contiguous uint8 array of a multiple of 8 bytes")
        return int(self._lib.vkp_bench_read(_addr(buf), buf.size, nth))


class _Expert(ctypes.Structure):
    """struct vkp_expert (experts.h)."""

    _fields_ = [("type", ctypes.c_int32 * 3), ("w", ctypes.c_void_p * 3), ("row_bytes", ctypes.c_int64 * 3),
                ("n_rows", ctypes.c_int64), ("rows", ctypes.c_void_p), ("weight", ctypes.c_void_p)]


class BoundWeight:
    """A stored weight checked once (`Kernels.bind`); calling it checks only x and out."""

    __slots__ = ("_fn", "_pw", "_rb", "_type", "_w", "cols", "rows")

    def __init__(self, fn: Any, type_id: int, w: np.ndarray, pw: int, rb: int, rows: int, cols: int):
        self._fn, self._type, self._w, self._pw, self._rb = fn, type_id, w, pw, rb  # _w keeps the bytes alive
        self.rows, self.cols = rows, cols

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        """out[t, r] = sum_c x[t, c] * W[r, c] for r < rows (out may be wider); as `Kernels.matmul`."""
        nth = _threads(threads)
        n_tok, px, ldx, py, ldy = self.operands(x, out)
        if n_tok == 0 or self.rows == 0:
            return
        if self._fn(self._type, self._pw, self._rb, self.rows, self.cols, px, ldx, n_tok, py, ldy, nth) != 0:
            raise ValueError(f"vkp_matmul rejected {self.rows}x{self.cols} (n_tok {n_tok}, ldx {ldx}, ldy {ldy})")

    def operands(self, x: np.ndarray, out: np.ndarray) -> tuple[int, int, int, int, int]:
        """Check x (n, cols) and out (n, >= rows) for a product with this weight: (n, x's address, its row
        stride, out's address, its row stride); ValueError for a wrong shape, stride or an overlap."""
        rows, cols = self.rows, self.cols
        n_tok = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 2 else -1
        ldx = _rows_view("x", x, n_tok, cols, exact=True, writeable=False)
        ldy = _rows_view("out", out, n_tok, rows, exact=False, writeable=True)
        if n_tok == 0 or rows == 0:
            return n_tok, 0, ldx, 0, ldy
        px, py = _addr(x), _addr(out)
        y_len = 4 * ((n_tok - 1) * ldy + rows)
        if _overlap(py, y_len, px, 4 * ((n_tok - 1) * ldx + cols)) or _overlap(py, y_len, self._pw, self._w.size):
            raise ValueError("out overlaps x or w")
        return n_tok, px, ldx, py, ldy


# ---- the process-wide build ----
def load() -> Kernels | None:
    """The native kernels for this machine, compiled on first use; None if disabled or unavailable.

    `VKPACK_NATIVE=0` disables them (logged at info). Otherwise a failure (no compiler, a compile
    error, a load error) is logged once as a warning with its reason, and the caller falls back to numpy.
    """
    with _lock:
        if "reason" not in _state:
            if os.environ.get("VKPACK_NATIVE", "").strip().lower() in _OFF:
                _state.update(kernels=None, reason="disabled by VKPACK_NATIVE=0")
                log.info("native kernels: %s", _state["reason"])
            else:
                try:
                    k = Kernels(build())
                    _state.update(kernels=k, reason=f"{k.path}")
                except NativeUnavailable as e:
                    _state.update(kernels=None, reason=str(e))
                    log.warning("native kernels unavailable, using numpy: %s", e)
        return _state["kernels"]  # type: ignore[return-value]


def available() -> tuple[bool, str]:
    """(True, the library's path) or (False, why not); compiles on the first call."""
    k = load()
    return k is not None, str(_state["reason"])


def _kernels() -> Kernels:
    k = load()
    if k is None:
        raise NativeUnavailable(f"native kernels unavailable: {_state['reason']}")
    return k


def matmul(dtype: str, w: np.ndarray, rows: int, cols: int, x: np.ndarray, out: np.ndarray,
           threads: int) -> None:
    """Multiply stored weights into activations: out[t, r] = sum_c x[t, c] * W[r, c], f32 accumulation.

    Args:
        dtype: a name in `TYPES` (GGML layouts, bytes exactly as in the GGUF).
        w: uint8, C-contiguous, `rows * row_bytes(dtype, cols)` bytes: the stored rows.
        rows, cols: W's shape; cols is a whole number of blocks.
        x: float32 (T, cols); rows contiguous, the row stride may exceed cols (a column slice).
        out: float32 (T, >= rows), rows contiguous, any row stride: out[:, :rows] is written, so a
            column slice `y[:, r0:r1]` of a wider array works.
        threads: OpenMP threads for this call (contiguous row ranges).
    Raises:
        ValueError: a wrong dtype, shape, stride or byte count (C is never called with one).
        NativeUnavailable: no native build on this machine (see `available()`).
    Example:
        >>> w = np.frombuffer(np.float32([[1, 2], [3, 4]]).tobytes(), np.uint8)
        >>> y = np.zeros((1, 2), np.float32); matmul("F32", w, 2, 2, np.float32([[1, 1]]), y, 1); y
        array([[3., 7.]], dtype=float32)
    """
    _kernels().matmul(dtype, w, rows, cols, x, out, threads)


def dequantize(dtype: str, w: np.ndarray, rows: int, cols: int, out: np.ndarray, threads: int) -> None:
    """Decode stored weights into `out`, float32 C-contiguous (rows, cols), bit-equal to `cpu.dequant`.

    Arguments as in `matmul`. Example: `dequantize("Q4_0", w, 4096, 4096, np.empty((4096, 4096), np.float32), 2)`.
    """
    _kernels().dequantize(dtype, w, rows, cols, out, threads)
