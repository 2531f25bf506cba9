"""Memory-mapped archive reader for untrusted files.

Only the header, footer and index are parsed at open; pack bytes are slices of the mmap,
read (and checksummed, and decoded) when a caller asks for them.
"""

from __future__ import annotations

import mmap
import os
import stat
import zlib
from functools import cached_property
from pathlib import Path
from typing import Any

import msgpack

from . import codecs
from .constants import (ALIGN, FOOTER_MAGIC, FOOTER_SIZE, FOOTER_STRUCT, FORMAT_MAJOR, HEADER_SIZE, HEADER_STRUCT,
                        MAGIC, MAX_INDEX_SIZE)
from .errors import ChecksumError, FormatError
from .records import PackRecord, TensorRecord
from .shapes import activation_widths
from .validate import validate_index


# Arrays and map entries in one index (rule 9). The byte cap alone lets 256 MiB of one-byte empty
# arrays become 256M Python lists (over 10 GB); a real index holds a few per tensor part, graph op
# and pack (SmolLM2: about 20k), so 4M leaves room for models a hundred times larger.
MAX_INDEX_ITEMS = 1 << 22


class _ItemBudget:
    """msgpack hooks counting every array element and map entry as its container is built."""

    def __init__(self, limit: int):
        self.left = limit

    def spend(self, n: int) -> None:
        self.left -= n + 1
        if self.left < 0:
            raise ValueError(f"more than {MAX_INDEX_ITEMS} arrays, map entries and array elements")

    def on_list(self, items: list) -> list:
        self.spend(len(items))
        return items

    def on_map(self, d: dict) -> dict:
        self.spend(len(d))
        return d


def parse_index(blob: bytes, index_offset: int) -> tuple[dict[str, Any], list[PackRecord], dict[str, TensorRecord]]:
    """Decode (rule 9) and validate (rules 10-23) an index blob; every failure is a FormatError."""
    budget = _ItemBudget(MAX_INDEX_ITEMS)
    try:
        # one container is at most MAX_INDEX_ITEMS long, so at most that much is built before a hook refuses
        index = msgpack.unpackb(blob, raw=False, strict_map_key=True, list_hook=budget.on_list,
                                object_hook=budget.on_map, max_array_len=MAX_INDEX_ITEMS, max_map_len=MAX_INDEX_ITEMS)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData, RecursionError) as e:
        raise FormatError(f"index is not valid msgpack: {type(e).__name__}: {e}") from None
    packs, tensors = validate_index(index, index_offset)
    return index, packs, tensors


