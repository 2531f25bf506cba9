"""Streaming archive writer: header, packs in order, then the index and footer.

The file is written under a temporary name beside the target and renamed only after the
footer is on disk, so an error or Ctrl-C never leaves a partial `.vkpack` behind.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from .constants import ALIGN, FOOTER_MAGIC, FOOTER_STRUCT, FORMAT_MAJOR, FORMAT_MINOR, HEADER_SIZE, HEADER_STRUCT, MAGIC

_ZEROS = bytes(ALIGN)


def pack_index(index: dict[str, Any]) -> bytes:
    """Serialize the index; msgpack keeps dict order, so equal inputs give equal bytes."""
    return msgpack.packb(index, use_bin_type=True, strict_types=False)


class ArchiveWriter:
    """Writes one archive. States: open -> (add_pack)* -> finish | abort.

    Example:
        with ArchiveWriter(path) as w:
            off = w.add_pack(stored_bytes)
            w.finish(index)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._f: BinaryIO | None = os.fdopen(fd, "wb")
        self._pos = 0
        self._finished = False
        self._write(HEADER_STRUCT.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, HEADER_SIZE, ALIGN))

    def _write(self, data: bytes | memoryview) -> None:
        assert self._f is not None, "writer is closed"
        self._f.write(data)
        self._pos += len(data)

    def _pad_to_align(self) -> None:
        pad = -self._pos % ALIGN
        if pad:
            self._write(_ZEROS[:pad])

    def add_pack(self, stored: bytes | memoryview) -> int:
        """Append one pack payload at the next aligned offset; returns that offset."""
        self._pad_to_align()
        offset = self._pos
        self._write(stored)
        return offset

    def finish(self, index: dict[str, Any]) -> Path:
        """Write the index and footer, flush to disk and move the file into place."""
        blob = pack_index(index)
        self._pad_to_align()
        index_offset = self._pos
        self._write(blob)
        self._write(FOOTER_STRUCT.pack(index_offset, len(blob), zlib.crc32(blob), 0, FOOTER_MAGIC))
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(self._f.fileno(), 0o666 & ~umask)  # mkstemp's 0600 would survive the rename
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.path)
        self._finished = True
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if not self._finished:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
