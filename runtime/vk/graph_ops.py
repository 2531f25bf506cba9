"""The archive graph's ops as recorded dispatches: one `op_<name>` per op kind.

`GraphOps.record` records a step's ops, fused as the kernels allow (fusion.py), into a `Recorder`:
each reads the pass's activation buffers (`PassState`, layout.py) and the step's resident weights
(`payload`: (tensor name, first row) -> Weight, or an f32 BufferSlice for vectors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import fusion
from .errors import VulkanError
from .kernels import BufferSlice
from .layout import LAST_TOKEN_SCRATCH, PassState
from .ops import Ops, Weight
from .recorder import Recorder

Payload = dict[tuple[str, int], Any]
# a moe op's rows besides the graph's activations (no graph name, a str, equals these)
MOE_LOGITS = ("scratch", "moe_logits")   # (T, n + 1): the router's logits, the shared expert's gate logit last
MOE_X = ("scratch", "moe_x")             # (m, E): the rows that chose one expert, packed
MOE_G = ("scratch", "moe_g")             # (m, F): an expert's gate product (then silu(g) * u where not fused)
MOE_U = ("scratch", "moe_u")             # (m, F): its up product
MOE_Y = ("scratch", "moe_y")             # (m, E): its down product, before the routing weights
MOE_SHARED = ("scratch", "moe_shared")   # (T, E): the shared expert's output, before its gate


def moe_scratch_widths(steps: list[dict[str, Any]], tensors: dict[str, Any]) -> dict[tuple[str, str], int]:
    """Floats per token the moe ops' dispatches need besides the graph's activations (ActivationLayout
    lays them out with the rest): {} without a moe op."""
    out: dict[tuple[str, str], int] = {}
    for s in steps:
        for op in s["ops"]:
            if op["op"] != "moe":
                continue
            w, experts = op["w"], op["attrs"]["experts"]
            n, e = tensors[w[0]].shape
            ffn = max(tensors[names[0]].shape[0] for names in [*experts, *([w[1:4]] if len(w) >= 4 else [])])
            widths = {MOE_LOGITS: n + 1, MOE_X: e, MOE_G: ffn, MOE_U: ffn, MOE_Y: e}
            if len(w) >= 4:
                widths[MOE_SHARED] = e
            for k, v in widths.items():
                out[k] = max(out.get(k, 0), v)
    return out



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

    def plan(self, ops: list[dict[str, Any]], ps: PassState) -> list[dict[str, Any]]:
        """A step's ops as `record` records them (fusion.plan); runtime/vk/moe.py records them in pieces."""
        return self._plan(ops, ps)

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
            need = self.ops.attention_scratch_bytes(r1 - r0, a["n_heads"], a["head_dim"], n_ctx, a.get("window") or 0)
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
                            norm=norm, glu_up=glu, split=ps.split)

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
        window = a.get("window") or 0
        for (r0, r1, _pos0, kv), sc in zip(ps.seqs, self._attn_scratch(ps, a)):
            kc, vc = kv[a["layer"]]
            # a windowed layer's cache is indexed as a ring of its rows (runtime/kv.py): position p at row
            # p % rows, the identity while the session's positions fit the rows
            ring = kc.n_ctx if window else 0
            if not in_kernel:
                self.ops.kv_store(rec, k, v, kc.slice, vc.slice, ps.pos, r1 - r0, kvd, kc.n_ctx, t0=r0, rope=rope,
                                  ring=ring)
            self.ops.attention(rec, q, kc.slice, vc.slice, ps.pos, out, r1 - r0, a["n_heads"], a["n_kv_heads"],
                               a["head_dim"], kc.n_ctx, scale=a["scale"], t0=r0, scratch=sc,
                               new_kv=(k, v) if in_kernel else None, rope=rope if in_kernel else None,
                               window=window, softcap=a.get("softcap") or 0.0, ring=ring)

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


    # ---- mixtures of experts (runtime/vk/moe.py runs the pieces around the router's readback) ----
    def op_moe(self, rec, op, ps: PassState, payload: Payload) -> None:
        """A moe op is no single recording: its experts are chosen on the host between `moe_router` and
        `moe_expert` (runtime/vk/moe.py)."""
        raise VulkanError("a moe op is recorded in pieces around its router's readback (runtime/vk/moe.py)")

    def moe_router(self, rec, op, ps: PassState, payload: Payload, readback: BufferSlice | None,
                   xback: BufferSlice | None = None) -> None:
        """The router's logits (T, n) into MOE_LOGITS, and the shared expert's gate logit as column n, copied to
        `readback` for the host's top-k (None: the device routes) (and the op's input rows to `xback`, for
        experts the CPU computes); the shared expert's output into MOE_SHARED; the op's output zeroed."""
        w, t = op["w"], ps.rows()
        n = self.tensors[w[0]].shape[0]
        x, logits = ps.buf(op["in"][0]), ps.buf(MOE_LOGITS)
        self._product(rec, w[0], payload, x, logits, t, y_stride=n + 1)
        if len(w) == 5:
            self._product(rec, w[4], payload, x, logits, t, y_stride=n + 1, y_col=n)
        if readback is not None:
            rec.copy(logits, readback, 4 * t * (n + 1))
            if xback is not None:
                rec.copy(x, xback, 4 * t * ps.width(op["in"][0]))
            rec.host_barrier()
        out = ps.buf(op["out"])
        rec.fill(BufferSlice(out.buffer, out.offset, 4 * t * ps.width(op["out"])))
        if len(w) >= 4:
            self._swiglu_ffn(rec, ps, w[1:4], payload, x, ps.buf(MOE_SHARED), t)

    def moe_expert(self, rec, op, ps: PassState, payload: Payload, e: int, m: int, route: Any, idx_off: int,
                   w_off: int) -> None:
        """Expert e over the m rows that chose it (their indices at uint idx_off of `route`, their routing
        weights at w_off): rows gathered (unless all rows chose it), its SwiGLU FFN, each output row
        scaled by its weight and added to the op's output."""
        x, width = ps.buf(op["in"][0]), ps.width(op["in"][0])
        if m < ps.rows():
            xg = ps.buf(MOE_X)
            self.ops.gather_rows(rec, x, xg, route, m, width, idx_off)
            x = xg
        y = ps.buf(MOE_Y)
        self._swiglu_ffn(rec, ps, op["attrs"]["experts"][e], payload, x, y, m)
        self.ops.scatter_add_rows(rec, y, ps.buf(op["out"]), route, m, width, idx_off, w_off)

    def moe_combine(self, rec, op, ps: PassState, route: Any, idx_off: int, w_off: int,
                    host_part: Any = None) -> None:
        """The shared expert's output added to the op's output, scaled by sigmoid of its gate (the routing
        weights at w_off, written by the host) where the op has one; and `host_part` (the experts the
        CPU computed, written by the host) where given."""
        w, out, t = op["w"], ps.buf(op["out"]), ps.rows()
        if len(w) == 5:
            self.ops.scatter_add_rows(rec, ps.buf(MOE_SHARED), out, route, t, ps.width(op["out"]), idx_off, w_off)
        elif len(w) == 4:
            self.ops.add(rec, out, ps.buf(MOE_SHARED), out, t * ps.width(op["out"]))
        if host_part is not None:
            n = t * ps.width(op["out"])
            self.ops.add(rec, out, BufferSlice(host_part, 0, 4 * n), out, n)

    def _swiglu_ffn(self, rec, ps: PassState, names: list[str], payload: Payload, x: Any, y: Any, rows: int) -> None:
        """y = down(silu(gate(x)) * up(x)) for `rows` rows, packed (strides: the weights' widths), through
        MOE_G and MOE_U."""
        g, u = ps.buf(MOE_G), ps.buf(MOE_U)
        self._product(rec, names[0], payload, x, g, rows)
        self._product(rec, names[1], payload, x, u, rows)
        down = self.tensors[names[2]]
        if self.ops.fuses(rows, down.dtype):
            self._product(rec, names[2], payload, g, y, rows, glu=u)
        else:
            self.ops.swiglu(rec, g, u, g, rows * down.shape[1])
            self._product(rec, names[2], payload, g, y, rows)

    def _product(self, rec, name: str, payload: Payload, x: Any, y: Any, rows: int, y_stride: int | None = None,
                 y_col: int = 0, glu: Any = None) -> None:
        """y[:, y_col:] = x @ W.T over every row-part of `name`, all of which must be in `payload`."""
        t = self.tensors[name]
        parts = [(p.row_start, p.row_end, payload.get((name, p.row_start))) for p in t.parts]
        if any(w is None for _, _, w in parts):
            raise VulkanError(f"moe: a part of {name!r} is not among the weights held")
        for row0, w in merged_parts(parts):
            self.ops.linear(rec, w, x, y, rows, x_stride=t.shape[-1], y_stride=y_stride or t.shape[0],
                            y_col=y_col + row0, glu_up=glu)


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
