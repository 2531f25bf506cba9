"""What every model source yields: tensors as (name, dtype, shape, bytes) plus metadata."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SourceTensor:
    """Where a tensor's bytes lie. They are read with pread into the caller's buffer, not
    through an mmap, so the compiler's resident memory stays a few packs whatever the model."""

    name: str                   # the source's own name (GGUF or HF style)
    dtype: str                  # a pack_format.constants.DTYPES name
    shape: tuple[int, ...]      # rows first (numpy order)
    nbytes: int
    path: Path                  # the file holding the bytes
    offset: int                 # absolute offset of the first byte in `path` (bounds-checked at open)

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows if self.n_rows else 0

    def read(self) -> bytes:
        """All bytes (for small tensors such as rope frequency factors)."""
        buf = bytearray(self.nbytes)
        with FileReader() as r:
            r.read_into(self, 0, self.n_rows, memoryview(buf))
        return bytes(buf)


class FileReader:
    """Keeps one descriptor per source file and reads tensor rows straight into a buffer."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def read_into(self, t: SourceTensor, row_start: int, row_end: int, dest: memoryview) -> None:
        """Rows [row_start, row_end) of `t` into `dest` (thread-safe: pread has no file position)."""
        with self._lock:
            fd = self._fds.get(t.path)
            if fd is None:
                fd = self._fds[t.path] = os.open(t.path, os.O_RDONLY)
        pos = t.offset + row_start * t.row_bytes
        want = (row_end - row_start) * t.row_bytes
        done = 0
        while done < want:
            n = os.preadv(fd, [dest[done:want]], pos + done)
            if n <= 0:
                from ...pack_format.errors import SourceError

                raise SourceError(f"{t.path}: unexpected end of file reading tensor {t.name!r}")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Source:
    format: str                          # "gguf" | "safetensors" | "hf"
    files: list[Path]                    # every file whose bytes went in (for provenance)
    arch_names: list[str]                # GGUF general.architecture or HF config "architectures"
    meta: dict[str, Any]                 # GGUF key/values or HF config.json
    tensors: list[SourceTensor]
    tokenizer: Any                       # compiler.tokenizer.TokenizerInfo
    keepalive: list[Any] = field(default_factory=list)  # mmaps the tensor views point into

    def provenance(self) -> list[dict[str, Any]]:
        """File names, sizes and sha256 digests (hashlib releases the GIL, so this can run in a thread)."""
        out = []
        for p in self.files:
            with open_source_file(p) as f:
                h = hashlib.file_digest(f, "sha256") if hasattr(hashlib, "file_digest") else _sha256(f)
            out.append({"name": p.name, "size": p.stat().st_size, "sha256": h.hexdigest()})
        return out


MAX_JSON_BYTES = 256 << 20  # a config or tokenizer file; real tokenizer.json files are a few tens of MB


def open_source_file(path: Path) -> Any:
    """A source file opened for reading, refused unless it is a regular file (a FIFO would block open())."""
    from ...pack_format.errors import SourceError
    from ...pack_format.reader import open_regular

    return open_regular(Path(path), SourceError)


def load_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file from an untrusted model folder; every failure is one SourceError naming the file
    (bad UTF-8 or syntax, nesting deep enough for RecursionError, an integer of over 4300 digits)."""
    from ...pack_format.errors import SourceError

    with open_source_file(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SourceError(f"{path}: larger than {max_bytes} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SourceError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _sha256(f) -> hashlib._Hash:
    """sha256 of a file through one reused buffer (Python < 3.11 has no hashlib.file_digest)."""
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h
