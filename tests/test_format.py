"""Golden bytes, determinism and round trips of a tiny hand-made archive (no compiler involved)."""

from __future__ import annotations

import hashlib
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from vkpack.pack_format import codecs
from vkpack.pack_format.constants import (ALIGN, CODECS, FOOTER_MAGIC, FOOTER_SIZE, FOOTER_STRUCT, FORMAT_MAJOR,
                                          FORMAT_MINOR, HEADER_SIZE, HEADER_STRUCT, MAGIC, TENSOR_ALIGN)
from vkpack.pack_format.errors import FormatError
from vkpack.pack_format.reader import Archive, parse_index
from vkpack.pack_format.writer import ArchiveWriter, pack_index

sys.path.insert(0, str(Path(__file__).resolve().parent / "hostile"))
from tiny_archive import E, V, tensor_data, write_archive

# The tiny archive with codec none for both packs: every byte is fixed by the format and msgpack.
# If this changes on purpose (a format change), bump the version in FORMAT.md and update the digest.
# 1.1 (minor 1 in the header and index, plus graph.activations); tests/test_format_activations.py
# rebuilds the 1.0 bytes and checks them against the 1.0 digest. 1.3: only the minor version changed (with
# FORMAT_MINOR 2 the writer still gives e50e8016...).
GOLDEN_SHA256 = "5d83843a840b4a0248a99a1169487cdb058dbeb6350c2be92a3f05ac7aff0955"
GOLDEN_SIZE = 14051


def _read(path: Path) -> bytes:
    return path.read_bytes()


# ---- golden bytes ----
def test_golden_bytes(tmp_path):
    p = tmp_path / "tiny.vkpack"
    write_archive(p, codecs=("none", "none"))
    data = _read(p)
    assert len(data) == GOLDEN_SIZE
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256


def test_header_and_footer_bytes(tmp_path):
    p = tmp_path / "tiny.vkpack"
    write_archive(p, codecs=("none", "none"))
    data = _read(p)
    # magic "VKPACK\0\1", major 1, minor 3, flags 0, header_size 64, alignment 4096, 40 zero bytes
    assert data[:24] == bytes.fromhex("564b5041434b0001" "0100" "0300" "00000000" "40000000" "00100000")
    assert data[24:HEADER_SIZE] == bytes(40)
    assert HEADER_STRUCT.unpack_from(data, 0) == (MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, HEADER_SIZE, ALIGN)
    assert data[HEADER_SIZE:ALIGN] == bytes(ALIGN - HEADER_SIZE)  # padding before the first pack is zeros
    index_offset, index_size, crc, reserved, magic = FOOTER_STRUCT.unpack_from(data, len(data) - FOOTER_SIZE)
    assert data[-8:] == FOOTER_MAGIC == magic and reserved == 0
    assert index_offset % ALIGN == 0 and index_offset + index_size == len(data) - FOOTER_SIZE
    assert zlib.crc32(data[index_offset:index_offset + index_size]) == crc


# ---- reading back ----
@pytest.mark.parametrize("pack_codecs", [("none", "none"), ("blosc2-zstd", "none"), ("blosc2-lz4", "zfp")])
def test_round_trip(tmp_path, pack_codecs):
    p = tmp_path / "tiny.vkpack"
    index = write_archive(p, codecs=pack_codecs, seed=3)
    data = tensor_data(3)
    with Archive(p) as a:
        assert a.version == (FORMAT_MAJOR, FORMAT_MINOR)
        assert a.index == index  # msgpack keeps every value, including nil and floats
        assert a.verify() == []
        assert [pk.codec for pk in a.packs] == list(pack_codecs)
        for name, arr in data.items():
            t = a.tensors[name]
            assert t.shape == arr.shape
            got = b"".join(bytes(memoryview(a.read_pack(q.pack))[q.offset:q.offset + q.nbytes]) for q in t.parts)
            assert got == arr.tobytes()
        assert a.hparams["vocab"] == V and a.hparams["hidden"] == E
        assert a.graph["access"] == [0, 1, 0]


