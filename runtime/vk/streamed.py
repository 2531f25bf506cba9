"""Steps too big to pin at once (under a small budget): their weight parts in chunks, one chunk at a time.

Each op's parts are cut into chunks of at most `pin_limit` bytes; each chunk is acquired, recorded,
run and released before the next, so that a step of any size runs in a budget of about two packs.
A linear's bias is held with every chunk; an embedding's chunks keep the rows earlier ones wrote.
"""

from __future__ import annotations

from typing import Any

from .graph_ops import GraphOps
from .inflight import InFlight
from .layout import PassState
from .recorder import Recorder


def run_streamed(dev: Any, graph_ops: GraphOps, inflight: InFlight, pin_limit: int, pack_bytes: Any,
                 si: int, step: dict[str, Any], ps: PassState, weights: Any) -> None:
    """Run step `si` chunk by chunk (every earlier step is waited for first)."""
    inflight.flush(weights)
    tensors = graph_ops.tensors
    gather = ps.tokens if step.get("gather") else None
    for oi, op in enumerate(step["ops"]):
        parts = [(name, pi, tensors[name].parts[pi]) for name in op["w"]
                 for pi in (range(len(tensors[name].parts)) if gather is None else weights.parts_of_rows(name, gather))]
        fixed = [x for x in parts if x[0] != op["w"][0]]  # a linear's bias: held with every chunk
        chunks: list[list] = [[]]
        size = 0
        for x in parts:
            if x in fixed:
                continue
            nb = pack_bytes(x[2].pack)
            if chunks[-1] and size + nb > pin_limit:
                chunks.append([])
                size = 0
            chunks[-1].append(x)
            size += nb
        for ci, chunk in enumerate(chunks):
            if gather is not None:   # its parts are known only now: loaded side by side (graph.hold_step)
                weights.load_side_by_side([(si, oi, name, pi) for name, pi, _p in chunk])
            held = []
            for name, pi, p in chunk + fixed:
                if all(e.pack != p.pack for e in held):
                    held.append(weights.acquire(si, oi, name, pi))
            try:
                rec = Recorder(dev, label=f"{step['name']}.{op['op']}")
                payload = {k: v for e in held for k, v in e.payload.items()}
                ps.embed_keep = op["op"] == "embed" and ci > 0
                graph_ops.record_op(rec, op, ps, payload)
                ps.embed_keep = False
                rec.run()
                rec.destroy()
                inflight.submits += 1
            finally:
                weights.release(held)
