"""Group tensors into packs, split the big ones by rows, and attach packs to graph steps.

Packs are laid out in the order a forward pass uses them (embedding, then each layer's
attention and MLP, then the head), so that a cold first token reads the file sequentially.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..pack_format.constants import TENSOR_ALIGN, align_up, row_bytes
from ..pack_format.errors import SourceError
from .archs.moe import expert_index
from .sources.base import SourceTensor

KIND_ORDER = {"embed": 0, "attn": 1, "mlp": 2, "expert": 3, "head": 4}
EMBED_PACK_BYTES = 4 << 20  # embedding rows are fetched per token seen, so keep its packs small


@dataclass
class Slice:
    """Rows [row_start, row_end) of one tensor, at `offset` inside its pack."""
    name: str
    tensor: SourceTensor
    row_start: int
    row_end: int
    offset: int
    nbytes: int


@dataclass
class PlannedPack:
    id: int
    kind: str
    layer: int | None
    slices: list[Slice] = field(default_factory=list)
    size: int = 0

    def add(self, name: str, t: SourceTensor, r0: int, r1: int, rb: int) -> None:
        off = align_up(self.size, TENSOR_ALIGN)
        nb = (r1 - r0) * rb
        self.slices.append(Slice(name, t, r0, r1, off, nb))
        self.size = off + nb


def _rows(t: SourceTensor) -> tuple[int, int]:
    n = 1
    for d in t.shape[:-1]:
        n *= d
    return n, row_bytes(t.dtype, t.shape[-1])


def plan_packs(tensors: dict[str, SourceTensor], family: Any, max_pack_bytes: int) -> list[PlannedPack]:
    """Packs in access order; no pack's raw size exceeds `max_pack_bytes`. Each expert of a MoE layer
    gets packs of its own (after the layer's router), so that it moves alone."""
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name in tensors:
        kind, layer = family.pack_group(name)
        expert = expert_index(name)
        key = (-1 if kind == "embed" else 1 << 30 if kind == "head" else layer, KIND_ORDER[kind],
               0 if expert is None else expert)
        groups.setdefault(key, []).append(name)
    packs: list[PlannedPack] = []
    for key in sorted(groups):
        names = sorted(groups[key], key=_tensor_order)
        kind, layer = family.pack_group(names[0])
        limit = min(max_pack_bytes, EMBED_PACK_BYTES) if kind == "embed" else max_pack_bytes
        cur = PlannedPack(len(packs), kind, layer)
        packs.append(cur)
        for name in names:
            t = tensors[name]
            n_rows, rb = _rows(t)
            if rb > limit:
                raise SourceError(f"tensor {name!r}: one row ({rb} bytes) exceeds the pack limit {limit}")
            r = 0
            while r < n_rows:
                room = limit - align_up(cur.size, TENSOR_ALIGN)
                take = min(n_rows - r, room // rb if room > 0 else 0)
                # start a fresh pack rather than leave a sliver of a tensor in the current one
                if take == 0 or (take < n_rows - r and cur.slices and take * rb < limit // 4):
                    cur = PlannedPack(len(packs), kind, layer)
                    packs.append(cur)
                    continue
                cur.add(name, t, r, r + take, rb)
                r += take
    return [p for p in packs if p.slices]


_ORDER = ["attn_norm", "attn_q.", "attn_k.", "attn_v.", "attn_q_norm", "attn_k_norm", "attn_output",
          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "output_norm", "output."]


def _tensor_order(name: str) -> tuple[int, str]:
    for i, key in enumerate(_ORDER):
        if key in name:
            return i, name
    return len(_ORDER), name


def tensor_table(packs: list[PlannedPack], tensors: dict[str, SourceTensor]) -> list[dict[str, Any]]:
    parts: dict[str, list[dict[str, Any]]] = {}
    for p in packs:
        for s in p.slices:
            parts.setdefault(s.name, []).append({"pack": p.id, "offset": s.offset, "nbytes": s.nbytes,
                                                 "row_start": s.row_start, "row_end": s.row_end})
    return [{"name": n, "dtype": tensors[n].dtype, "shape": list(tensors[n].shape), "parts": parts[n]}
            for n in sorted(parts, key=lambda n: parts[n][0]["pack"] * 1_000_000 + _tensor_order(n)[0])]


def attach_packs(graph: dict[str, Any], packs: list[PlannedPack]) -> dict[str, Any]:
    """Fill each step's `packs` (the packs its weights live in), its `choices` (per moe op, the packs of
    each expert: k of them are read, decided at run time) and the whole-pass access order."""
    where: dict[str, list[int]] = {}
    for p in packs:
        for s in p.slices:
            ids = where.setdefault(s.name, [])
            if p.id not in ids:
                ids.append(p.id)
    access = []
    for step in graph["steps"]:
        ids: list[int] = []
        for o in step["ops"]:
            for w in o["w"]:
                if w not in where:
                    raise SourceError(f"the {step['name']} step needs tensor {w!r}, which the model lacks")
                ids += [i for i in where[w] if i not in ids]
        step["packs"] = ids
        access += ids
        choices = [{"op": oi, "k": o["attrs"]["k"], "options": [_packs_of(names, where) for names in o["attrs"]["experts"]]}
                   for oi, o in enumerate(step["ops"]) if o["op"] == "moe"]
        if choices:
            step["choices"] = choices
    graph["access"] = access
    return graph


def _packs_of(names: list[str], where: dict[str, list[int]]) -> list[int]:
    """The packs holding rows of `names`, in first-use order."""
    ids: list[int] = []
    for n in names:
        if n not in where:
            raise SourceError(f"an expert needs tensor {n!r}, which the model lacks")
        ids += [i for i in where[n] if i not in ids]
    return ids
