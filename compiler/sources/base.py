"""What every model source yields: tensors as (name, dtype, shape, bytes) plus metadata."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SourceTensor:
    name: str                   # the source's own name (GGUF or HF style)
    dtype: str                  # a pack_format.constants.DTYPES name
    shape: tuple[int, ...]      # rows first (numpy order)
    nbytes: int
    read: Callable[[], memoryview] = field(repr=False, compare=False)  # zero-copy view of the bytes


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
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            out.append({"name": p.name, "size": p.stat().st_size, "sha256": h.hexdigest()})
        return out
