"""A GGUF v2/v3 header parser for untrusted files: key/values and the tensor table, nothing else.

Why not `gguf.GGUFReader`: it builds a numpy view for every field and took 1.6 s on SmolLM2's
49k-token vocabulary, half of a whole build (docs/benchmarks.md); this reads the same header in
tens of milliseconds. Every length and count is checked against the bytes left before use.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...pack_format.constants import GGML_OTHER_TYPES, GGML_TYPE_IDS, WEIGHT_DTYPES
from ...pack_format.errors import SourceError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Caps on what one value may make us build, checked before building it. Real headers stay far below:
# the largest vocabularies have about 256k tokens (and twice as many merges), templates a few KB.
MAX_ARRAY = 1 << 21          # elements of one array value (each becomes a Python object)
MAX_STRING = 1 << 24         # bytes of one string
# GGUF value types: id -> (struct code, numpy dtype) for scalars; 8 string, 9 array
_SCALARS = {0: ("<B", "<u1"), 1: ("<b", "<i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
            5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "<u1"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
            12: ("<d", "<f8")}
_STRING, _ARRAY, _BOOL = 8, 9, 7
# ggml type ids (ggml.h) -> vkpack dtype names
GGML_TYPES = {tid: name for name, tid in GGML_TYPE_IDS.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                # vkpack dtype name
    shape: tuple[int, ...]    # rows first (GGUF's ne reversed)
    offset: int               # absolute file offset of the data


@dataclass(frozen=True)
class GgufHeader:
    version: int
    meta: dict[str, Any]
    tensors: list[TensorInfo]
    data_start: int
    alignment: int = DEFAULT_ALIGNMENT   # every tensor's offset from data_start is a multiple of it


class _Cursor:
    """Reads values from the file's memory map: only the pages parsed are touched, and no value is
    copied before its length is checked against the bytes left and the caps above."""

    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise SourceError(f"{self.path}: truncated GGUF: {what} at byte {self.pos} needs {n} bytes, "
                              f"{self.size - self.pos} left")
        p = self.pos
        self.pos += n
        return p

    def unpack(self, code: str, what: str) -> Any:
        return struct.unpack_from(code, self.buf, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING and self.pos + n <= self.size:
            raise SourceError(f"{self.path}: {what}: a string of {n} bytes exceeds the cap {MAX_STRING}")
        p = self.take(n, what)
        try:
            return self.buf[p:p + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise SourceError(f"{self.path}: {what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype][0], what)
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.unpack("<I", what), self.unpack("<Q", what)
            if count > MAX_ARRAY:
                raise SourceError(f"{self.path}: {what}: an array of {count} elements exceeds the cap {MAX_ARRAY}")
            if etype in _SCALARS:
                itemsize = np.dtype(_SCALARS[etype][1]).itemsize
                p = self.take(count * itemsize, what)
                arr = np.frombuffer(self.buf[p:p + count * itemsize], dtype=_SCALARS[etype][1])  # a copy: the map closes
                return [bool(x) for x in arr] if etype == _BOOL else arr.tolist()
            if etype == _STRING:
                if count * 8 > self.size - self.pos:  # each string needs at least its 8-byte length
                    raise SourceError(f"{self.path}: truncated GGUF: {what} claims {count} strings")
                return [self.string(what) for _ in range(count)]
            raise SourceError(f"{self.path}: {what}: arrays of type {etype} are not supported")
        raise SourceError(f"{self.path}: {what}: unknown GGUF value type {vtype}")


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Key/values (plain Python values) and tensor table of a GGUF file; SourceError when malformed."""
    path = Path(path)
    from ...pack_format.reader import open_regular

    with open_regular(path, SourceError) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise SourceError(f"{path}: empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, path, size)


def _parse(buf: Any, path: Path, size: int) -> GgufHeader:
    c = _Cursor(buf, path)
    magic = buf[c.take(4, "magic"):4]
    if magic != MAGIC:
        raise SourceError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        raise SourceError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.unpack("<Q", "tensor count"), c.unpack("<Q", "key/value count")
    if n_tensors > size or n_kv > size:
        raise SourceError(f"{path}: truncated GGUF: {n_tensors} tensors and {n_kv} keys cannot fit {size} bytes")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}")
        meta[key] = c.value(c.unpack("<I", f"type of {key}"), f"value of {key}")
    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor {i} name")
        n_dims = c.unpack("<I", f"dims of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise SourceError(f"{path}: tensor {name!r} has {n_dims} dimensions (1-{MAX_DIMS} allowed)")
        ne = [c.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
        tid = c.unpack("<I", f"type of {name}")
        if tid not in GGML_TYPES:
            what = GGML_OTHER_TYPES.get(tid, "unknown")
            raise SourceError(f"{path}: tensor {name!r} has ggml type {what} ({tid}), which vkpack does not "
                              f"support; supported: {', '.join(WEIGHT_DTYPES)}")
        rel = c.unpack("<Q", f"offset of {name}")
        infos.append((name, GGML_TYPES[tid], tuple(reversed(ne)), rel))
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise SourceError(f"{path}: general.alignment {align!r} is not a power of two")
    data_start = -(-c.pos // align) * align
    tensors = [TensorInfo(n, d, s, data_start + rel) for n, d, s, rel in infos]
    return GgufHeader(version, meta, tensors, data_start, align)
