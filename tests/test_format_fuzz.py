"""Fuzzing the reader: whatever the bytes, it either succeeds or raises FormatError (or a subclass).

Bounded for the default test run (a few hundred examples each, about 10 s in all). A crash of
the interpreter (an out-of-bounds read in a decoder) fails the run as loudly as an exception.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vkpack.pack_format import codecs
from vkpack.pack_format.errors import FormatError
from vkpack.pack_format.reader import Archive, parse_index
from vkpack.pack_format.writer import pack_index

sys.path.insert(0, str(Path(__file__).resolve().parent / "hostile"))
from tiny_archive import footer, index_blob, with_index_blob, write_archive

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack's whole value space: nil, bool, ints from -2**63 to 2**64-1, floats (nan too), str, bin, arrays, maps
LEAVES = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=True)
          | st.text(max_size=12) | st.binary(max_size=12)
          | st.sampled_from([0, 1, -1, 2**31, 2**32, 2**62, 2**63, 4096, 256, "F32", "none", "zfp", "rope", "x"]))
MSGPACK = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
                       max_leaves=25)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Any]:
    """A valid archive with one blosc2 and one zfp pack, its bytes, index and index blob."""
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "valid.vkpack"
    index = write_archive(p, codecs=("blosc2-zstd", "zfp"), seed=1)
    data = p.read_bytes()
    blob, off = index_blob(data)
    return {"dir": d, "data": data, "index": index, "blob": blob, "offset": off}


def _parse(blob: bytes, offset: int) -> None:
    try:
        parse_index(blob, offset)
    except FormatError:
        pass


# ---- (a) the index blob ----
@FUZZ
@given(st.data())
def test_index_byte_flips(valid, data):
    blob = bytearray(valid["blob"])
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    _parse(bytes(blob), valid["offset"])


@FUZZ
@given(st.data())
def test_index_truncations_and_splices(valid, data):
    blob = valid["blob"]
    a = data.draw(st.integers(0, len(blob)))
    b = data.draw(st.integers(a, len(blob)))
    _parse(blob[:a], valid["offset"])
    _parse(blob[:a] + blob[b:], valid["offset"])  # a chunk cut out of the middle


@FUZZ
@given(MSGPACK)
def test_index_random_msgpack(value):
    _parse(msgpack.packb(value, use_bin_type=True), 12288)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested maps and arrays."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


BOUNDARY = st.sampled_from([-1, 0, 1, 2**31, 2**32, 2**63, 2**64 - 1, -2**63, True, False, None, 1.5, float("nan"),
                            "", b"", [], {}])


def mutate_index(index: dict[str, Any], data: Any) -> None:
    """Delete, replace, wrap or push to a boundary 1-3 values anywhere in the index (graph weighted double)."""
    for _ in range(data.draw(st.integers(1, 3))):
        section = data.draw(st.sampled_from(["packs", "tensors", "graph", "graph", "hparams", "tokenizer", "format"]))
        path = data.draw(st.sampled_from(_paths(index.get(section), (section,))))
        parent = index
        try:
            for k in path[:-1]:
                parent = parent[k]
            old = parent[path[-1]]
            how = data.draw(st.sampled_from(["delete", "random", "wrap_list", "wrap_map", "boundary"]))
            if how == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif how == "wrap_list":
                parent[path[-1]] = [old]
            elif how == "wrap_map":
                parent[path[-1]] = {"k": old}
            else:
                parent[path[-1]] = data.draw(BOUNDARY if how == "boundary" else MSGPACK)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_index_structured_mutations(valid, data):
    # Edit values anywhere in a valid index: this reaches every rule of the validator.
    index = msgpack.unpackb(valid["blob"], raw=False)
    mutate_index(index, data)
    _parse(pack_index(index), valid["offset"])


# ---- (b) the whole file ----
def _open_everything(path: Path) -> None:
    try:
        with Archive(path) as a:
            a.verify()
            for p in a.packs:
                try:
                    a.read_pack(p.id, verify=False)  # feed damaged bytes to the decoders too
                except FormatError:
                    pass
    except FormatError:
        pass


@FUZZ
@given(st.data())
def test_archive_byte_mutations(valid, data):
    buf = bytearray(valid["data"])
    n = len(buf)
    # aim half the edits at the header, the index and the footer, where a reader parses numbers
    hot = st.one_of(st.integers(0, 63), st.integers(valid["offset"], n - 1), st.integers(0, n - 1))
    for _ in range(data.draw(st.integers(1, 6))):
        buf[data.draw(hot)] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):  # keep the index CRC valid so that validation runs on the edited index
        off, size, _crc = footer(bytes(buf))
        if 0 <= off <= off + size <= n - 32:
            buf[n - 16:n - 12] = zlib.crc32(bytes(buf[off:off + size])).to_bytes(4, "little")
    if data.draw(st.integers(0, 9)) == 0:
        buf = buf[:data.draw(st.integers(0, n))]
    p = valid["dir"] / "mutated.vkpack"
    p.write_bytes(bytes(buf))
    _open_everything(p)


@FUZZ
@given(st.data())
def test_archive_with_mutated_packs_and_forged_crcs(valid, data):
    # Damage pack bytes and fix their crc32 in the index: the decoders then see the garbage.
    buf = bytearray(valid["data"])
    index = msgpack.unpackb(valid["blob"], raw=False)
    for pk in index["packs"]:
        lo, hi = pk["offset"], pk["offset"] + pk["stored_size"]
        for _ in range(data.draw(st.integers(0, 4))):
            buf[data.draw(st.integers(lo, hi - 1))] = data.draw(st.integers(0, 255))
        pk["crc32"] = zlib.crc32(bytes(buf[lo:hi]))
    p = valid["dir"] / "forged.vkpack"
    p.write_bytes(with_index_blob(bytes(buf), pack_index(index)))
    _open_everything(p)


# ---- (c) the decoders on their own ----
@pytest.fixture(scope="module")
def streams() -> dict[str, tuple[bytes, int]]:
    rng = np.random.default_rng(2)
    raw = rng.standard_normal(3000).astype(np.float32).tobytes()
    params = {"typesize": 4, "shuffle": "byte", "clevel": 1}
    return {c: (codecs.encode(c, raw, params if c != "zfp" else {}), len(raw))
            for c in ("blosc2-zstd", "blosc2-lz4", "zfp")}


@FUZZ
@given(st.sampled_from(["blosc2-zstd", "blosc2-lz4", "zfp"]), st.data())
def test_decoders_on_damaged_streams(streams, codec, data):
    stored, raw_size = streams[codec]
    buf = bytearray(stored)
    for _ in range(data.draw(st.integers(0, 6))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    size = data.draw(st.sampled_from([raw_size, raw_size - 4, raw_size + 4, 0, 4, 1 << 20]))
    try:
        out = codecs.decode(codec, bytes(buf[:cut]), size, {})
        assert len(out) == size
    except FormatError:
        pass