def test_offsets_aligned_and_tiled(tmp_path):
    p = tmp_path / "tiny.vkpack"
    write_archive(p)
    with Archive(p) as a:
        end = HEADER_SIZE
        for pk in sorted(a.packs, key=lambda pk: pk.offset):
            assert pk.offset % ALIGN == 0
            assert pk.offset == -(-end // ALIGN) * ALIGN  # no gap but padding
            end = pk.offset + pk.stored_size
        assert a.index_offset == -(-end // ALIGN) * ALIGN
        for t in a.tensors.values():
            assert all(q.offset % TENSOR_ALIGN == 0 for q in t.parts)


def test_parse_index_matches_archive(tmp_path):
    p = tmp_path / "tiny.vkpack"
    write_archive(p)
    data = _read(p)
    off, size, _crc, _r, _m = FOOTER_STRUCT.unpack_from(data, len(data) - FOOTER_SIZE)
    index, packs, tensors = parse_index(data[off:off + size], off)
    with Archive(p) as a:
        assert (index, packs, tensors) == (a.index, a.packs, a.tensors)


# ---- determinism ----
@pytest.mark.parametrize("pack_codecs", [("none", "none"), ("blosc2-zstd", "none"), ("blosc2-lz4", "zfp")])
def test_writer_is_deterministic(tmp_path, pack_codecs):
    a, b = tmp_path / "a.vkpack", tmp_path / "b.vkpack"
    write_archive(a, codecs=pack_codecs, seed=7)
    write_archive(b, codecs=pack_codecs, seed=7)
    assert _read(a) == _read(b)


def test_pack_index_is_deterministic():
    index = {"b": [1, 2.5, None, True], "a": {"x": "y"}}
    assert pack_index(index) == pack_index(dict(index))
    assert pack_index(index) != pack_index({"a": index["a"], "b": index["b"]})  # key order is kept, by design


# ---- the temporary file ----
def _leftovers(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_exception_inside_with_removes_temp_file(tmp_path):
    target = tmp_path / "out.vkpack"
    with pytest.raises(RuntimeError, match="boom"), ArchiveWriter(target) as w:
        w.add_pack(b"x" * 5000)
        assert any(n.endswith(".partial") for n in _leftovers(tmp_path))  # written under a temp name
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_removes_temp_file(tmp_path):
    with pytest.raises(KeyboardInterrupt), ArchiveWriter(tmp_path / "out.vkpack") as w:
        w.add_pack(b"y" * 10)
        raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_previous_archive(tmp_path):
    target = tmp_path / "out.vkpack"
    write_archive(target)
    before = _read(target)
    with pytest.raises(TypeError), ArchiveWriter(target) as w:
        w.add_pack(b"z" * 10)
        w.finish({"unserializable": object()})
    assert _read(target) == before
    assert _leftovers(tmp_path) == ["out.vkpack"]


def test_no_partial_leftovers_after_success(tmp_path):
    write_archive(tmp_path / "a.vkpack")
    write_archive(tmp_path / "a.vkpack")  # replacing an existing archive
    assert _leftovers(tmp_path) == ["a.vkpack"]


def test_abort_is_idempotent(tmp_path):
    w = ArchiveWriter(tmp_path / "x.vkpack")
    w.abort()
    w.abort()
    assert _leftovers(tmp_path) == []


# ---- codecs ----
def _random(dtype: str, n: int, rng: np.random.Generator) -> bytes:
    if dtype == "uint8":
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    if dtype == "bf16":
        return (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return rng.standard_normal(n).astype(dtype).tobytes()


_ITEM = {"float16": 2, "bf16": 2, "float32": 4, "uint8": 1}


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "zfp"])
@pytest.mark.parametrize("dtype", ["float16", "bf16", "float32", "uint8"])
@pytest.mark.parametrize("shuffle", ["none", "byte", "bit"])
def test_codec_round_trip(codec, dtype, shuffle):
    rng = np.random.default_rng(zlib.crc32(f"{codec} {dtype} {shuffle}".encode()))
    for n in (0, 1, 37, 4096, 100_003):
        raw = _random(dtype, n, rng)
        params = {"typesize": _ITEM[dtype], "shuffle": shuffle, "clevel": 1}
        stored = codecs.encode(codec, raw, params)
        assert bytes(codecs.decode(codec, stored, len(raw), params)) == raw
        assert codecs.encode(codec, raw, params) == stored  # deterministic


def test_zfp_round_trip_f32_bit_exact():
    rng = np.random.default_rng(11)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38, 1.17e-38], dtype=np.float32)
    for arr in (rng.standard_normal(1).astype(np.float32), rng.standard_normal(1001).astype(np.float32), specials,
                rng.integers(0, 2**32, 5000, dtype=np.uint32).view(np.float32)):  # any bit pattern, NaNs included
        raw = arr.tobytes()
        stored = codecs.encode("zfp", raw, {})
        assert codecs.decode("zfp", stored, len(raw), {}) == raw


def test_zfp_rejects_empty_and_ragged_input():
    for raw in (b"", b"abc"):
        with pytest.raises(ValueError):
            codecs.encode("zfp", raw, {})


def test_codec_none_is_identity_and_checks_size():
    assert bytes(codecs.decode("none", b"abc", 3, {})) == b"abc"
    with pytest.raises(FormatError, match="decoded 3 bytes, pack table says 4"):
        codecs.decode("none", b"abc", 4, {})


def test_unknown_codec():
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.encode("lzma", b"", {})
    with pytest.raises(FormatError, match="unknown codec 'lzma'"):
        codecs.decode("lzma", b"", 0, {})


def test_a_writer_never_entered_leaves_no_partial_file(tmp_path):
    """An interrupt between creating the writer and entering its `with` (no __exit__ runs): the
    temporary file is registered, and removed at exit (remove_partials is the atexit hook)."""
    from vkpack.pack_format import writer

    w = writer.ArchiveWriter(tmp_path / "m.vkpack")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    writer.remove_partials()
    assert list(tmp_path.iterdir()) == []
    w.abort()  # still safe afterwards
