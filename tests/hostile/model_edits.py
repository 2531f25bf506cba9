"""Writers of hostile model inputs for tests: a small valid GGUF or HF folder, then one edit.

GGUF files are re-serialized from our header reader's view (tools/fuzz_hostile.gguf_bytes), so a
test states its edit as plain Python values: `gguf_with(src, dst, meta={...}, infos=fn)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import make_synthetic as ms
from fuzz_hostile import gguf_bytes

from vkpack.compiler.sources.gguf_header import read_gguf_header
from vkpack.pack_format.constants import GGML_TYPE_IDS

SPEC = ms.Spec(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=384)

Info = tuple[str, int, list[int], int]  # name, ggml type id, ne (GGUF order), offset from the data start


def tiny_gguf(path: Path) -> Path:
    return ms.write_gguf(path, SPEC, dtype="F16", seed=0)


def tiny_hf(folder: Path) -> Path:
    return ms.write_hf(folder, SPEC, dtype="F16", seed=0)


def gguf_with(src: Path, dst: Path, meta: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
              infos: Callable[[list[Info]], list[Info]] | None = None, data: Callable[[bytes], bytes] | None = None) -> Path:
    """`src` rewritten with metadata keys set (`meta`) or removed (`drop`), its tensor infos and data edited."""
    h = read_gguf_header(src)
    m = {k: v for k, v in h.meta.items() if k not in drop} | (meta or {})
    table = [(t.name, GGML_TYPE_IDS[t.dtype], list(reversed(t.shape)), t.offset - h.data_start) for t in h.tensors]
    body = src.read_bytes()[h.data_start:]
    dst.write_bytes(gguf_bytes(m, infos(table) if infos else table, data(body) if data else body, h.alignment))
    return dst


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Apply `edit` to a JSON file's value (it may return a replacement)."""
    v = json.loads(path.read_text())
    out = edit(v)
    path.write_text(json.dumps(v if out is None else out))
