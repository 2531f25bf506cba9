"""Model readers: the only code in vkpack that parses GGUF or safetensors."""

from __future__ import annotations

from pathlib import Path

from ...pack_format.errors import SourceError
from .base import Source, SourceTensor


def open_source(path: str | Path) -> Source:
    """Open a GGUF file, a safetensors file or index, or a Hugging Face model folder."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder")
    if p.is_dir() or p.name.endswith((".safetensors", ".index.json")):
        from .safetensors import open_hf

        return open_hf(p)
    from .gguf import open_gguf

    if p.suffix == ".gguf":
        return open_gguf(p)
    with open(p, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return open_gguf(p)
    raise SourceError(f"{p}: unrecognized input (expected a .gguf file, a .safetensors file, "
                      "a model.safetensors.index.json, or a Hugging Face model folder)")


__all__ = ["Source", "SourceTensor", "open_source"]
