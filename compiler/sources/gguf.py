"""GGUF v2/v3 input through the `gguf` package, with our own bounds checks on top."""

from __future__ import annotations

import logging
import os
from pathlib import Path


from ...pack_format.constants import DTYPES, tensor_bytes
from ...pack_format.errors import SourceError
from .base import Source, SourceTensor
from .gguf_meta import gguf_metadata

log = logging.getLogger(__name__)
GGUF_MAGIC = b"GGUF"


def open_gguf(path: Path) -> Source:
    """Parse a GGUF file's header and tensor table; tensor bytes stay in the file's mmap."""
    import gguf

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if size == 0:
        raise SourceError(f"{path}: empty file")
    if head[:4] != GGUF_MAGIC:
        raise SourceError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise SourceError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        msg = str(e)
        if "reshape" in msg or "buffer is too small" in msg or "out of bounds" in msg.lower():
            msg = "tensor table or data extends past the end of the file (truncated?)"
        raise SourceError(f"{path}: corrupt GGUF: {msg}") from None
    meta = gguf_metadata(reader)
    tensors = []
    for t in reader.tensors:
        dtype = t.tensor_type.name
        if dtype not in DTYPES:
            raise SourceError(f"{path}: tensor {t.name!r} has type {dtype}, which vkpack does not store")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        nbytes = int(t.n_bytes)
        off = int(t.data_offset)
        if off < 0 or off + nbytes > size:
            raise SourceError(f"{path}: tensor {t.name!r} bytes [{off}, {off + nbytes}) exceed the file size {size}")
        try:
            expected = tensor_bytes(dtype, shape)
        except ValueError as e:
            raise SourceError(f"{path}: tensor {t.name!r}: {e}") from None
        if expected != nbytes:
            raise SourceError(f"{path}: tensor {t.name!r} has {nbytes} bytes, {dtype}{list(shape)} needs {expected}")
        tensors.append(SourceTensor(t.name, dtype, shape, nbytes, Path(path), off))
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise SourceError(f"{path}: GGUF has no general.architecture")
    from ..tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(meta)
    return Source("gguf", [path], [arch], meta, tensors, tok, keepalive=[reader])
