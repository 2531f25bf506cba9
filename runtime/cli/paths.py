"""Paths the commands are given, checked before any work: an archive where one is expected, a writable
place for `build -o`. Each problem is one VkpackError (exit 2) naming the path and what to do instead."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ...pack_format.constants import MAGIC
from ...pack_format.errors import VkpackError


def model_source_kind(path: Path) -> str | None:
    """"a GGUF model", "a safetensors file", "a Hugging Face model folder" (what `vkpack build` reads),
    or None; decided from the first bytes, not the name."""
    if path.is_dir():
        return "a Hugging Face model folder" if (path / "config.json").is_file() else None
    if path.name.endswith(".safetensors.index.json"):
        return "a sharded safetensors index"
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"GGUF":
        return "a GGUF model"
    # safetensors: u64 little-endian header size, then the JSON header's "{"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= path.stat().st_size:
        return "a safetensors file"
    return None


def check_archive_path(path: str | Path, command: str) -> None:
    """VkpackError suggesting `vkpack build` when `path` is a model source rather than a `.vkpack`;
    other problems (missing, corrupt) are left to the archive reader's own errors."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                return
    except OSError:
        pass
    kind = model_source_kind(p)
    if kind is not None:
        from ...compiler.build import default_output  # only on this error path: the compiler is heavy

        out = default_output(p)
        raise VkpackError(f"{path} is {kind}, not a .vkpack archive; compile it first: "
                          f"vkpack build {path} -o {out} && vkpack {command} {out}")


def check_build_output(out: Path) -> None:
    """VkpackError before a build starts when `out` cannot become the archive: a folder, or a place
    that cannot be written (the writer creates missing parent folders, so the nearest existing one counts)."""
    if out.is_dir():
        raise VkpackError(f"-o {out}: is a folder; give the archive's file name, e.g. -o {out / 'model.vkpack'}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise VkpackError(f"-o {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VkpackError(f"-o {out}: cannot write in {parent} (permission denied or a read-only file system)")
