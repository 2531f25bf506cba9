"""The archive graph's ops as recorded dispatches: one `op_<name>` per op kind.

`GraphOps.record` records a step's ops, fused as the kernels allow (fusion.py), into a `Recorder`:
each reads the pass's activation buffers (`PassState`, layout.py) and the step's resident weights
(`payload`: (tensor name, first row) -> Weight, or an f32 BufferSlice for vectors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import fusion
from .kernels import BufferSlice
from .layout import LAST_TOKEN_SCRATCH, PassState
from .ops import Ops, Weight
from .recorder import Recorder

Payload = dict[tuple[str, int], Any]



class GraphOps:
    """Records graph ops on `ops` (the kernels) for tensors of `tensors`; `freq_factors(list)` gives a
    rope op's frequency factors as a device buffer."""

    def __init__(self, ops: Ops, tensors: dict[str, Any], freq_factors: Callable[[list[float] | None], Any]):
        self.ops = ops
        self.tensors = tensors
        self.freq_factors = freq_factors

    def record(self, rec: Recorder, step: dict[str, Any], ps: PassState, payload: Payload) -> None:
        """Record a step's ops, fused as the kernels allow, from the weights in `payload`."""
        for op in self._plan(step["ops"], ps):
            self.record_op(rec, op, ps, payload)

    def record_op(self, rec: Recorder, op: dict[str, Any], ps: PassState, payload: Payload) -> None:
        getattr(self, "op_" + op["op"])(rec, op, ps, payload)

    def op_embed(self, rec, op, ps: PassState, payload: Payload) -> None:
        name = op["w"][0]
        t = self.tensors[name]
        first = not ps.embed_keep
        for p in t.parts:
            w = payload.get((name, p.row_start))
            if w is None:
                continue  # no token in this part's rows
            self.ops.embed(rec, w, ps.ids, ps.buf(op["out"]), ps.T, id_off=p.row_start, keep_outside=not first)
            first = False
        ps.after_last = False

    def op_rms_norm(self, rec, op, ps: PassState, payload: Payload) -> None:
        a = op["attrs"]
        n = ps.width(op["in"][0])
        g = a.get("group") or n
        w = payload[(op["w"][0], 0)]
        self.ops.rms_norm(rec, ps.buf(op["in"][0]), w, ps.buf(op["out"]), ps.rows() * (n // g), g, a["eps"],
                          a.get("offset") or 0.0)

    def _plan(self, ops: list[dict[str, Any]], ps: PassState) -> list[dict[str, Any]]:
        """The step's ops with norms, SwiGLU, residual adds, rope and the KV store fused where the kernels allow."""
        tensors = self.tensors
        return fusion.plan(ops, ps.T, ps.nseq,
                           lambda rows, op: self.ops.fuses(rows, tensors[op["w"][0]].dtype),
                           lambda rows, op: self.ops.attn_fused_store
                           and all(sc is not None for sc in self._attn_scratch(ps, op["attrs"])))

    def _attn_scratch(self, ps: PassState, a: dict[str, Any]) -> list[Any]:
        """Each sequence's split-K attention scratch for this layer; None: the one-pass kernel runs."""
        out = []
        for (r0, r1, _pos0, kv), sc in zip(ps.seqs, ps.attn):
            n_ctx = kv[a["layer"]][0].n_ctx
            need = self.ops.attention_scratch_bytes(r1 - r0, a["n_heads"], a["head_dim"], n_ctx)
            # a layer unlike the hparams (scratch too small): the one-pass kernel
            fits = sc is not None and sc.size >= need
            out.append(sc if fits else None)
        return out

    def op_linear(self, rec, op, ps: PassState, payload: Payload) -> None:
        name = op["w"][0]
        t = self.tensors[name]
        rows = ps.rows()
        bias = payload[(op["w"][1], 0)] if len(op["w"]) > 1 else None
        x = ps.buf(op["in"][0])
        y = ps.buf(op["out"])
        norm = (payload[(op["_norm"][0], 0)], op["_norm"][1]) if "_norm" in op else None
        glu = ps.buf(op["_glu"]) if "_glu" in op else None
        # (streamed: parts not in the payload run in another chunk)
        for row0, w in merged_parts([(p.row_start, p.row_end, payload.get((name, p.row_start))) for p in t.parts]):
            self.ops.linear(rec, w, x, y, rows, x_stride=t.shape[-1], y_stride=t.shape[0],
                            y_col=row0, bias=bias, bias_off=row0, accumulate=op.get("_accumulate", False),
                            norm=norm, glu_up=glu)

    def _rope_kw(self, a: dict[str, Any]) -> dict[str, Any]:
        """A rope op's attributes as the kernels' RoPE arguments (Ops.rope, kv_store's and attention's `rope`)."""
        return {"n_rot": a["rope_dim"], "mode": a["mode"], "base": a["theta"],
                "freq_factors": self.freq_factors(a.get("freq_factors"))}

    def op_rope(self, rec, op, ps: PassState, payload: Payload) -> None:
        a = op["attrs"]
        self.ops.rope(rec, ps.buf(op["in"][0]), ps.pos, ps.T, a["n_heads"], a["head_dim"], **self._rope_kw(a))

    def op_attention(self, rec, op, ps: PassState, payload: Payload) -> None:
        a = op["attrs"]
        q, k, v = (ps.buf(n) for n in op["in"])
        out = ps.buf(op["out"])
        kvd = a["n_kv_heads"] * a["head_dim"]
        rope = None
        if "_rope_k" in op:  # fused: the keys are rotated by the store (fusion.py)
            rope = {"head_dim": op["_rope_k"]["head_dim"], **self._rope_kw(op["_rope_k"])}
        in_kernel = "_rope_q" in op  # fused: the split kernel rotates q and k and stores k, v itself
        for (r0, r1, _pos0, kv), sc in zip(ps.seqs, self._attn_scratch(ps, a)):
            kc, vc = kv[a["layer"]]
            if not in_kernel:
                self.ops.kv_store(rec, k, v, kc.slice, vc.slice, ps.pos, r1 - r0, kvd, kc.n_ctx, t0=r0, rope=rope)
            self.ops.attention(rec, q, kc.slice, vc.slice, ps.pos, out, r1 - r0, a["n_heads"], a["n_kv_heads"],
                               a["head_dim"], kc.n_ctx, scale=a["scale"], t0=r0, scratch=sc,
                               new_kv=(k, v) if in_kernel else None, rope=rope if in_kernel else None,
                               window=a.get("window") or 0, softcap=a.get("softcap") or 0.0)

    def op_add(self, rec, op, ps: PassState, payload: Payload) -> None:
        a, b = (ps.buf(n) for n in op["in"])
        self.ops.add(rec, a, b, ps.buf(op["out"]), ps.rows() * ps.width(op["in"][0]))

    def op_swiglu(self, rec, op, ps: PassState, payload: Payload) -> None:
        g, u = (ps.buf(n) for n in op["in"])
        self.ops.swiglu(rec, g, u, ps.buf(op["out"]), ps.rows() * ps.width(op["in"][0]))

    def op_geglu(self, rec, op, ps: PassState, payload: Payload) -> None:
        g, u = (ps.buf(n) for n in op["in"])
        self.ops.geglu(rec, g, u, ps.buf(op["out"]), ps.rows() * ps.width(op["in"][0]))

    def op_scale(self, rec, op, ps: PassState, payload: Payload) -> None:
        self.ops.scale(rec, ps.buf(op["in"][0]), ps.buf(op["out"]), ps.rows() * ps.width(op["in"][0]),
                       op["attrs"]["factor"])

    def op_softcap(self, rec, op, ps: PassState, payload: Payload) -> None:
        self.ops.softcap(rec, ps.buf(op["in"][0]), ps.buf(op["out"]), ps.rows() * ps.width(op["in"][0]),
                         op["attrs"]["cap"])

    def op_last_token(self, rec, op, ps: PassState, payload: Payload) -> None:
        src = ps.buf(op["in"][0])
        n = ps.width(op["in"][0])
        rows = [r1 - 1 for _, r1, _, _ in ps.seqs]
        tmp = ps.buf(LAST_TOKEN_SCRATCH)  # rows of its own: source and destination overlap
        self.ops.copy_rows(rec, src, tmp, rows, n)
        rec.barrier()
        rec.copy(BufferSlice(tmp.buffer, tmp.offset, 4 * n * len(rows)), BufferSlice(src.buffer, src.offset, 4 * n * len(rows)))
        ps.after_last = True


def merged_parts(parts: list[tuple[int, int, Weight | None]]) -> list[tuple[int, Weight]]:
    """Row-parts of one weight as (first row, Weight), neighbours that lie back to back in one
    buffer joined into one Weight: one dispatch instead of several (packs placed in order at
    start are contiguous; an 8B model's MLP matrix is three 50 MB parts, its tied head 100)."""
    out: list[tuple[int, Weight]] = []
    end_row = -1
    for r0, r1, w in parts:
        if w is None:
            end_row = -1
            continue
        if out and r0 == end_row:
            prev = out[-1][1]
            if prev.buffer is w.buffer and prev.offset + prev.nbytes == w.offset and prev.dtype == w.dtype:
                out[-1] = (out[-1][0], Weight(w.buffer, prev.offset, w.dtype, prev.rows + w.rows, w.cols))
                end_row = r1
                continue
        out.append((r0, w))
        end_row = r1
    return out
