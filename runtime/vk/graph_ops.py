"""The engine's graph ops as recorded dispatches: one `op_<name>` per op kind of the archive's graph.

A mixin of `VulkanBackend` (kept apart to keep files small): each method records the op's
dispatches into a `Recorder` from the pass's activation buffers (`env["_bufs"]`) and the step's
resident weights (`payload`: (tensor name, first row) -> Weight or f32 BufferSlice).
"""

from __future__ import annotations

from typing import Any

from . import fusion
from .kernels import BufferSlice
from .ops import Weight


class GraphOpsMixin:
    def _rows(self, env: dict[str, Any], name: str) -> int:
        return env["_nseq"] if env.get("_after_last") else env["_T"]

    def op_embed(self, rec, op, env, payload) -> None:
        name = op["w"][0]
        t = self.archive.tensors[name]
        first = not env.get("_embed_keep")
        for p in t.parts:
            w = payload.get((name, p.row_start))
            if w is None:
                continue  # no token in this part's rows
            self.ops.embed(rec, w, env["_ids"], self._buf(env, op["out"]), env["_T"], id_off=p.row_start,
                           keep_outside=not first)
            first = False
        env["_after_last"] = False

    def op_rms_norm(self, rec, op, env, payload) -> None:
        a = op["attrs"]
        x = self._buf(env, op["in"][0])
        rows = self._rows(env, op["in"][0])
        n = env["_bufs"][op["in"][0]][1]
        g = a.get("group") or n
        w = payload[(op["w"][0], 0)]
        self.ops.rms_norm(rec, x, w, self._buf(env, op["out"]), rows * (n // g), g, a["eps"])

    def _plan(self, ops: list[dict[str, Any]], env: dict[str, Any]) -> list[dict[str, Any]]:
        """The step's ops with norms, SwiGLU, residual adds, rope and the KV store fused where the kernels allow."""
        tensors = self.archive.tensors
        return fusion.plan(ops, env["_T"], env["_nseq"],
                           lambda rows, op: self.ops.fuses(rows, tensors[op["w"][0]].dtype),
                           lambda rows, op: self.ops.attn_fused_store
                           and all(sc is not None for sc in self._attn_scratch(env, op["attrs"])))

    def _attn_scratch(self, env: dict[str, Any], a: dict[str, Any]) -> list[Any]:
        """Each sequence's split-K attention scratch for this layer; None: the one-pass kernel runs."""
        out = []
        for (r0, r1, _pos0, kv), sc in zip(env["seqs"], env["_attn"]):
            n_ctx = kv[a["layer"]][0].n_ctx
            need = self.ops.attention_scratch_bytes(r1 - r0, a["n_heads"], a["head_dim"], n_ctx)
            # a layer unlike the hparams (scratch too small): the one-pass kernel
            fits = sc is not None and sc.size >= need
            out.append(sc if fits else None)
        return out

    def op_linear(self, rec, op, env, payload) -> None:
        name = op["w"][0]
        t = self.archive.tensors[name]
        rows = self._rows(env, op["in"][0])
        bias = payload[(op["w"][1], 0)] if len(op["w"]) > 1 else None
        x = self._buf(env, op["in"][0])
        y = self._buf(env, op["out"])
        norm = (payload[(op["_norm"][0], 0)], op["_norm"][1]) if "_norm" in op else None
        glu = self._buf(env, op["_glu"]) if "_glu" in op else None
        # (streamed: parts not in the payload run in another chunk)
        for row0, w in _merged_parts([(p.row_start, p.row_end, payload.get((name, p.row_start))) for p in t.parts]):
            self.ops.linear(rec, w, x, y, rows, x_stride=t.shape[-1], y_stride=t.shape[0],
                            y_col=row0, bias=bias, bias_off=row0, accumulate=op.get("_accumulate", False),
                            norm=norm, glu_up=glu)

    def _rope_kw(self, a: dict[str, Any]) -> dict[str, Any]:
        """A rope op's attributes as the kernels' RoPE arguments (Ops.rope, kv_store's and attention's `rope`)."""
        return {"n_rot": a["rope_dim"], "mode": a["mode"], "base": a["theta"],
                "freq_factors": self._freq_factors(a.get("freq_factors"))}

    def op_rope(self, rec, op, env, payload) -> None:
        a = op["attrs"]
        self.ops.rope(rec, self._buf(env, op["in"][0]), env["_pos"], env["_T"], a["n_heads"], a["head_dim"],
                      **self._rope_kw(a))

    def op_attention(self, rec, op, env, payload) -> None:
        a = op["attrs"]
        q, k, v = (self._buf(env, n) for n in op["in"])
        out = self._buf(env, op["out"])
        kvd = a["n_kv_heads"] * a["head_dim"]
        rope = None
        if "_rope_k" in op:  # fused: the keys are rotated by the store (fusion.py)
            rope = {"head_dim": op["_rope_k"]["head_dim"], **self._rope_kw(op["_rope_k"])}
        in_kernel = "_rope_q" in op  # fused: the split kernel rotates q and k and stores k, v itself
        for (r0, r1, _pos0, kv), sc in zip(env["seqs"], self._attn_scratch(env, a)):
            kc, vc = kv[a["layer"]]
            if not in_kernel:
                self.ops.kv_store(rec, k, v, kc.slice, vc.slice, env["_pos"], r1 - r0, kvd, kc.n_ctx, t0=r0, rope=rope)
            self.ops.attention(rec, q, kc.slice, vc.slice, env["_pos"], out, r1 - r0, a["n_heads"], a["n_kv_heads"],
                               a["head_dim"], kc.n_ctx, scale=a["scale"], t0=r0, scratch=sc,
                               new_kv=(k, v) if in_kernel else None, rope=rope if in_kernel else None)

    def op_add(self, rec, op, env, payload) -> None:
        a, b = (self._buf(env, n) for n in op["in"])
        n = self._rows(env, op["in"][0]) * env["_bufs"][op["in"][0]][1]
        self.ops.add(rec, a, b, self._buf(env, op["out"]), n)

    def op_swiglu(self, rec, op, env, payload) -> None:
        g, u = (self._buf(env, n) for n in op["in"])
        n = self._rows(env, op["in"][0]) * env["_bufs"][op["in"][0]][1]
        self.ops.swiglu(rec, g, u, self._buf(env, op["out"]), n)

    def op_last_token(self, rec, op, env, payload) -> None:
        src = self._buf(env, op["in"][0])
        n = env["_bufs"][op["in"][0]][1]
        rows = [r1 - 1 for _, r1, _, _ in env["seqs"]]
        tmp = self._buf(env, "h")  # copy through a scratch row block: source and destination overlap
        self.ops.copy_rows(rec, src, tmp, rows, n)
        rec.barrier()
        rec.copy(BufferSlice(tmp.buffer, tmp.offset, 4 * n * len(rows)), BufferSlice(src.buffer, src.offset, 4 * n * len(rows)))
        env["_after_last"] = True


def _merged_parts(parts: list[tuple[int, int, Weight | None]]) -> list[tuple[int, Weight]]:
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
