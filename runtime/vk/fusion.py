"""Record-time peephole fusion of a step's ops for the Vulkan backend.

A decode token is latency bound: every op is a dispatch and most are followed by a barrier
(the GPU drains). Three patterns of the shared decoder graph fold into the linear next to them:

- `rms_norm(x -> h)` whose only readers are linears: each linear normalizes x itself while it
  loads it (matmul.comp FUSE & 1); the norm dispatch and its barrier go away (not with a weight
  `offset`, which only rms_norm.comp applies).
- `swiglu(g, u -> m)` read only by the next linear: that linear loads silu(g) * u (FUSE & 2).
- `linear(in -> a); add(x, a -> x)`: the linear accumulates into x (the residual adds).
- `rope(k)` read only by the attention: the KV store rotates the keys as it writes the cache.
- and then `rope(q)` read only by the attention, when it runs the split-K kernel (few tokens):
  that kernel rotates q and the keys and stores k and v itself (no rope or kv_store dispatch).

The norm and GLU fusions exist only in matmul.comp (few tokens): `fuses(rows, op)` says whether
the linear for `rows` rows runs there; `attn_fuses(rows, op)` whether the attention runs the split
kernel. Ops are plain dicts (the archive's graph), never mutated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Op = dict[str, Any]


def _rows_per_op(ops: list[Op], tokens: int, n_seqs: int) -> list[int]:
    """Rows each op works on: all tokens, or one per sequence after `last_token`."""
    rows, after_last = [], False
    for op in ops:
        if op["op"] == "embed":
            after_last = False
        rows.append(n_seqs if after_last else tokens)
        if op["op"] == "last_token":
            after_last = True
    return rows


def _readers(ops: list[Op], start: int, name: str) -> list[int]:
    return [j for j in range(start, len(ops)) if name in ops[j].get("in", ())]


def _written_between(ops: list[Op], lo: int, hi: int, names: set[str]) -> bool:
    return any(ops[j].get("out") in names for j in range(lo, hi))


def _sole_rope(ops: list[Op], j: int, name: str) -> int | None:
    """Index of the in-place rope(name) that writes attention j's input `name`, if only j reads it."""
    for i in range(j - 1, -1, -1):
        if ops[i].get("out") == name:
            op = ops[i]
            return i if op["op"] == "rope" and op["in"][0] == name and _readers(ops, i + 1, name) == [j] else None
    return None


def _same_rope(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Rotations of q and k that differ only in their head counts."""
    return {**a, "n_heads": 0} == {**b, "n_heads": 0}


def plan(ops: list[Op], tokens: int, n_seqs: int, fuses: Callable[[int, Op], bool],
         attn_fuses: Callable[[int, Op], bool] = lambda rows, op: False) -> list[Op]:
    """The ops to record, with fused ones dropped and their consumers annotated:
    `_norm` (norm weight name, eps), `_glu` (name of u), `_accumulate` (True), `_rope_k` (rope attrs),
    `_rope_q` (rope attrs of q; the attention also stores k and v: no kv_store)."""
    rows = _rows_per_op(ops, tokens, n_seqs)
    out: list[Op | None] = list(ops)
    for i, op in enumerate(ops):
        if (op["op"] == "rms_norm" and not op["attrs"].get("group") and not op["attrs"].get("offset")
                and op["out"] != op["in"][0]):
            x, h = op["in"][0], op["out"]
            users = _readers(ops, i + 1, h)
            if users and all(ops[j]["op"] == "linear" and ops[j]["in"][0] == h and fuses(rows[j], ops[j])
                             for j in users) and not _written_between(ops, i + 1, users[-1], {x, h}):
                out[i] = None
                for j in users:
                    out[j] = {**out[j], "in": [x], "_norm": (op["w"][0], op["attrs"]["eps"])}
        elif op["op"] == "swiglu":
            g, u = op["in"]
            users = _readers(ops, i + 1, op["out"])
            if (len(users) == 1 and ops[users[0]]["op"] == "linear" and ops[users[0]]["in"][0] == op["out"]
                    and fuses(rows[users[0]], ops[users[0]]) and not _written_between(ops, i + 1, users[0], {g, u})):
                out[i] = None
                out[users[0]] = {**out[users[0]], "in": [g], "_glu": u}
        elif op["op"] == "attention":
            rk = _sole_rope(ops, i, op["in"][1])
            if rk is None:
                continue
            out[rk] = None  # the keys are rotated by the KV store on their way into the cache
            out[i] = {**out[i], "_rope_k": ops[rk]["attrs"]}
            rq = _sole_rope(ops, i, op["in"][0])
            if rq is not None and attn_fuses(rows[i], op) and _same_rope(ops[rq]["attrs"], ops[rk]["attrs"]):
                out[rq] = None  # the split kernel rotates q as it loads it and does the store
                out[i] = {**out[i], "_rope_q": ops[rq]["attrs"]}
    kept = [op for op in out if op is not None]
    return _accumulate_residuals(kept)


def _accumulate_residuals(ops: list[Op]) -> list[Op]:
    """`linear(in -> a); add(x, a -> x)` -> one linear accumulating into x (a read by nothing else)."""
    out: list[Op] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        nxt = ops[i + 1] if i + 1 < len(ops) else None
        if (op["op"] == "linear" and nxt is not None and nxt["op"] == "add" and len(nxt["in"]) == 2
                and op["out"] in nxt["in"] and nxt["out"] in nxt["in"] and nxt["out"] != op["out"]
                and nxt["out"] not in op["in"] and op.get("_glu") != nxt["out"]
                and not _readers(ops, i + 2, op["out"])):
            out.append({**op, "out": nxt["out"], "_accumulate": True})
            i += 2
            continue
        out.append(op)
        i += 1
    return out
