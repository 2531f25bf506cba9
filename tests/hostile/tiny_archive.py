"""A tiny valid archive built by hand, without the compiler, and helpers that break it on purpose.

Two tensors in two packs: `token_embd.weight` F16 [16, 64] in an `embed` pack and
`output_norm.weight` F32 [64] in a `head` pack. The graph embeds, runs one weightless
attention step (rope, attention, add), then a tied head, so it exercises every kind of
graph reference the validator checks, and states its activation widths (format 1.1).

Used by tests/test_format*.py (imported through sys.path, since tests/ is not a package).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vkpack.pack_format import codecs as pack_codecs
from vkpack.pack_format.constants import FOOTER_MAGIC, FOOTER_SIZE, FOOTER_STRUCT, FORMAT_MAJOR, FORMAT_MINOR
from vkpack.pack_format.writer import ArchiveWriter, pack_index

V, E = 16, 64  # vocab rows and hidden width of the tiny model

BLOSC_PARAMS = {"typesize": 2, "shuffle": "byte", "clevel": 1}


def tensor_data(seed: int | None = None) -> dict[str, np.ndarray]:
    """The two tensors' values: plain arithmetic (stable for golden bytes) or random for a seed."""
    if seed is None:
        i = np.arange(V * E).reshape(V, E)
        return {"token_embd.weight": ((i * 37 % 101 - 50) / 32).astype(np.float16),
                "output_norm.weight": (1 + np.arange(E) / 64).astype(np.float32)}
    rng = np.random.default_rng(seed)
    return {"token_embd.weight": rng.standard_normal((V, E)).astype(np.float16),
            "output_norm.weight": (1 + 0.1 * rng.standard_normal(E)).astype(np.float32)}


def op(name: str, ins: list[str], out: str, w: list[str] | None = None, **attrs: Any) -> dict[str, Any]:
    return {"op": name, "in": ins, "out": out, "w": w or [], "attrs": attrs}


def make_index(packs: list[dict[str, Any]]) -> dict[str, Any]:
    """A valid index around the given pack records (pack 0: embedding rows, pack 1: the norm)."""
    rope = {"n_heads": 1, "head_dim": E, "rope_dim": E, "theta": 10000.0, "mode": "neox", "freq_factors": None}
    return {
        "format": [FORMAT_MAJOR, FORMAT_MINOR],
        "generator": "tests/hostile/tiny_archive.py",
        "source": {"format": "gguf", "files": [{"name": "tiny.gguf", "size": 1234, "sha256": "00" * 32}]},
        "arch": "llama",
        "hparams": {"n_layers": 1, "hidden": E, "n_heads": 1, "n_kv_heads": 1, "head_dim": E, "ffn": 2 * E,
                    "vocab": V, "context": 32, "rope_theta": 10000.0, "rope_dim": E, "rope_scaling": None,
                    "norm_eps": 1e-5, "rope_mode": "neox", "qkv_bias": False, "qk_norm": False, "act": "silu"},
        "tokenizer": {"json": "{}", "bos_id": 1, "eos_id": 2, "eos_ids": [2], "pad_id": None, "unk_id": 0,
                      "add_bos": True, "chat_template": None},
        "tensors": [
            {"name": "token_embd.weight", "dtype": "F16", "shape": [V, E],
             "parts": [{"pack": 0, "offset": 0, "nbytes": V * E * 2, "row_start": 0, "row_end": V}]},
            {"name": "output_norm.weight", "dtype": "F32", "shape": [E],
             "parts": [{"pack": 1, "offset": 0, "nbytes": E * 4, "row_start": 0, "row_end": 1}]},
        ],
        "packs": packs,
        "graph": {
            "steps": [
                {"name": "embed", "kind": "embed", "layer": None, "gather": True, "packs": [0],
                 "ops": [op("embed", ["tokens"], "x", ["token_embd.weight"])]},
                {"name": "blk.0.attn", "kind": "attn", "layer": 0, "gather": False, "packs": [],
                 "ops": [op("rope", ["x"], "q", **rope), op("rope", ["x"], "k", **rope),
                         op("attention", ["q", "k", "x"], "o", layer=0, n_heads=1, n_kv_heads=1, head_dim=E,
                            scale=E ** -0.5),
                         op("add", ["x", "o"], "x")]},
                {"name": "head", "kind": "head", "layer": None, "gather": False, "packs": [1, 0],
                 "ops": [op("last_token", ["x"], "x"),
                         op("rms_norm", ["x"], "h", ["output_norm.weight"], eps=1e-5),
                         op("linear", ["h"], "logits", ["token_embd.weight"])]},
            ],
            "loop_to": 0, "inputs": ["tokens", "positions"], "outputs": ["logits"],
            "kv_cache": {"n_layers": 1, "n_kv_heads": 1, "head_dim": E}, "access": [0, 1, 0],
            "activations": {"x": E, "q": E, "k": E, "o": E, "h": E, "logits": V},
        },
    }


def write_archive(path: str | Path, *, codecs: tuple[str, str] = ("blosc2-zstd", "none"), seed: int | None = None,
                  mutate: Callable[[dict[str, Any]], Any] | None = None,
                  tamper: Callable[[int, bytes], bytes] | None = None, extra_pack_after: int | None = None) -> dict[str, Any]:
    """Write the tiny archive at `path` and return its index.

    mutate(index) edits the index (or returns a replacement) before it is written.
    tamper(pack_id, stored) -> bytes replaces a pack's stored bytes, and the index's crc32 then
    describes the tampered bytes (a forged pack that passes rule 24).
    extra_pack_after=i writes an unlisted pack after pack i (a hole in the pack area).
    """
    data = tensor_data(seed)
    raws = [data["token_embd.weight"].tobytes(), data["output_norm.weight"].tobytes()]
    kinds = ["embed", "head"]
    records = []
    with ArchiveWriter(path) as w:
        for i, (raw, codec) in enumerate(zip(raws, codecs)):
            params = dict(BLOSC_PARAMS) if codec.startswith("blosc2") else {}
            stored = pack_codecs.encode(codec, raw, params)
            if tamper is not None:
                stored = tamper(i, stored)
            records.append({"id": i, "kind": kinds[i], "layer": None, "offset": w.add_pack(stored),
                            "stored_size": len(stored), "raw_size": len(raw), "codec": codec, "codec_params": params,
                            "crc32": zlib.crc32(stored), "raw_crc32": zlib.crc32(raw)})
            if extra_pack_after == i:
                w.add_pack(b"\x00" * 100)
        index = make_index(records)
        if mutate is not None:
            index = mutate(index) or index
        w.finish(index, validate=False)  # hostile variants are written on purpose
    return index


def footer(data: bytes) -> tuple[int, int, int]:
    """(index_offset, index_size, crc) of an archive's bytes."""
    off, size, crc, _res, _magic = FOOTER_STRUCT.unpack_from(data, len(data) - FOOTER_SIZE)
    return off, size, crc


def index_blob(data: bytes) -> tuple[bytes, int]:
    """The index bytes of an archive and their offset."""
    off, size, _crc = footer(data)
    return data[off:off + size], off


def with_index_blob(data: bytes, blob: bytes) -> bytes:
    """The archive's packs with `blob` as the index, and a footer whose size and CRC match it."""
    off, _size, _crc = footer(data)
    return data[:off] + blob + FOOTER_STRUCT.pack(off, len(blob), zlib.crc32(blob), 0, FOOTER_MAGIC)


def with_index(data: bytes, index: Any) -> bytes:
    return with_index_blob(data, pack_index(index))
