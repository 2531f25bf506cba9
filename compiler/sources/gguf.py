"""GGUF v2/v3 input: the header through our own bounds-checked parser, tensors as file ranges."""

from __future__ import annotations

import logging
import os
from pathlib import Path


from ...pack_format.constants import tensor_bytes
from ...pack_format.errors import SourceError
from .base import Source, SourceTensor
from .gguf_header import read_gguf_header

log = logging.getLogger(__name__)


def open_gguf(path: Path) -> Source:
    """Parse a GGUF file's header and tensor table; tensor bytes are read later, with pread."""
    size = os.path.getsize(path)
    header = read_gguf_header(path)
    meta = header.meta
    tensors = []
    for t in header.tensors:
        try:
            nbytes = tensor_bytes(t.dtype, t.shape)
        except ValueError as e:
            raise SourceError(f"{path}: tensor {t.name!r}: {e}") from None
        if any(d <= 0 for d in t.shape):
            raise SourceError(f"{path}: tensor {t.name!r} has an empty dimension {list(t.shape)}")
        if t.offset + nbytes > size:
            raise SourceError(f"{path}: tensor {t.name!r} bytes [{t.offset}, {t.offset + nbytes}) extend past the end "
                              f"of the file ({size} bytes; truncated?)")
        if (t.offset - header.data_start) % header.alignment:
            raise SourceError(f"{path}: tensor {t.name!r} data offset {t.offset - header.data_start} is not a multiple "
                              f"of the alignment {header.alignment}")
        tensors.append(SourceTensor(t.name, t.dtype, t.shape, nbytes, Path(path), t.offset))
    _check_no_overlap(path, tensors)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise SourceError(f"{path}: GGUF has no general.architecture")
    from ..tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(meta)
    return Source("gguf", [path], [arch], meta, tensors, tok)


def _check_no_overlap(path: Path, tensors: list[SourceTensor]) -> None:
    """Two tensors sharing bytes would build and run on garbage (llama.cpp refuses them too)."""
    end, last = 0, None
    for t in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        if t.offset < end:
            raise SourceError(f"{path}: tensor {t.name!r} bytes [{t.offset}, {t.offset + t.nbytes}) overlap tensor "
                              f"{last!r}, which ends at {end}")
        end, last = t.offset + t.nbytes, t.name
