"""Streaming archive writer: header, packs in order, then the index and footer.

The file is written under a temporary name beside the target and renamed only after the
footer is on disk, so an error or Ctrl-C never leaves a partial `.vkpack` behind. The temporary
name is registered before the file exists and removed at interpreter exit if still there, so a
signal that lands between creating the file and entering the `with` block (where no `__exit__`
would run) leaves nothing either.
"""

from __future__ import annotations

import atexit
import os
import secrets
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from .constants import ALIGN, FOOTER_MAGIC, FOOTER_STRUCT, FORMAT_MAJOR, FORMAT_MINOR, HEADER_SIZE, HEADER_STRUCT, MAGIC

_ZEROS = bytes(ALIGN)
_PARTIALS: set[Path] = set()   # temporary files of writers not yet finished or aborted


@atexit.register
def remove_partials() -> None:
    """Delete every registered temporary file (at exit; also callable after an interrupt)."""
    for p in list(_PARTIALS):
        p.unlink(missing_ok=True)
        _PARTIALS.discard(p)


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
        while True:  # the name is registered before the file exists: no moment where it is unknown
            tmp = self.path.parent / f".{self.path.name}.{secrets.token_hex(6)}.partial"
            _PARTIALS.add(tmp)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
                break
            except FileExistsError:
                _PARTIALS.discard(tmp)
        self._tmp = tmp
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

    def finish(self, index: dict[str, Any], validate: bool = True) -> Path:
        """Write the index and footer, flush to disk and move the file into place.

        With `validate` (the default), the index first goes through the reader's own decoding and
        validation (rules 9-23) at the offset it will have, so that a writer never produces a file
        that readers reject: a FormatError then, and no file. Tests that forge hostile archives
        turn it off.
        """
        blob = pack_index(index)
        self._pad_to_align()
        index_offset = self._pos
        if validate:
            from .reader import parse_index

            parse_index(blob, index_offset)
        self._write(blob)
        self._write(FOOTER_STRUCT.pack(index_offset, len(blob), zlib.crc32(blob), 0, FOOTER_MAGIC))
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(self._f.fileno(), 0o666 & ~umask)  # the temporary file's 0600 would survive the rename
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.path)
        _PARTIALS.discard(self._tmp)
        self._finished = True
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if not self._finished:
            self._tmp.unlink(missing_ok=True)
            _PARTIALS.discard(self._tmp)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
