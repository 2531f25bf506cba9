"""Hostile archives: each breaks one rule of docs/FORMAT.md §5 and must raise FormatError naming it.

The archives are generated here from the tiny hand-made archive (tests/hostile/tiny_archive.py),
so every case is one readable edit of a valid file.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from vkpack.pack_format import codecs
from vkpack.pack_format.constants import FOOTER_SIZE, FOOTER_STRUCT, MAX_INDEX_SIZE, MAX_PACK_SIZE
from vkpack.pack_format.errors import ChecksumError, FormatError
from vkpack.pack_format.reader import Archive
from vkpack.pack_format.validate import REQUIRED_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parent / "hostile"))
from tiny_archive import footer, index_blob, with_index, with_index_blob, write_archive


@pytest.fixture
def tiny(tmp_path) -> bytes:
    """Bytes of the valid tiny archive: pack 0 (blosc2-zstd) at 4096, pack 1 (none) at 8192, index at 12288."""
    p = tmp_path / "valid.vkpack"
    write_archive(p)
    data = p.read_bytes()
    assert footer(data)[0] == 12288
    return data


def _open(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "hostile.vkpack"
    p.write_bytes(data)
    with Archive(p):
        pass


def _reject(tmp_path: Path, data: bytes, match: str) -> FormatError:
    with pytest.raises(FormatError, match=match) as e:
        _open(tmp_path, data)
    return e.value


# ---- rules 1-8: header, footer, index placement ----
def _patch(data: bytes, offset: int, fmt: str, *values: Any) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, *values)
    return bytes(b)


def _footer_patch(data: bytes, **fields: int) -> bytes:
    off, size, crc, res, magic = FOOTER_STRUCT.unpack_from(data, len(data) - FOOTER_SIZE)
    vals = {"off": off, "size": size, "crc": crc} | fields
    return data[:-FOOTER_SIZE] + FOOTER_STRUCT.pack(vals["off"], vals["size"], vals["crc"], res, magic)


FILE_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty file": (lambda d: b"", "0 bytes is smaller than a header and footer"),
    "95 bytes": (lambda d: d[:95], "95 bytes is smaller than a header and footer"),
    "wrong magic": (lambda d: b"GGUF\x03\x00\x00\x00" + d[8:], "not a vkpack archive"),
    "zeroed file": (lambda d: bytes(len(d)), "not a vkpack archive"),
    "wrong major": (lambda d: _patch(d, 8, "<H", 2), r"format version 2\.\d+, this reader reads 1\.x"),
    "major 65535": (lambda d: _patch(d, 8, "<H", 0xFFFF), "format version 65535"),
    "wrong header_size": (lambda d: _patch(d, 16, "<I", 128), "header_size 128, expected 64"),
    "wrong alignment": (lambda d: _patch(d, 20, "<I", 512), "header alignment 512, expected 4096"),
    "cut inside the header": (lambda d: d[:40], "smaller than a header and footer"),
    "cut inside pack 0": (lambda d: d[:4096 + 100], "footer magic missing"),
    "cut inside pack 1": (lambda d: d[:8192 + 10], "footer magic missing"),
    "cut inside the index": (lambda d: d[:12288 + 50], "footer magic missing"),
    "cut inside the footer": (lambda d: d[:-10], "footer magic missing"),
    "cut inside a pack, footer kept": (lambda d: d[:5000] + d[-FOOTER_SIZE:], "does not end at the footer"),
    "bytes appended": (lambda d: d + b"\x00" * 10, "footer magic missing"),
    "footer magic wrong": (lambda d: d[:-8] + b"VKPKEND\x01", "footer magic missing"),
    "index_offset past the end": (lambda d: _footer_patch(d, off=len(d) * 4), "does not end at the footer"),
    "index_offset 2**64-1": (lambda d: _footer_patch(d, off=2**64 - 1), "does not end at the footer"),
    "index_offset 0": (lambda d: _footer_patch(d, off=0), "index_offset 0 lies inside the header"),
    "index_offset inside the header": (lambda d: _footer_patch(d, off=10, size=len(d) - 42),
                                       "index_offset 10 lies inside the header"),
    "index_size too small": (lambda d: _footer_patch(d, size=5), "does not end at the footer"),
    "index_size over the cap": (lambda d: _footer_patch(d, size=MAX_INDEX_SIZE + 1), "exceeds the cap"),
    "index_size 2**64-1": (lambda d: _footer_patch(d, size=2**64 - 1), "exceeds the cap"),
    "index crc wrong": (lambda d: _footer_patch(d, crc=footer(d)[2] ^ 1), "index checksum mismatch"),
    "index byte flipped": (lambda d: _patch(d, 12288 + 7, "<B", d[12288 + 7] ^ 0x40), "index checksum mismatch"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_file_level(tmp_path, tiny, case):
    edit, match = FILE_CASES[case]
    _reject(tmp_path, edit(tiny), match)


def test_missing_and_unreadable_paths(tmp_path):
    with pytest.raises(FormatError, match="cannot open"):
        Archive(tmp_path / "nope.vkpack")
    with pytest.raises(FormatError, match="cannot open"):
        Archive(tmp_path)  # a directory


def test_flags_and_reserved_bytes_are_ignored(tmp_path, tiny):
    data = _patch(tiny, 12, "<I", 0xFFFFFFFF)
    data = data[:24] + b"\xff" * 40 + data[64:]
    data = data[:-12] + b"\xff\xff\xff\xff" + data[-8:]  # footer reserved u32
    _open(tmp_path, data)


# ---- rule 9: msgpack ----
BLOB_CASES = {
    "empty index": (b"", "not valid msgpack"),
    "reserved byte 0xc1": (b"\xc1", "not valid msgpack"),
    "random bytes": (bytes(range(200, 256)) * 3, "not valid msgpack"),
    "truncated map": (msgpack.packb({"format": [1, 0], "packs": list(range(100))})[:-20], "not valid msgpack"),
    "trailing bytes": (msgpack.packb({"a": 1}) + b"\x00", "not valid msgpack"),
    "int map keys": (msgpack.packb({1: 2}), "not valid msgpack"),
    "nested too deep": (b"\x91" * 100_000 + b"\x00", "not valid msgpack"),
    "array claims 2**32-1 items": (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),
    "str claims 2**32-1 bytes": (b"\xdb\xff\xff\xff\xff" + b"a" * 10, "not valid msgpack"),
    "invalid utf-8 str": (b"\xa2\xff\xfe", "not valid msgpack"),
    "not a map": (msgpack.packb([1, 2, 3]), "index: expected a map, got list"),
    "nil": (msgpack.packb(None), "index: expected a map, got NoneType"),
}


@pytest.mark.parametrize("case", list(BLOB_CASES))
def test_index_not_msgpack_or_not_a_map(tmp_path, tiny, case):
    blob, match = BLOB_CASES[case]
    _reject(tmp_path, with_index_blob(tiny, blob), match)


# ---- rules 10-23: the index ----
def _get_index(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(index_blob(data)[0], raw=False)


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def edit(index: dict) -> None:
        d = index
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


def _del(path: tuple) -> Callable[[dict], None]:
    def edit(index: dict) -> None:
        d = index
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return edit


def _seq(*edits: Callable[[dict], None]) -> Callable[[dict], None]:
    def edit(index: dict) -> None:
        for e in edits:
            e(index)
    return edit


P0, P1 = ("packs", 0), ("packs", 1)
T0, T1 = ("tensors", 0), ("tensors", 1)
S0, S1, S2 = ("graph", "steps", 0), ("graph", "steps", 1), ("graph", "steps", 2)
ROPE, ATTN, NORM, LINEAR = S1 + ("ops", 0), S1 + ("ops", 2), S2 + ("ops", 1), S2 + ("ops", 2)
ACTS = ("graph", "activations")

INDEX_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    # rule 10: top level
    "format major 2": (_set(("format",), [2, 0]), "index.format: major version 2"),
    "format as str": (_set(("format",), "1.0"), r"index\.format: expected list, got str"),
    "format too short": (_set(("format",), [1]), r"is not \[major, minor\]"),
    "format negative": (_set(("format",), [1, -1]), r"is not \[major, minor\]"),
    "generator not str": (_set(("generator",), 5), r"index\.generator: expected str, got int"),
    "arch nil": (_set(("arch",), None), r"index\.arch: expected str, got NoneType"),
    "source files entry lacks sha256": (_del(("source", "files", 0, "sha256")), "missing key 'sha256'"),
    "source file size negative": (_set(("source", "files", 0, "size"), -1), r"size: -1 out of range"),
    # rule 11: hparams
    "hparams not a map": (_set(("hparams",), [1]), r"index\.hparams: expected dict, got list"),
    "hparams lacks n_heads": (_del(("hparams", "n_heads")), "hparams: missing key 'n_heads'"),
    "hparams bool for int": (_set(("hparams", "n_layers"), True), r"hparams\.n_layers: expected int, got bool"),
    "hparams negative": (_set(("hparams", "hidden"), -1), r"hparams\.hidden: -1 out of range"),
    "hparams zero heads": (_set(("hparams", "n_heads"), 0), r"hparams\.n_heads: 0 out of range"),
    "hparams 2**63": (_set(("hparams", "vocab"), 2**63), r"hparams\.vocab: 9223372036854775808 out of range"),
    "hparams rope_mode": (_set(("hparams", "rope_mode"), "yarn"), "hparams.rope_mode: unknown 'yarn'"),
    "hparams heads not grouped": (_seq(_set(("hparams", "n_heads"), 3), _set(("hparams", "n_kv_heads"), 2)),
                                  "n_heads 3 is not a multiple of n_kv_heads 2"),
    "hparams theta zero": (_set(("hparams", "rope_theta"), 0.0), r"rope_theta: 0\.0 must be a finite number >"),
    "hparams eps nan": (_set(("hparams", "norm_eps"), float("nan")), r"norm_eps: nan must be a finite number"),
    "hparams eps inf": (_set(("hparams", "norm_eps"), float("inf")), r"norm_eps: inf must be a finite number"),
    "hparams rope_scaling list": (_set(("hparams", "rope_scaling"), [1]), r"rope_scaling: expected dict or nil"),
    # rule 12: tokenizer
    "tokenizer lacks json": (_del(("tokenizer", "json")), "tokenizer: missing key 'json'"),
    "tokenizer json bytes": (_set(("tokenizer", "json"), b"{}"), r"tokenizer\.json: expected str, got bytes"),
    "tokenizer bos negative": (_set(("tokenizer", "bos_id"), -1), r"tokenizer\.bos_id: -1 out of range"),
    "tokenizer eos_ids strs": (_set(("tokenizer", "eos_ids"), ["a"]), "tokenizer.eos_ids: .* is not a list of token ids"),
    "tokenizer add_bos int": (_set(("tokenizer", "add_bos"), 1), r"tokenizer\.add_bos: expected bool, got int"),
    # rule 13: pack records
    "packs not a list": (_set(("packs",), {}), r"index\.packs: expected list, got dict"),
    "pack not a map": (_set(P0, 5), r"packs\[0\]: expected a map, got int"),
    "pack id mismatch": (_set(P1 + ("id",), 0), r"packs\[1\]\.id: 0 differs from its position 1"),
    "pack kind unknown": (_set(P0 + ("kind",), "moe"), r"packs\[0\]\.kind: unknown 'moe'"),
    "pack layer negative": (_set(P0 + ("layer",), -1), r"packs\[0\]\.layer: -1 out of range"),
    "pack layer str": (_set(P0 + ("layer",), "0"), r"packs\[0\]\.layer: expected int or nil, got str"),
    "pack codec unknown": (_set(P0 + ("codec",), "lzma"), r"packs\[0\]\.codec: unknown 'lzma'"),
    "pack codec_params missing": (_del(P0 + ("codec_params",)), r"packs\[0\]: missing key 'codec_params'"),
    "pack stored_size bool": (_set(P1 + ("stored_size",), True), r"packs\[1\]\.stored_size: expected int, got bool"),
    "pack stored_size negative": (_set(P1 + ("stored_size",), -256), r"stored_size: -256 out of range"),
    "pack raw_size over MAX_PACK_SIZE": (_set(P0 + ("raw_size",), MAX_PACK_SIZE + 1), r"raw_size: 2147483649 out of range"),
    "pack offset 2**63": (_set(P0 + ("offset",), 2**63), r"packs\[0\]\.offset: 9223372036854775808 out of range"),
    "pack offset 2**64-1": (_set(P0 + ("offset",), 2**64 - 1), r"offset: 18446744073709551615 out of range"),
    "pack offset float": (_set(P0 + ("offset",), 4096.0), r"offset: expected int, got float"),
    "pack crc32 2**32": (_set(P0 + ("crc32",), 2**32), r"crc32: 4294967296 out of range"),
    "pack crc32 negative": (_set(P0 + ("crc32",), -1), r"crc32: -1 out of range"),
    "codec none but sizes differ": (_set(P1 + ("raw_size",), 512), r"packs\[1\]: codec none but stored_size 256"),
    "codec none but crcs differ": (_set(P1 + ("raw_crc32",), 7), r"packs\[1\]: codec none but"),
    # rule 14: pack placement
    "pack offset not aligned": (_set(P0 + ("offset",), 4097), r"packs\[0\]\.offset: 4097 is not a multiple of 4096"),
    "pack offset 0 (in the header)": (_set(P0 + ("offset",), 0), r"packs\[0\]: bytes \[0, .*outside the pack area"),
    "pack past the index": (_set(P1 + ("offset",), 12288),
                            r"packs\[1\]: bytes \[12288, 12544\) lie outside the pack area \[64, 12288\)"),
    "pack runs into the index": (_set(P1 + ("stored_size",), 5000), r"packs\[1\]: bytes \[8192, 13192\) lie outside"),
    # rule 15: tiling
    "packs overlap": (_set(P1 + ("offset",), 4096), r"packs\[\d\]: bytes from 4096 overlap the previous pack ending at"),
    # rule 16: tensor records
    "tensors not a list": (_set(("tensors",), None), r"index\.tensors: expected list, got NoneType"),
    "tensor name int": (_set(T0 + ("name",), 5), r"tensors\[0\]\.name: expected str, got int"),
    "tensor name duplicate": (_set(T1 + ("name",), "token_embd.weight"), "duplicate tensor 'token_embd.weight'"),
    "tensor dtype unknown": (_set(T0 + ("dtype",), "Q9_9"), r"tensor 'token_embd.weight'\.dtype: unknown 'Q9_9'"),
    "tensor shape zero": (_set(T0 + ("shape",), [16, 0]), r"shape: \[16, 0\] is not 1-4 positive dimensions"),
    "tensor shape negative": (_set(T0 + ("shape",), [-16, 64]), "is not 1-4 positive dimensions"),
    "tensor shape bool": (_set(T0 + ("shape",), [True, 64]), "is not 1-4 positive dimensions"),
    "tensor shape 2**63": (_set(T0 + ("shape",), [2**63, 64]), "is not 1-4 positive dimensions"),
    "tensor shape 5 dims": (_set(T0 + ("shape",), [1, 1, 1, 16, 64]), "is not 1-4 positive dimensions"),
    "tensor shape empty": (_set(T0 + ("shape",), []), "is not 1-4 positive dimensions"),
    "tensor shape str": (_set(T0 + ("shape",), "16x64"), r"shape: expected list, got str"),
    "tensor row not whole blocks": (_seq(_set(T0 + ("dtype",), "Q8_0"), _set(T0 + ("shape",), [16, 48])),
                                    "row of 48 elements is not a multiple of the block size 32"),
    # rule 17: parts
    "part pack out of range": (_set(T0 + ("parts", 0, "pack"), 2), r"parts\[0\]\.pack: 2 but the archive has 2 packs"),
    "part pack negative": (_set(T0 + ("parts", 0, "pack"), -1), r"parts\[0\]\.pack: -1 out of range"),
    "part pack bool": (_set(T0 + ("parts", 0, "pack"), False), r"parts\[0\]\.pack: expected int, got bool"),
    "part rows do not start at 0": (_set(T0 + ("parts", 0, "row_start"), 1), r"rows \[1, 16\) do not continue from row 0"),
    "part rows empty": (_set(T0 + ("parts", 0, "row_end"), 0), r"rows \[0, 0\) do not continue"),
    "part rows not covering the shape": (_set(T0 + ("shape",), [32, 64]), "parts cover 16 of 32 rows"),
    "part nbytes wrong": (_set(T0 + ("parts", 0, "nbytes"), 2047), r"nbytes: 2047 but rows \[0, 16\) of F16 take 2048"),
    "part offset not aligned": (_set(T0 + ("parts", 0, "offset"), 4), r"parts\[0\]\.offset: 4 is not a multiple of 256"),
    "part past its pack's raw size": (_set(T1 + ("parts", 0, "offset"), 256),
                                      r"bytes \[256, 512\) exceed pack 1's 256 bytes"),
    "no parts": (_set(T0 + ("parts",), []), "parts cover 0 of 16 rows"),
    # rule 18: parts overlap inside a pack
    "parts overlap": (_set(T1 + ("parts", 0, "pack"), 0),
                      "pack 0: tensor 'token_embd.weight' at .* overlaps tensor 'output_norm.weight'"),
    # rule 19: graph structure
    "graph not a map": (_set(("graph",), []), r"index\.graph: expected dict, got list"),
    "no steps": (_set(("graph", "steps"), []), "graph.steps: empty"),
    "step not a map": (_set(S0, "embed"), r"graph\.steps\[0\]: expected a map, got str"),
    "step lacks name": (_del(S0 + ("name",)), r"graph\.steps\[0\]: missing key 'name'"),
    "step kind unknown": (_set(S0 + ("kind",), "moe"), r"graph\.steps\[0\]\.kind: unknown 'moe'"),
    "step gather int": (_set(S0 + ("gather",), 1), r"graph\.steps\[0\]\.gather: expected bool, got int"),
    "step layer negative": (_set(S1 + ("layer",), -3), r"graph\.steps\[1\]\.layer: -3 out of range"),
    "step pack id out of range": (_set(S0 + ("packs",), [2]), r"graph\.steps\[0\]\.packs: 2 is not a pack id"),
    "step pack id negative": (_set(S0 + ("packs",), [-1]), r"packs: -1 is not a pack id"),
    "step pack id bool": (_set(S0 + ("packs",), [True]), r"packs: True is not a pack id"),
    "step pack id 2**63": (_set(S0 + ("packs",), [2**63]), r"packs: 9223372036854775808 is not a pack id"),
    "inputs unknown": (_set(("graph", "inputs"), ["tokens", "mask"]), r"graph\.inputs: 'mask' is not one of"),
    "inputs not strs": (_set(("graph", "inputs"), [["tokens"]]), r"graph\.inputs: \['tokens'\] is not one of"),
    "kv_cache missing": (_del(("graph", "kv_cache")), "graph: missing key 'kv_cache'"),
    "kv_cache heads zero": (_set(("graph", "kv_cache", "n_kv_heads"), 0), r"kv_cache\.n_kv_heads: 0 out of range"),
    "kv_cache layers beyond the attention ops": (_set(("graph", "kv_cache", "n_layers"), 2),
                                                 r"kv_cache\.n_layers: 2 but the graph has 1 attention ops"),
    "outputs not produced": (_set(("graph", "outputs"), ["nope"]), r"graph\.outputs: \['nope'\] must name values"),
    "outputs empty": (_set(("graph", "outputs"), []), r"graph\.outputs: \[\] must name values"),
    "access differs": (_set(("graph", "access"), [0, 1]), "graph.access: differs from the steps' packs"),
    "loop_to out of range": (_set(("graph", "loop_to"), 3), "graph.loop_to: 3 but there are 3 steps"),
    "loop_to 2**63": (_set(("graph", "loop_to"), 2**63), r"graph\.loop_to: 9223372036854775808 out of range"),
    "loop_to bool": (_set(("graph", "loop_to"), False), r"graph\.loop_to: expected int, got bool"),
    # rule 20: ops
    "op unknown": (_set(S0 + ("ops", 0, "op"), "gelu"), r"graph\.steps\[0\]\.ops\[0\]\.op: unknown 'gelu'"),
    "op not a map": (_set(S0 + ("ops", 0), ["embed"]), r"ops\[0\]: expected a map, got list"),
    "op in arity": (_set(S0 + ("ops", 0, "in"), []), r"ops\[0\]\.in: embed takes 1 activation names, got \[\]"),
    "op in not str": (_set(S0 + ("ops", 0, "in"), [5]), r"ops\[0\]\.in: embed takes 1 activation names, got \[5\]"),
    "op out not str": (_set(S0 + ("ops", 0, "out"), 5), r"ops\[0\]\.out: expected str, got int"),
    "op w arity": (_set(LINEAR + ("w",), ["token_embd.weight"] * 3), r"ops\[2\]\.w: linear takes 1-2 weights, got 3"),
    "op w missing weight": (_set(S0 + ("ops", 0, "w"), []), r"ops\[0\]\.w: embed takes 1 weights, got 0"),
    "op w unknown tensor": (_set(S0 + ("ops", 0, "w"), ["blk.9.attn_q.weight"]),
                            r"ops\[0\]\.w: tensor 'blk\.9\.attn_q\.weight' is not in the tensor table"),
    "op w list (unhashable)": (_set(S0 + ("ops", 0, "w"), [[1]]), r"tensor \[1\] is not in the tensor table"),
    "op w map (unhashable)": (_set(S0 + ("ops", 0, "w"), [{"a": 1}]), "is not in the tensor table"),
    "op attrs not a map": (_set(S0 + ("ops", 0, "attrs"), []), r"ops\[0\]\.attrs: expected dict, got list"),
    "rope mode unknown": (_set(ROPE + ("attrs", "mode"), "yarn"), "unknown rope mode 'yarn'"),
    "rope dim odd": (_set(ROPE + ("attrs", "rope_dim"), 63), "rope_dim: 63 must be even"),
    "rope dim over head_dim": (_set(ROPE + ("attrs", "rope_dim"), 66), "at most head_dim 64"),
    "rope theta negative": (_set(ROPE + ("attrs", "theta"), -1.0), r"theta: -1\.0 must be a finite number > 0"),
    "rope freq_factors length": (_set(ROPE + ("attrs", "freq_factors"), [1.0]), "freq_factors: expected nil or 32"),
    "rope freq_factors zero": (_set(ROPE + ("attrs", "freq_factors"), [0.0] * 32), "freq_factors: expected nil or 32"),
    "rope heads bool": (_set(ROPE + ("attrs", "n_heads"), True), r"n_heads: expected int, got bool"),
    "attention layer out of range": (_set(ATTN + ("attrs", "layer"), 1), "layer: 1 but graph.kv_cache has 1 layers"),
    "attention layer 2**63": (_set(ATTN + ("attrs", "layer"), 2**63), "layer: 9223372036854775808 out of range"),
    "attention kv heads differ": (_set(ATTN + ("attrs", "n_kv_heads"), 2), "differ from graph.kv_cache"),
    "attention scale missing": (_del(ATTN + ("attrs", "scale")), "missing key 'scale'"),
    "rms_norm eps negative": (_set(NORM + ("attrs", "eps"), -1e-5), "eps: -1e-05 must be a finite number >= 0"),
    "rms_norm group zero": (_set(NORM + ("attrs", "group"), 0), r"group: 0 out of range"),
    # rule 21: dataflow
    "op reads an undefined name": (_set(S1 + ("ops", 3, "in"), ["x", "z"]),
                                   "'z' is neither a graph input nor the output of an earlier op"),
    "op reads a later output": (_set(ROPE + ("in",), ["o"]), "'o' is neither a graph input"),
    # rule 22: step packs cover the weights
    "step packs miss a weight's pack": (_seq(_set(S2 + ("packs",), [1]), _set(("graph", "access"), [0, 1])),
                                        (r"tensor 'token_embd\.weight' has rows in pack 0, "
                                         r"which is not in the step's packs \[1\]")),
    # rule 23: activation widths (optional map, 1.1)
    "activations not a map": (_set(ACTS, [64]), r"graph\.activations: expected dict, got list"),
    "activations wrong width": (_set(ACTS + ("q",), 32),
                                r"graph\.activations\['q'\]: 32, but the graph makes it 64 wide"),
    "activations missing name": (_del(ACTS + ("logits",)),
                                 r"graph\.activations: missing 'logits', which an op writes \(16 wide\)"),
    "activations extra name": (_set(ACTS + ("z",), 4), r"graph\.activations\['z'\]: no op writes it"),
    "activations width float": (_set(ACTS + ("x",), 64.0), r"graph\.activations\['x'\]: 64\.0 is not a width"),
    "activations width str": (_set(ACTS + ("x",), "64"), r"graph\.activations\['x'\]: '64' is not a width"),
    "activations width bool": (_set(ACTS + ("x",), True), r"graph\.activations\['x'\]: True is not a width"),
    "activations width zero": (_set(ACTS + ("x",), 0), r"graph\.activations\['x'\]: 0 is not a width"),
    "activations width nil": (_set(ACTS + ("x",), None), r"graph\.activations\['x'\]: None is not a width"),
    "activations width 2**63": (_set(ACTS + ("x",), 2**63), r"\['x'\]: 9223372036854775808 is not a width"),
    "activations bytes key": (_set(ACTS + (b"x",), 64), r"graph\.activations: key b'x' is not a str"),
    "activations over disagreeing widths": (
        lambda index: index["graph"]["steps"][2]["ops"].append({"op": "add", "in": ["h", "logits"], "out": "y",
                                                                 "w": [], "attrs": {}}),
        r"graph\.steps\[2\] 'head' ops\[3\] \(add\): inputs 'h' and 'logits' widths: 64 != 16"),
    "activations over a norm group mismatch": (_set(NORM + ("attrs", "group"), 32),
                                               r"\(rms_norm\): weight 'output_norm\.weight' length vs group: 64 != 32"),
    "activations over a graph input": (_set(ROPE + ("in",), ["positions"]),
                                       "input 'positions' is a graph input .integers., not a float activation"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_index_rule(tmp_path, tiny, case):
    edit, match = INDEX_CASES[case]
    index = _get_index(tiny)
    edit(index)
    _reject(tmp_path, with_index(tiny, index), match)


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_index_missing_key(tmp_path, tiny, key):
    index = _get_index(tiny)
    del index[key]
    _reject(tmp_path, with_index(tiny, index), f"index: missing key '{key}'")


def test_unknown_keys_are_ignored(tmp_path, tiny):
    index = _get_index(tiny)
    index["x_future"] = {"anything": [1, 2]}
    index["graph"]["steps"][1]["ops"][0]["attrs"]["x_new_attr"] = 1
    index["packs"][0]["x_note"] = "ignored"
    _open(tmp_path, with_index(tiny, index))


def test_hole_between_packs(tmp_path):
    p = tmp_path / "hole.vkpack"
    write_archive(p, extra_pack_after=0)  # an unlisted pack at 8192 pushes pack 1 to 12288
    with pytest.raises(FormatError, match=r"packs\[1\]: starts at 12288, but the bytes before it end at \d+: a hole"):
        Archive(p)


def test_bytes_after_the_last_pack(tmp_path):
    p = tmp_path / "tail.vkpack"
    write_archive(p, extra_pack_after=1)
    with pytest.raises(FormatError, match=r"index starts at 16384, but the last pack ends at 8448: 7936 bytes belong to no pack"):
        Archive(p)


# ---- rules 24-26: pack bytes ----
def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


@pytest.mark.parametrize("pack_id,where", [(0, 0.0), (0, 0.5), (0, 1.0), (1, 0.0), (1, 1.0)])
def test_flipped_byte_in_a_pack(tmp_path, tiny, pack_id, where):
    pk = _get_index(tiny)["packs"][pack_id]
    p = tmp_path / "flip.vkpack"
    p.write_bytes(_flip(tiny, pk["offset"] + int(where * (pk["stored_size"] - 1))))
    with Archive(p) as a:  # opening never reads pack bytes
        kind = a.packs[pack_id].kind
        with pytest.raises(ChecksumError, match=rf"pack {pack_id} \({kind}\) is corrupt: crc32 [0-9a-f]{{8}}, index says") as e:
            a.read_pack(pack_id)
        assert e.value.pack_id == pack_id
        bad = a.verify()
        assert [b for b, _ in bad] == [pack_id]
        assert f"pack {pack_id}" in bad[0][1]
        other = 1 - pack_id
        assert a.read_pack(other) is not None  # the other pack is intact
        try:  # without verification garbage may come back, but only FormatError may be raised
            a.read_pack(pack_id, verify=False)
        except FormatError:
            pass


def test_padding_is_not_checksummed(tmp_path, tiny):
    p = tmp_path / "pad.vkpack"
    p.write_bytes(_flip(tiny, 8192 + 300))  # after pack 1's 256 bytes, before the index
    with Archive(p) as a:
        assert a.verify() == []


def _forged(tmp_path: Path, **kw: Any) -> Path:
    p = tmp_path / "forged.vkpack"
    write_archive(p, **kw)
    return p


def _expect_bad_pack(p: Path, pack_id: int, match: str) -> None:
    with Archive(p) as a:
        with pytest.raises(ChecksumError, match=match) as e:
            a.read_pack(pack_id)
        assert e.value.pack_id == pack_id
        assert [b for b, _ in a.verify()] == [pack_id]


def test_forged_blosc2_garbage(tmp_path):
    rng = np.random.default_rng(5)
    p = _forged(tmp_path, tamper=lambda i, s: rng.integers(0, 256, len(s), dtype=np.uint8).tobytes() if i == 0 else s)
    _expect_bad_pack(p, 0, "pack 0: blosc2")


def test_forged_blosc2_truncated_chunk(tmp_path):
    p = _forged(tmp_path, tamper=lambda i, s: s[:-7] if i == 0 else s)
    _expect_bad_pack(p, 0, r"pack 0: blosc2 chunk is \d+ bytes long, but the pack stores \d+")


def test_forged_blosc2_tiny_chunk(tmp_path):
    p = _forged(tmp_path, tamper=lambda i, s: s[:5] if i == 0 else s)
    _expect_bad_pack(p, 0, "pack 0: blosc2 header unreadable")


def test_blosc2_size_disagrees_with_pack_table(tmp_path):
    p = _forged(tmp_path, mutate=_set(P0 + ("raw_size",), 4096))
    _expect_bad_pack(p, 0, "blosc2 chunk holds 2048 bytes, pack table says 4096")


def test_decoded_crc_mismatch(tmp_path):
    p = _forged(tmp_path, mutate=_set(P0 + ("raw_crc32",), 12345))
    _expect_bad_pack(p, 0, "pack 0: decoded bytes fail their crc32")


@pytest.mark.parametrize("cut", [0, 5, 12, 20, 40])
def test_forged_zfp_truncated(tmp_path, cut):
    p = _forged(tmp_path, codecs=("none", "zfp"), tamper=lambda i, s: s[:cut] if i == 1 else s)
    _expect_bad_pack(p, 1, "pack 1: ")


def test_zfp_truncated_large_stream_does_not_crash():
    # Before the padded decode, this crashed the process: zfp read far past the 28-byte buffer.
    n = 4_000_000
    head = codecs.encode("zfp", np.zeros(n, dtype=np.float32).tobytes(), {})[:12]
    stream = head + b"\xff" * 16
    try:
        out = codecs.decode("zfp", stream, 4 * n, {})
        assert len(out) == 4 * n
    except FormatError:
        pass


def test_zfp_header_must_match_the_pack():
    import zfpy

    raw = np.arange(100, dtype=np.float32).tobytes()
    stored = codecs.encode("zfp", raw, {})
    with pytest.raises(FormatError, match=r"zfp header describes reversible float32 \[100, 0, 0, 0\]; .* \[101, 0, 0, 0\]"):
        codecs.decode("zfp", stored, len(raw) + 4, {})
    with pytest.raises(FormatError, match="not a positive number of float32 values"):
        codecs.decode("zfp", stored, 401, {})
    lossy = zfpy.compress_numpy(np.arange(100, dtype=np.float32), rate=8)
    with pytest.raises(FormatError, match="zfp header describes rate"):
        codecs.decode("zfp", lossy, len(raw), {})
    two_d = zfpy.compress_numpy(np.arange(100, dtype=np.float32).reshape(10, 10))
    with pytest.raises(FormatError, match=r"\[10, 10, 0, 0\]"):
        codecs.decode("zfp", two_d, len(raw), {})
    f64 = zfpy.compress_numpy(np.arange(50, dtype=np.float64))
    with pytest.raises(FormatError, match="float64"):
        codecs.decode("zfp", f64, len(raw), {})


def test_close_while_a_pack_view_is_alive(tmp_path, tiny):
    # read_pack hands out zero-copy views of the map; closing the archive must not raise.
    p = tmp_path / "v.vkpack"
    p.write_bytes(tiny)
    a = Archive(p)
    view = a.read_pack(1)
    a.close()
    assert len(view) == 256
