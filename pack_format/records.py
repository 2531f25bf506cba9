"""Typed views of the index's pack and tensor tables (the index itself is plain msgpack)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PackRecord:
    id: int                 # position in the pack table
    kind: str               # one of constants.PACK_KINDS
    layer: int | None       # transformer block, None for embed/head
    offset: int             # absolute file offset of the stored bytes, a multiple of ALIGN
    stored_size: int        # bytes in the file
    raw_size: int           # bytes after decoding
    codec: str              # one of constants.CODECS
    codec_params: dict[str, Any] = field(default_factory=dict)
    crc32: int = 0          # zlib crc32 of the stored bytes
    raw_crc32: int = 0      # zlib crc32 of the decoded bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "layer": self.layer, "offset": self.offset,
            "stored_size": self.stored_size, "raw_size": self.raw_size, "codec": self.codec,
            "codec_params": dict(self.codec_params), "crc32": self.crc32, "raw_crc32": self.raw_crc32,
        }


@dataclass(frozen=True)
class TensorPart:
    pack: int               # pack id holding these rows
    offset: int             # byte offset inside the decoded pack, a multiple of TENSOR_ALIGN
    nbytes: int             # bytes of rows [row_start, row_end)
    row_start: int
    row_end: int

    def to_dict(self) -> dict[str, Any]:
        return {"pack": self.pack, "offset": self.offset, "nbytes": self.nbytes,
                "row_start": self.row_start, "row_end": self.row_end}


@dataclass(frozen=True)
class TensorRecord:
    name: str               # normalized (GGUF-style) name, e.g. "blk.0.attn_q.weight"
    dtype: str              # one of constants.DTYPES, as stored in the source
    shape: tuple[int, ...]  # rows first; the last dimension is contiguous
    parts: tuple[TensorPart, ...]

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "parts": [p.to_dict() for p in self.parts]}
