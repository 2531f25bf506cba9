"""Validation of an untrusted index, one rule at a time (numbered as in docs/FORMAT.md).

Everything the runtime later trusts (offsets, sizes, names, graph references) is checked
here once, so that no reader code ever indexes the file with an unchecked number.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

from .constants import (ALIGN, CODECS, DTYPES, FORMAT_MAJOR, HEADER_SIZE, MAX_PACK_SIZE, MOE_ROUTERS, OPS, PACK_KINDS,
                        ROPE_MODES, TENSOR_ALIGN, align_up, row_bytes)
from .errors import FormatError
from .records import PackRecord, TensorPart, TensorRecord
from .shapes import activation_widths

REQUIRED_KEYS = ("format", "generator", "source", "arch", "hparams", "tokenizer", "tensors", "packs", "graph")
MAX_DIMS = 4
MAX_DIM = 1 << 40
NIL = type(None)

# Normalized hyperparameters (rule 11): key -> accepted msgpack types. "float" keys accept ints too.
HPARAM_TYPES: dict[str, tuple[type, ...]] = {
    "n_layers": (int,), "hidden": (int,), "n_heads": (int,), "n_kv_heads": (int,), "head_dim": (int,),
    "ffn": (int,), "vocab": (int,), "context": (int,), "rope_theta": (int, float), "rope_dim": (int,),
    "rope_scaling": (dict, NIL), "norm_eps": (int, float), "rope_mode": (str,), "qkv_bias": (bool,),
    "qk_norm": (bool,), "act": (str,),
}
# The tokenizer map (rule 12): key -> accepted types; every id is a non-negative int.
TOKENIZER_TYPES: dict[str, tuple[type, ...]] = {
    "json": (str,), "bos_id": (int, NIL), "eos_id": (int, NIL), "eos_ids": (list,), "pad_id": (int, NIL),
    "unk_id": (int, NIL), "add_bos": (bool,), "chat_template": (str, NIL),
}
# Names the runtime binds before the first step (rule 19): token ids and their positions, both [T].
GRAPH_INPUTS = ("tokens", "positions")
# op -> (number of `in` names, fewest weights, most weights) (rule 20).
OP_ARITY: dict[str, tuple[int, int, int]] = {
    "embed": (1, 1, 1), "rms_norm": (1, 1, 1), "linear": (1, 1, 2), "rope": (1, 0, 0),
    "attention": (3, 0, 0), "add": (2, 0, 0), "swiglu": (2, 0, 0), "last_token": (1, 0, 0),
    "geglu": (2, 0, 0), "scale": (1, 0, 0), "softcap": (1, 0, 0), "moe": (1, 1, 5),
}
MOE_WEIGHT_COUNTS = (1, 4, 5)   # router; + shared gate, up, down; + the shared expert's gate


# ---- typed field access ----
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
    return " or ".join("nil" if t is NIL else t.__name__ for t in ts)


def _uint(d: Any, key: str, where: str, limit: int = 1 << 62, low: int = 0) -> int:
    v = req(d, key, int, where)
    if v < low or v > limit:
        raise FormatError(f"{where}.{key}: {v} out of range [{low}, {limit}]")
    return v


def _pos(d: Any, key: str, where: str) -> int:
    """A count or a dimension: 1 .. MAX_DIM."""
    return _uint(d, key, where, MAX_DIM, 1)


def _num(d: Any, key: str, where: str, low: float = -math.inf, strict: bool = False) -> float:
    """A finite int or float (never bool) >= low, or > low with `strict`."""
    v = req(d, key, (int, float), where)
    if not math.isfinite(v) or v < low or (strict and v == low):
        raise FormatError(f"{where}.{key}: {v!r} must be a finite number {'>' if strict else '>='} {low}")
    return v


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 62


def validate_index(index: Any, index_offset: int) -> tuple[list[PackRecord], dict[str, TensorRecord]]:
    """Check the whole index against the file layout; returns typed pack and tensor tables."""
    if not isinstance(index, dict):
        raise FormatError(f"index: expected a map, got {type(index).__name__}")
    for key in REQUIRED_KEYS:
        if key not in index:
            raise FormatError(f"index: missing key {key!r}")
    _validate_meta(index)
    packs = _validate_packs(req(index, "packs", list, "index"), index_offset)
    tensors = _validate_tensors(req(index, "tensors", list, "index"), packs)
    graph = req(index, "graph", dict, "index")
    _validate_graph(graph, packs, tensors)
    if "activations" in graph:  # optional since 1.1
        _validate_activations(graph, tensors)
    return packs, tensors


# ---- rules 10-12: top-level keys, hparams, tokenizer ----
def _validate_meta(index: dict) -> None:
    fmt = req(index, "format", list, "index")
    if len(fmt) != 2 or not all(_is_uint(v) for v in fmt):
        raise FormatError(f"index.format: {fmt!r} is not [major, minor]")
    if fmt[0] != FORMAT_MAJOR:
        raise FormatError(f"index.format: major version {fmt[0]}, this reader reads {FORMAT_MAJOR}")
    req(index, "generator", str, "index")
    req(index, "arch", str, "index")
    source = req(index, "source", dict, "index")
    req(source, "format", str, "index.source")
    for i, f in enumerate(req(source, "files", list, "index.source")):
        w = f"index.source.files[{i}]"
        req(f, "name", str, w)
        _uint(f, "size", w)
        req(f, "sha256", str, w)

    hp = req(index, "hparams", dict, "index")
    for key, types in HPARAM_TYPES.items():
        req(hp, key, types, "hparams")
    for key in ("hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "context", "rope_dim"):
        _pos(hp, key, "hparams")
    _uint(hp, "n_layers", "hparams")
    _num(hp, "rope_theta", "hparams", 0.0, strict=True)
    _num(hp, "norm_eps", "hparams", 0.0)
    if hp["rope_mode"] not in ROPE_MODES:
        raise FormatError(f"hparams.rope_mode: unknown {hp['rope_mode']!r}; known: {', '.join(ROPE_MODES)}")
    if hp["n_heads"] % hp["n_kv_heads"]:
        raise FormatError(f"hparams: n_heads {hp['n_heads']} is not a multiple of n_kv_heads {hp['n_kv_heads']}")

    tok = req(index, "tokenizer", dict, "index")
    for key, types in TOKENIZER_TYPES.items():
        v = req(tok, key, types, "tokenizer")
        if key.endswith("_id") and v is not None:
            _uint(tok, key, "tokenizer")
    if not all(_is_uint(v) for v in tok["eos_ids"]):
        raise FormatError(f"tokenizer.eos_ids: {tok['eos_ids']!r} is not a list of token ids")


# ---- rules 13-15: packs ----
def _validate_packs(raw: list, index_offset: int) -> list[PackRecord]:
    packs = []
    for i, p in enumerate(raw):
        w = f"packs[{i}]"
        if _uint(p, "id", w) != i:
            raise FormatError(f"{w}.id: {p['id']} differs from its position {i}")
        kind = req(p, "kind", str, w)
        if kind not in PACK_KINDS:
            raise FormatError(f"{w}.kind: unknown {kind!r}; known: {', '.join(PACK_KINDS)}")
        layer = req(p, "layer", (int, NIL), w)
        if layer is not None:
            _uint(p, "layer", w)
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
        params = req(p, "codec_params", dict, w)
        crc, raw_crc = _uint(p, "crc32", w, 0xFFFFFFFF), _uint(p, "raw_crc32", w, 0xFFFFFFFF)
        if codec == "none" and (stored != rawsz or crc != raw_crc):
            raise FormatError(f"{w}: codec none but stored_size {stored} / crc32 {crc:08x} differ from "
                              f"raw_size {rawsz} / raw_crc32 {raw_crc:08x}")
        packs.append(PackRecord(i, kind, layer, offset, stored, rawsz, codec, params, crc, raw_crc))
    # rule 15: in file order the packs tile [ALIGN, index_offset): no overlap, no gap but alignment padding
    end = HEADER_SIZE
    for p in sorted(packs, key=lambda p: (p.offset, p.stored_size)):
        if p.offset < end:
            raise FormatError(f"packs[{p.id}]: bytes from {p.offset} overlap the previous pack ending at {end}")
        if p.offset != align_up(end, ALIGN):
            raise FormatError(f"packs[{p.id}]: starts at {p.offset}, but the bytes before it end at {end}: "
                              f"a hole of {p.offset - end} bytes (only padding to {ALIGN} is allowed)")
        end = p.offset + p.stored_size
    if index_offset != align_up(end, ALIGN):
        raise FormatError(f"index starts at {index_offset}, but the last pack ends at {end}: "
                          f"{index_offset - end} bytes belong to no pack (only padding to {ALIGN} is allowed)")
    return packs


# ---- rules 16-18: tensors ----
def _validate_tensors(raw: list, packs: list[PackRecord]) -> dict[str, TensorRecord]:
    tensors: dict[str, TensorRecord] = {}
    spans: dict[int, list[tuple[int, int, str]]] = {}
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
        n_rows = math.prod(shape[:-1])
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
            if off % TENSOR_ALIGN:
                raise FormatError(f"{pw}.offset: {off} is not a multiple of {TENSOR_ALIGN}")
            if off + nb > packs[pack].raw_size:
                raise FormatError(f"{pw}: bytes [{off}, {off + nb}) exceed pack {pack}'s {packs[pack].raw_size} bytes")
            parts.append(TensorPart(pack, off, nb, r0, r1))
            spans.setdefault(pack, []).append((off, off + nb, name))
            next_row = r1
        if next_row != n_rows:
            raise FormatError(f"{w}: parts cover {next_row} of {n_rows} rows")
        tensors[name] = TensorRecord(name, dtype, tuple(shape), tuple(parts))
    for pack, sp in spans.items():  # rule 18
        sp.sort()
        for (a0, a1, an), (b0, b1, bn) in pairwise(sp):
            if b0 < a1:
                raise FormatError(f"pack {pack}: tensor {bn!r} at [{b0}, {b1}) overlaps tensor {an!r} at [{a0}, {a1})")
    return tensors


# ---- rules 19-23: access graph ----
def _validate_graph(graph: dict, packs: list[PackRecord], tensors: dict[str, TensorRecord]) -> None:
    steps = req(graph, "steps", list, "graph")
    if not steps:
        raise FormatError("graph.steps: empty")
    inputs = req(graph, "inputs", list, "graph")
    for name in inputs:
        if not isinstance(name, str) or name not in GRAPH_INPUTS:
            raise FormatError(f"graph.inputs: {name!r} is not one of {', '.join(GRAPH_INPUTS)}")
    kv = req(graph, "kv_cache", dict, "graph")
    kv_layers = _uint(kv, "n_layers", "graph.kv_cache")
    kv_shape = (_pos(kv, "n_kv_heads", "graph.kv_cache"), _pos(kv, "head_dim", "graph.kv_cache"))
    defined = set(inputs)
    access: list[int] = []
    n_attention = 0
    for i, s in enumerate(steps):
        w = f"graph.steps[{i}]"
        req(s, "name", str, w)
        kind = req(s, "kind", str, w)
        if kind not in PACK_KINDS:
            raise FormatError(f"{w}.kind: unknown {kind!r}; known: {', '.join(PACK_KINDS)}")
        if req(s, "layer", (int, NIL), w) is not None:
            _uint(s, "layer", w)
        req(s, "gather", bool, w)
        step_packs = req(s, "packs", list, w)
        for pid in step_packs:
            if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < len(packs):
                raise FormatError(f"{w}.packs: {pid!r} is not a pack id (the archive has {len(packs)})")
        in_step = set(step_packs)  # a set: a step may list many packs, and every weight part is looked up
        access += step_packs
        for j, op in enumerate(req(s, "ops", list, w)):
            ow = f"{w}.ops[{j}]"
            name = req(op, "op", str, ow)
            if name not in OPS:
                raise FormatError(f"{ow}.op: unknown {name!r}; known: {', '.join(OPS)}")
            n_in, w_min, w_max = OP_ARITY[name]
            ins = req(op, "in", list, ow)
            if len(ins) != n_in or not all(isinstance(x, str) for x in ins):
                raise FormatError(f"{ow}.in: {name} takes {n_in} activation names, got {ins!r}")
            for x in ins:
                if x not in defined:
                    raise FormatError(f"{ow}.in: {x!r} is neither a graph input nor the output of an earlier op")
            defined.add(req(op, "out", str, ow))
            weights = req(op, "w", list, ow)
            if not w_min <= len(weights) <= w_max:
                want = f"{w_min}" if w_min == w_max else f"{w_min}-{w_max}"
                raise FormatError(f"{ow}.w: {name} takes {want} weights, got {len(weights)}")
            if name == "moe" and len(weights) not in MOE_WEIGHT_COUNTS:
                raise FormatError(f"{ow}.w: moe takes 1, 4 or 5 weights, got {len(weights)}")
            for tname in weights:
                if not isinstance(tname, str) or tname not in tensors:
                    raise FormatError(f"{ow}.w: tensor {tname!r} is not in the tensor table")
                for q in tensors[tname].parts:
                    if q.pack not in in_step:
                        raise FormatError(f"{ow}.w: tensor {tname!r} has rows in pack {q.pack}, "
                                          f"which is not in the step's packs {step_packs}")
            attrs = req(op, "attrs", dict, ow)
            _validate_attrs(name, attrs, f"{ow}.attrs", kv_layers, kv_shape)
            if name == "moe":
                _validate_experts(attrs, f"{ow}.attrs", tensors)
            n_attention += name == "attention"
        if "choices" in s or any(op["op"] == "moe" for op in s["ops"]):  # since 1.3; required with a moe op
            _validate_choices(s, w, len(packs), tensors)
    if kv_layers > n_attention:  # the cache is sized from this count: no more layers than ops that use them
        raise FormatError(f"graph.kv_cache.n_layers: {kv_layers} but the graph has {n_attention} attention ops")
    outputs = req(graph, "outputs", list, "graph")
    if not outputs or not all(isinstance(x, str) and x in defined for x in outputs):
        raise FormatError(f"graph.outputs: {outputs!r} must name values that the ops produce")
    if req(graph, "access", list, "graph") != access:
        raise FormatError("graph.access: differs from the steps' packs concatenated in step order")
    loop = _uint(graph, "loop_to", "graph")
    if loop >= len(steps):
        raise FormatError(f"graph.loop_to: {loop} but there are {len(steps)} steps")


def _validate_experts(a: dict, w: str, tensors: dict[str, TensorRecord]) -> None:
    """Rule 20 for a moe op: `experts` names n existing (gate, up, down) tensors, and 1 <= k <= n."""
    experts = req(a, "experts", list, w)
    if not experts:
        raise FormatError(f"{w}.experts: empty")
    for i, names in enumerate(experts):
        if not isinstance(names, list) or len(names) != 3 or not all(isinstance(n, str) and n in tensors for n in names):
            raise FormatError(f"{w}.experts[{i}]: {names!r} is not 3 names of tensors in the tensor table")
    k = _pos(a, "k", w)
    if k > len(experts):
        raise FormatError(f"{w}.k: {k} experts chosen of {len(experts)}")


def _validate_choices(s: dict, w: str, n_packs: int, tensors: dict[str, TensorRecord]) -> None:
    """Rules 19 and 22 for a step's `choices` (1.3): each names one moe op of the step with its k and, per
    expert, exactly the packs holding that expert's rows; options share no pack with each other or `packs`."""
    ops = s["ops"]
    taken = set(s["packs"])
    named: set[int] = set()
    for c, choice in enumerate(req(s, "choices", list, w)):
        cw = f"{w}.choices[{c}]"
        j = _uint(choice, "op", cw, len(ops) - 1)
        op = ops[j]
        if op["op"] != "moe" or j in named:
            raise FormatError(f"{cw}.op: {j} is not a moe op of the step without a choice already")
        named.add(j)
        if _pos(choice, "k", cw) != op["attrs"]["k"]:
            raise FormatError(f"{cw}.k: {choice['k']}, but the op chooses {op['attrs']['k']}")
        experts = op["attrs"]["experts"]
        options = req(choice, "options", list, cw)
        if len(options) != len(experts):
            raise FormatError(f"{cw}.options: {len(options)} options for {len(experts)} experts")
        for e, option in enumerate(options):
            ew = f"{cw}.options[{e}]"
            if not isinstance(option, list) or not all(_is_uint(p) and p < n_packs for p in option):
                raise FormatError(f"{ew}: {option!r} is not a list of pack ids (the archive has {n_packs})")
            holding = {q.pack for name in experts[e] for q in tensors[name].parts}
            if set(option) != holding or len(option) != len(holding):
                raise FormatError(f"{ew}: {option!r}, but expert {e}'s tensors lie in packs {sorted(holding)}")
            if holding & taken:
                raise FormatError(f"{ew}: packs {sorted(holding & taken)} are also the step's or another expert's")
            taken |= holding
    missing = [j for j, op in enumerate(ops) if op["op"] == "moe" and j not in named]
    if missing:
        raise FormatError(f"{w}.choices: moe op {missing[0]} has no choice record")


