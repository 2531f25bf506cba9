"""Model readers: the only code in vkpack that parses GGUF or safetensors."""

from __future__ import annotations

from pathlib import Path

from ...pack_format.constants import NOT_WEIGHT_DTYPES, WEIGHT_DTYPES
from ...pack_format.errors import SourceError
from .base import Source, SourceTensor


def open_source(path: str | Path) -> Source:
    """Open a GGUF file, a safetensors file or index, or a Hugging Face model folder; refused at once if a
    tensor is stored in a type no backend computes with."""
    source = _open(Path(path))
    for t in source.tensors:
        if t.dtype in NOT_WEIGHT_DTYPES:
            raise SourceError(f"{path}: tensor {t.name!r} is stored as {t.dtype}, which no vkpack backend computes "
                              f"with; supported: {', '.join(WEIGHT_DTYPES)}")
    return source


def _open(p: Path) -> Source:
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    if p.is_dir() or p.name.endswith((".safetensors", ".index.json")):
        from .safetensors import open_hf

        return open_hf(p)
    from .gguf import open_gguf

    if p.suffix == ".gguf":
        return open_gguf(p)
    from .base import open_source_file

    with open_source_file(p) as f:
        head = f.read(4)
    if head == b"GGUF":
        return open_gguf(p)
    raise SourceError(f"{p}: unrecognized input (expected a .gguf file, a .safetensors file, "
                      "a model.safetensors.index.json, or a Hugging Face model folder)")


__all__ = ["Source", "SourceTensor", "open_source"]
