"""safetensors input: a single file, a sharded set with its index, or a Hugging Face folder.

The header is parsed here (8-byte length + JSON) so every offset is checked against the
file before any tensor is touched; tensor bytes are read later with pread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


from ...pack_format.constants import tensor_bytes
from ...pack_format.errors import SourceError
from .base import Source, SourceTensor, load_json, open_source_file

MAX_HEADER = 100 << 20
ST_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}
INDEX_NAME = "model.safetensors.index.json"


def read_safetensors(path: Path) -> list[SourceTensor]:
    """Tensors of one safetensors file, with every offset checked against the file size."""
    with open_source_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SourceError(f"{path}: {size} bytes is too small for a safetensors file")
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER or 8 + n > size:
            raise SourceError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # bad UTF-8 or syntax, deep nesting, a 4300-digit integer
            raise SourceError(f"{path}: header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: header is not a JSON object")
    base = 8 + n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = _entry(path, name, info)
        start, end = offsets
        if dtype not in ST_DTYPES:
            raise SourceError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(ST_DTYPES)}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end and base + end <= size):
            raise SourceError(f"{path}: tensor {name!r} bytes [{start}, {end}) exceed the data area of {size - base} bytes")
        shape_t = tuple(shape) if shape else (1,)
        if any(d <= 0 for d in shape_t):
            raise SourceError(f"{path}: tensor {name!r} has an empty or negative shape {shape}")
        if tensor_bytes(ST_DTYPES[dtype], shape_t) != end - start:
            raise SourceError(f"{path}: tensor {name!r} {dtype}{shape} needs {tensor_bytes(ST_DTYPES[dtype], shape_t)} bytes, header gives {end - start}")
        tensors.append(SourceTensor(name, ST_DTYPES[dtype], shape_t, end - start, Path(path), base + start))
    tensors.sort(key=lambda t: t.name)
    return tensors


def _entry(path: Path, name: str, info: Any) -> tuple[str, list[int], tuple[int, int]]:
    """(dtype, shape, (start, end)) of one header entry, each of the type the format states."""
    def is_uint(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict):
        raise SourceError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise SourceError(f"{path}: tensor {name!r}: dtype {dtype!r:.60} is not a string")
    if not isinstance(shape, list) or len(shape) > 8 or not all(is_uint(d) for d in shape):
        raise SourceError(f"{path}: tensor {name!r}: shape {shape!r:.60} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_uint(o) for o in offsets)):
        raise SourceError(f"{path}: tensor {name!r}: data_offsets {offsets!r:.60} is not [start, end]")
    return dtype, shape, (offsets[0], offsets[1])


def open_hf(path: Path) -> Source:
    """A folder (config.json + weights + tokenizer), a single .safetensors, or an index json."""
    path = Path(path)
    if path.is_dir():
        folder = path
        shard_index = folder / INDEX_NAME
        if shard_index.exists():
            weight_files = _shards(shard_index)
        else:
            weight_files = sorted(folder.glob("*.safetensors"))
            if not weight_files:
                raise SourceError(f"{folder}: no *.safetensors weights in the folder")
        fmt = "hf"
    elif path.name.endswith(".index.json"):
        folder, weight_files, fmt = path.parent, _shards(path), "safetensors"
    else:
        folder, weight_files, fmt = path.parent, [path], "safetensors"
    config_path = folder / "config.json"
    if not config_path.exists():
        raise SourceError(f"{path}: no config.json beside the weights (needed for the architecture)")
    config = load_json(config_path)
    if not isinstance(config, dict):
        raise SourceError(f"{config_path}: not a JSON object")
    tensors: list[SourceTensor] = []
    seen: set[str] = set()
    for wf in weight_files:
        ts = read_safetensors(wf)
        for t in ts:
            if t.name in seen:
                raise SourceError(f"{wf}: tensor {t.name!r} appears in more than one shard")
            seen.add(t.name)
        tensors += ts
    from ..tokenizer import tokenizer_from_hf_folder

    tok = tokenizer_from_hf_folder(folder)
    files = [config_path, *weight_files] + [folder / n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).exists()]
    arch_names = config.get("architectures") or [config.get("model_type", "?")]
    if not isinstance(arch_names, list) or not all(isinstance(a, str) for a in arch_names):
        raise SourceError(f"{config_path}: 'architectures' must be a list of strings, got {arch_names!r:.60}")
    return Source(fmt, files, list(arch_names), config, tensors, tok)


def _shards(index_path: Path) -> list[Path]:
    index = load_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{index_path}: not a valid safetensors index ('weight_map' must map names to file names)")
    shards = []
    for name in sorted(set(weight_map.values())):
        p = index_path.parent / name
        if Path(name).name != name:
            raise SourceError(f"{index_path}: shard name {name!r} is not a plain file name")
        if not p.exists():
            raise SourceError(f"{index_path}: shard {name} is missing")
        shards.append(p)
    return shards