def _validate_activations(graph: dict, tensors: dict[str, TensorRecord]) -> None:
    """Rule 23: `activations` states exactly the widths that the graph and the tensor shapes imply."""
    acts = req(graph, "activations", dict, "graph")
    for name, width in acts.items():
        if not isinstance(name, str):
            raise FormatError(f"graph.activations: key {name!r} is not a str")
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= MAX_DIM:
            raise FormatError(f"graph.activations[{name!r}]: {width!r} is not a width (an int in [1, {MAX_DIM}])")
    inferred = activation_widths(graph, tensors)
    for name, width in inferred.items():
        if name not in acts:
            raise FormatError(f"graph.activations: missing {name!r}, which an op writes ({width} wide)")
        if acts[name] != width:
            raise FormatError(f"graph.activations[{name!r}]: {acts[name]}, but the graph makes it {width} wide")
    for name in acts:
        if name not in inferred:
            raise FormatError(f"graph.activations[{name!r}]: no op writes it")


def _validate_attrs(op: str, a: dict, w: str, kv_layers: int, kv_shape: tuple[int, int]) -> None:
    """Rule 20: the attributes each op reads; unknown extra attributes are ignored."""
    if op == "rms_norm":
        _num(a, "eps", w, 0.0)
        if "group" in a:
            _pos(a, "group", w)
        if "offset" in a:
            _num(a, "offset", w)
    elif op == "rope":
        _pos(a, "n_heads", w)
        head_dim, rope_dim = _pos(a, "head_dim", w), _pos(a, "rope_dim", w)
        if rope_dim % 2 or rope_dim > head_dim:
            raise FormatError(f"{w}.rope_dim: {rope_dim} must be even and at most head_dim {head_dim}")
        _num(a, "theta", w, 0.0, strict=True)
        mode = req(a, "mode", str, w)
        if mode not in ROPE_MODES:
            raise FormatError(f"{w}.mode: unknown rope mode {mode!r}; known: {', '.join(ROPE_MODES)}")
        ff = req(a, "freq_factors", (list, NIL), w)
        if ff is not None and (len(ff) != rope_dim // 2 or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0 for f in ff)):
            raise FormatError(f"{w}.freq_factors: expected nil or {rope_dim // 2} positive numbers")
    elif op == "attention":
        layer = _uint(a, "layer", w)
        if layer >= kv_layers:
            raise FormatError(f"{w}.layer: {layer} but graph.kv_cache has {kv_layers} layers")
        n_heads, n_kv = _pos(a, "n_heads", w), _pos(a, "n_kv_heads", w)
        if (n_kv, _pos(a, "head_dim", w)) != kv_shape:
            raise FormatError(f"{w}: n_kv_heads {n_kv} x head_dim {a['head_dim']} differ from graph.kv_cache's "
                              f"{kv_shape[0]} x {kv_shape[1]}")
        if n_heads % n_kv:
            raise FormatError(f"{w}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
        _num(a, "scale", w)
        if a.get("softcap") is not None:
            _num(a, "softcap", w, 0.0, strict=True)
        if a.get("window") is not None:
            _pos(a, "window", w)
    elif op == "scale":
        _num(a, "factor", w)
    elif op == "softcap":
        _num(a, "cap", w, 0.0, strict=True)
    elif op == "moe":
        router = req(a, "router", str, w)
        if router not in MOE_ROUTERS:
            raise FormatError(f"{w}.router: unknown {router!r}; known: {', '.join(MOE_ROUTERS)}")
        req(a, "norm", bool, w)