def open_regular(path: Path, error: type[Exception] = FormatError) -> Any:
    """`open(path, "rb")`, refusing anything but a regular file before it can block: a FIFO's open()
    waits for a writer forever, and a device or socket is no archive. O_NONBLOCK only guards the open."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{path}: cannot open: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{path}: cannot open: not a regular file")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class Archive:
    """An open `.vkpack` file. Example: `with Archive(p) as a: a.read_pack(0)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open_regular(self.path)  # held until close()
        try:
            self.size = os.fstat(self._file.fileno()).st_size
            if self.size < HEADER_SIZE + FOOTER_SIZE:
                raise FormatError(f"{self.path}: {self.size} bytes is smaller than a header and footer "
                                  f"({HEADER_SIZE + FOOTER_SIZE}); not a vkpack archive")
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:  # rules 1-8 of docs/FORMAT.md (rule 1 is in __init__)
        magic, major, minor, _flags, header_size, align = HEADER_STRUCT.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise FormatError(f"{self.path}: not a vkpack archive (magic {magic[:8]!r}, expected {MAGIC!r})")
        if major != FORMAT_MAJOR:
            raise FormatError(f"{self.path}: format version {major}.{minor}, this reader reads {FORMAT_MAJOR}.x")
        if header_size != HEADER_SIZE:
            raise FormatError(f"{self.path}: header_size {header_size}, expected {HEADER_SIZE}")
        if align != ALIGN:
            raise FormatError(f"{self.path}: header alignment {align}, expected {ALIGN}")
        self.version = (major, minor)
        index_offset, index_size, crc, _res, fmagic = FOOTER_STRUCT.unpack_from(self._mm, self.size - FOOTER_SIZE)
        if fmagic != FOOTER_MAGIC:
            raise FormatError(f"{self.path}: footer magic missing (file truncated or not finished)")
        if index_size > MAX_INDEX_SIZE:
            raise FormatError(f"{self.path}: index_size {index_size} exceeds the cap {MAX_INDEX_SIZE}")
        if index_offset < HEADER_SIZE:
            raise FormatError(f"{self.path}: index_offset {index_offset} lies inside the header")
        if index_offset + index_size != self.size - FOOTER_SIZE:
            raise FormatError(f"{self.path}: index [{index_offset}, +{index_size}) does not end at the footer "
                              f"(file size {self.size})")
        blob = self._mm[index_offset:index_offset + index_size]
        if zlib.crc32(blob) != crc:
            raise FormatError(f"{self.path}: index checksum mismatch (crc32 {zlib.crc32(blob):08x}, footer says {crc:08x})")
        self.index_offset = index_offset
        self.index, self.packs, self.tensors = parse_index(blob, index_offset)

    # ---- metadata ----
    @property
    def hparams(self) -> dict[str, Any]:
        return self.index["hparams"]

    @property
    def graph(self) -> dict[str, Any]:
        return self.index["graph"]

    @cached_property
    def activation_widths(self) -> dict[str, int]:
        """Activation name -> width (float32 columns) of every op output, for sizing buffers.

        The graph's `activations` map (format 1.1, validated at open) or, for 1.0 archives, the
        same widths inferred from the graph (pack_format/shapes.py; FormatError where its widths disagree).
        """
        if "activations" in self.graph:
            return dict(self.graph["activations"])
        return activation_widths(self.graph, self.tensors)

    @property
    def tokenizer(self) -> dict[str, Any]:
        return self.index["tokenizer"]

    @property
    def arch(self) -> str:
        return self.index["arch"]

    # ---- pack bytes ----
    def stored_bytes(self, pack_id: int) -> memoryview:
        """The pack's bytes as stored (a zero-copy slice of the mmap; bounds were validated at open)."""
        p = self.packs[pack_id]
        return memoryview(self._mm)[p.offset:p.offset + p.stored_size]

    def drop_pages(self, pack_id: int) -> None:
        """Unmap the pack's pages from this process (MADV_DONTNEED; they stay in the page cache and
        fault back in on the next read): a pack loaded elsewhere should not also count in our RSS."""
        p = self.packs[pack_id]
        if hasattr(mmap, "MADV_DONTNEED") and p.stored_size and p.offset % mmap.PAGESIZE == 0:
            self._mm.madvise(mmap.MADV_DONTNEED, p.offset, p.stored_size)

    def pack_span(self, pack_id: int) -> tuple[int, int]:
        """(absolute file offset, stored size) of a pack's bytes, for reading them with `fileno()`
        (bounds were validated at open)."""
        p = self.packs[pack_id]
        return p.offset, p.stored_size

    def fileno(self) -> int:
        """The open archive's file descriptor (for os.preadv; reads at explicit offsets are thread-safe)."""
        return self._file.fileno()

    def read_pack(self, pack_id: int, verify: bool = True) -> bytes | memoryview:
        """Decoded pack bytes (rules 24-26); with `verify`, a checksum mismatch raises ChecksumError naming the pack."""
        p = self.packs[pack_id]
        stored = self.stored_bytes(pack_id)
        if verify:
            self.check_stored(pack_id, stored)
        try:
            raw = codecs.decode(p.codec, stored, p.raw_size, p.codec_params)
        except FormatError as e:
            raise ChecksumError(pack_id, f"pack {pack_id}: {e}") from None
        if verify and p.codec != "none" and zlib.crc32(raw) != p.raw_crc32:
            raise ChecksumError(pack_id, f"pack {pack_id}: decoded bytes fail their crc32")
        return raw

    def check_stored(self, pack_id: int, stored: bytes | memoryview) -> None:
        """Raise ChecksumError naming the pack unless `stored` (its bytes as stored, read from anywhere)
        matches the pack's crc32 (rule 24)."""
        p = self.packs[pack_id]
        crc = zlib.crc32(stored)
        if crc != p.crc32:
            raise ChecksumError(pack_id, f"pack {pack_id} ({p.kind}{'' if p.layer is None else f' layer {p.layer}'}) "
                                         f"is corrupt: crc32 {crc:08x}, index says {p.crc32:08x}")

    def verify(self) -> list[tuple[int, str]]:
        """Check every pack; returns (pack id, reason) for each bad one."""
        bad = []
        for p in self.packs:
            try:
                self.read_pack(p.id, verify=True)
            except ChecksumError as e:
                bad.append((p.id, str(e)))
        return bad

    def close(self) -> None:
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view of a pack; the mapping goes with it
                pass
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pread_into(fd: int, out: Any, offset: int) -> None:
    """Fill writable buffer `out` from file `fd` at `offset` (os.preadv drops the GIL and touches no
    mmap pages); FormatError when the file ends first (truncated since it was opened)."""
    mv = memoryview(out).cast("B")
    got, n = 0, len(mv)
    while got < n:
        if hasattr(os, "preadv"):
            k = os.preadv(fd, [mv[got:]], offset + got)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, n - got, offset + got)
            k = len(data)
            mv[got:got + k] = data
        if k == 0:
            raise FormatError(f"file ends at {offset + got}: {n - got} of {n} bytes not read")
        got += k
