"""Validation of an untrusted index, one rule at a time (numbered as in docs/FORMAT.md).

Everything the runtime later trusts (offsets, sizes, names, graph references) is checked
here once, so that no reader code ever indexes the file with an unchecked number.
"""

from __future__ import annotations

from typing import Any

from .constants import ALIGN, CODECS, DTYPES, HEADER_SIZE, MAX_PACK_SIZE, OPS, PACK_KINDS, row_bytes
from .errors import FormatError
from .records import PackRecord, TensorPart, TensorRecord

REQUIRED_KEYS = ("format", "generator", "source", "arch", "hparams", "tokenizer", "tensors", "packs", "graph")
MAX_DIMS = 4
MAX_DIM = 1 << 40


def req(d: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    """Fetch d[key], checking that it exists and has one of `types` (bool is never an int here)."""
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected a map, got {type(d).__name__}")
    if key not in d:
        raise FormatError(f"{where}: missing key {key!r}")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise FormatError(f"{where}.{key}: expected {_names(types)}, got bool")
    if not isinstance(v, types):
        raise FormatError(f"{where}.{key}: expected {_names(types)}, got {type(v).__name__}")
    return v


def _names(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join("nil" if t is type(None) else t.__name__ for t in ts)


def _uint(d: Any, key: str, where: str, limit: int = 1 << 62) -> int:
    v = req(d, key, int, where)
    if v < 0 or v > limit:
        raise FormatError(f"{where}.{key}: {v} out of range [0, {limit}]")
    return v


def validate_index(index: Any, index_offset: int) -> tuple[list[PackRecord], dict[str, TensorRecord]]:
    """Check the whole index against the file layout; returns typed pack and tensor tables."""
    if not isinstance(index, dict):
        raise FormatError(f"index: expected a map, got {type(index).__name__}")
    for key in REQUIRED_KEYS:
        if key not in index:
            raise FormatError(f"index: missing key {key!r}")
    req(index, "hparams", dict, "index")
    req(index, "tokenizer", dict, "index")
    packs = _validate_packs(req(index, "packs", list, "index"), index_offset)
    tensors = _validate_tensors(req(index, "tensors", list, "index"), packs)
    _validate_graph(req(index, "graph", dict, "index"), packs, tensors)
    return packs, tensors


# ---- rule 5-7: packs ----
def _validate_packs(raw: list, index_offset: int) -> list[PackRecord]:
    packs = []
    for i, p in enumerate(raw):
        w = f"packs[{i}]"
        if _uint(p, "id", w) != i:
            raise FormatError(f"{w}.id: {p['id']} differs from its position {i}")
        kind = req(p, "kind", str, w)
        if kind not in PACK_KINDS:
            raise FormatError(f"{w}.kind: unknown {kind!r}; known: {', '.join(PACK_KINDS)}")
        layer = req(p, "layer", (int, type(None)), w)
        codec = req(p, "codec", str, w)
        if codec not in CODECS:
            raise FormatError(f"{w}.codec: unknown {codec!r}; known: {', '.join(CODECS)}")
        offset = _uint(p, "offset", w)
        stored = _uint(p, "stored_size", w, MAX_PACK_SIZE)
        rawsz = _uint(p, "raw_size", w, MAX_PACK_SIZE)
        if offset % ALIGN:
            raise FormatError(f"{w}.offset: {offset} is not a multiple of {ALIGN}")
        if offset < HEADER_SIZE or offset + stored > index_offset:
            raise FormatError(f"{w}: bytes [{offset}, {offset + stored}) lie outside the pack area [{HEADER_SIZE}, {index_offset})")
        if codec == "none" and stored != rawsz:
            raise FormatError(f"{w}: codec none but stored_size {stored} != raw_size {rawsz}")
        params = req(p, "codec_params", dict, w)
        packs.append(PackRecord(i, kind, layer, offset, stored, rawsz, codec, params,
                                _uint(p, "crc32", w, 0xFFFFFFFF), _uint(p, "raw_crc32", w, 0xFFFFFFFF)))
    end = 0
    for p in sorted(packs, key=lambda p: p.offset):
        if p.offset < end:
            raise FormatError(f"packs[{p.id}]: bytes from {p.offset} overlap the previous pack ending at {end}")
        end = p.offset + p.stored_size
    return packs


# ---- rule 8-10: tensors ----
def _validate_tensors(raw: list, packs: list[PackRecord]) -> dict[str, TensorRecord]:
    tensors: dict[str, TensorRecord] = {}
    for i, t in enumerate(raw):
        w = f"tensors[{i}]"
        name = req(t, "name", str, w)
        if name in tensors:
            raise FormatError(f"{w}.name: duplicate tensor {name!r}")
        w = f"tensor {name!r}"
        dtype = req(t, "dtype", str, w)
        if dtype not in DTYPES:
            raise FormatError(f"{w}.dtype: unknown {dtype!r}")
        shape = req(t, "shape", list, w)
        if not 1 <= len(shape) <= MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in shape):
            raise FormatError(f"{w}.shape: {shape!r} is not 1-{MAX_DIMS} positive dimensions")
        try:
            rb = row_bytes(dtype, shape[-1])
        except ValueError as e:
            raise FormatError(f"{w}: {e}") from None
        n_rows = 1
        for d in shape[:-1]:
            n_rows *= d
        parts = []
        next_row = 0
        for j, q in enumerate(req(t, "parts", list, w)):
            pw = f"{w}.parts[{j}]"
            pack = _uint(q, "pack", pw)
            if pack >= len(packs):
                raise FormatError(f"{pw}.pack: {pack} but the archive has {len(packs)} packs")
            off, nb = _uint(q, "offset", pw), _uint(q, "nbytes", pw)
            r0, r1 = _uint(q, "row_start", pw), _uint(q, "row_end", pw)
            if r0 != next_row or r1 <= r0:
                raise FormatError(f"{pw}: rows [{r0}, {r1}) do not continue from row {next_row}")
            if nb != (r1 - r0) * rb:
                raise FormatError(f"{pw}.nbytes: {nb} but rows [{r0}, {r1}) of {dtype} take {(r1 - r0) * rb}")
            if off + nb > packs[pack].raw_size:
                raise FormatError(f"{pw}: bytes [{off}, {off + nb}) exceed pack {pack}'s {packs[pack].raw_size} bytes")
            parts.append(TensorPart(pack, off, nb, r0, r1))
            next_row = r1
        if next_row != n_rows:
            raise FormatError(f"{w}: parts cover {next_row} of {n_rows} rows")
        tensors[name] = TensorRecord(name, dtype, tuple(shape), tuple(parts))
    return tensors


# ---- rule 11-12: access graph ----
def _validate_graph(graph: dict, packs: list[PackRecord], tensors: dict[str, TensorRecord]) -> None:
    steps = req(graph, "steps", list, "graph")
    if not steps:
        raise FormatError("graph.steps: empty")
    for i, s in enumerate(steps):
        w = f"graph.steps[{i}]"
        req(s, "name", str, w)
        for pid in req(s, "packs", list, w):
            if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < len(packs):
                raise FormatError(f"{w}.packs: {pid!r} is not a pack id (the archive has {len(packs)})")
        for j, op in enumerate(req(s, "ops", list, w)):
            ow = f"{w}.ops[{j}]"
            name = req(op, "op", str, ow)
            if name not in OPS:
                raise FormatError(f"{ow}.op: unknown {name!r}; known: {', '.join(OPS)}")
            req(op, "in", list, ow)
            req(op, "out", str, ow)
            req(op, "attrs", dict, ow)
            for tname in req(op, "w", list, ow):
                if tname not in tensors:
                    raise FormatError(f"{ow}.w: tensor {tname!r} is not in the tensor table")
    loop = _uint(graph, "loop_to", "graph")
    if loop >= len(steps):
        raise FormatError(f"graph.loop_to: {loop} but there are {len(steps)} steps")
