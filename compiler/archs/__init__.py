"""Registry of model families: one small file each, looked up by HF or GGUF architecture name."""

from __future__ import annotations

import importlib
from typing import Any

from ...pack_format.errors import ArchNotSupported

_FAMILIES: list[Any] = []
_MODULES = ("llama", "qwen2", "qwen3", "gemma", "olmo2", "granite", "phi3", "mixtral", "qwen_moe", "olmoe")


def register(cls: type) -> type:
    _FAMILIES.append(cls())
    return cls


def supported() -> list[str]:
    _load()
    return sorted({n for f in _FAMILIES for n in (*f.hf_architectures, *f.gguf_architectures)})


def family_for(source: Any) -> Any:
    """The family of a source, or ArchNotSupported naming what is supported."""
    _load()
    for name in source.arch_names:
        for fam in _FAMILIES:
            names = fam.gguf_architectures if source.format == "gguf" else fam.hf_architectures
            if name in names:
                return fam
    raise ArchNotSupported(f"architecture {', '.join(map(str, source.arch_names))} is not supported; "
                           f"supported: {', '.join(supported())}")


def _load() -> None:
    """Import every family module (each registers on its first import; a module imported directly
    before, as tools do, must not hide the others)."""
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")
