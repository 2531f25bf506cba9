"""The numpy backend: packs become float32 arrays inside the budgeted device tier.

Weights are converted once when their pack enters the tier (numpy is fast only on f32:
VULKAN_NOTES "The CPU side"), so the tier holds 4 bytes per weight whatever the stored type.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...pack_format.records import TensorPart, TensorRecord
from ..alloc import Allocation
from . import ops
from .dequant import dequantize

ALIGN = 256


class HostBacking:
    """The device tier's blocks as host memory; an allocation becomes a uint8 view."""

    def __init__(self, block_sizes: list[int]):
        self.blocks = [np.empty(n, dtype=np.uint8) for n in block_sizes]  # pages commit on first write

    def view(self, a: Allocation) -> np.ndarray:
        return self.blocks[a.block][a.offset:a.offset + a.requested]


def _part_shape(t: TensorRecord, p: TensorPart) -> tuple[int, ...]:
    if len(t.shape) == 1:
        return t.shape
    return (p.row_end - p.row_start, t.shape[-1])


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class CpuBackend:
    name = "cpu"
    max_block = 1 << 30
    backing_factory = HostBacking

    def __init__(self, archive: Any):
        self.archive = archive
        self.slices: dict[int, list[tuple[TensorRecord, TensorPart]]] = {}
        for t in archive.tensors.values():
            for p in t.parts:
                self.slices.setdefault(p.pack, []).append((t, p))
        self._bytes = {pid: sum(_align(4 * math.prod(_part_shape(t, p))) for t, p in sl) for pid, sl in self.slices.items()}

    def pack_bytes(self, pack: int) -> int:
        """Bytes a pack takes in the tier (float32 form)."""
        return self._bytes.get(pack, ALIGN)

    def convert(self, pack: int, raw: bytes | memoryview, dest: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
        """Dequantize every tensor slice of a decoded pack into `dest`; returns (name, row_start) -> array."""
        out = {}
        off = 0
        mv = memoryview(raw)
        for t, p in self.slices.get(pack, []):
            shape = _part_shape(t, p)
            n = math.prod(shape)
            arr = dest[off:off + 4 * n].view(np.float32).reshape(shape)
            dequantize(t.dtype, mv[p.offset:p.offset + p.nbytes], shape, out=arr)
            out[(t.name, p.row_start)] = arr
            off += _align(4 * n)
        return out

    # ---- KV cache ----
    def kv_view(self, mem: np.ndarray, n_ctx: int, width: int) -> np.ndarray:
        return mem[:n_ctx * width * 4].view(np.float32).reshape(n_ctx, width)

    # ---- ops (each gets the op dict, the activation env and the weight accessor) ----
    def run(self, op: dict[str, Any], env: dict[str, Any], weights: Any) -> None:
        getattr(self, "op_" + op["op"])(op, env, weights)

    def op_embed(self, op, env, weights) -> None:
        tokens = env["tokens"]
        name = op["w"][0]
        t = self.archive.tensors[name]
        x = np.empty((len(tokens), t.shape[-1]), dtype=np.float32)
        for part_idx, p in enumerate(t.parts):
            mask = (tokens >= p.row_start) & (tokens < p.row_end)
            if mask.any():
                with weights.part(op, name, part_idx) as arr:
                    x[mask] = arr[tokens[mask] - p.row_start]
        env[op["out"]] = x

    def op_rms_norm(self, op, env, weights) -> None:
        a = op["attrs"]
        with weights.part(op, op["w"][0], 0) as w:
            env[op["out"]] = ops.rms_norm(env[op["in"][0]], w, a["eps"], a.get("group"))

    def op_linear(self, op, env, weights) -> None:
        x = env[op["in"][0]]
        name = op["w"][0]
        t = self.archive.tensors[name]
        y = np.empty((x.shape[0], t.shape[0]), dtype=np.float32)
        for part_idx, p in enumerate(t.parts):
            with weights.part(op, name, part_idx) as w:
                np.matmul(x, w.T, out=y[:, p.row_start:p.row_end])
        if len(op["w"]) > 1:
            with weights.part(op, op["w"][1], 0) as b:
                y += b
        env[op["out"]] = y

    def op_rope(self, op, env, weights) -> None:
        a = op["attrs"]
        key = ("rope", a["rope_dim"], a["theta"], id(a.get("freq_factors")))
        cache = env.setdefault("_rope", {})
        if key not in cache:  # once per forward pass: every layer rotates by the same angles
            cos, sin = ops.rope_tables(env["positions"], a["rope_dim"], a["theta"], a.get("freq_factors"))
            cache[key] = cos, sin, ops.rope_rotation(cos, sin)
        cos, sin, rot = cache[key]
        env[op["out"]] = ops.rope(env[op["in"][0]], cos, sin, a["n_heads"], a["head_dim"], a["rope_dim"], a["mode"], rot)

    def op_attention(self, op, env, weights) -> None:
        a = op["attrs"]
        q, k, v = (env[n] for n in op["in"])
        seqs = env["seqs"]
        out = np.empty_like(q) if len(seqs) > 1 else None
        for r0, r1, pos0, kv in seqs:
            kc, vc = kv[a["layer"]]
            kc[pos0:pos0 + r1 - r0] = k[r0:r1]
            vc[pos0:pos0 + r1 - r0] = v[r0:r1]
            o = ops.attention(q[r0:r1], kc, vc, pos0, a["n_heads"], a["n_kv_heads"], a["head_dim"], a["scale"])
            if out is None:
                out = o  # one sequence: its rows are the whole output, no copy
            else:
                out[r0:r1] = o
        env[op["out"]] = out

    def op_add(self, op, env, weights) -> None:
        a, b = (env[n] for n in op["in"])
        if op["out"] == op["in"][0] and a.flags.writeable and a.base is None:
            np.add(a, b, out=a)  # the residual stream: its old value is overwritten by name anyway
        else:
            env[op["out"]] = a + b

    def op_swiglu(self, op, env, weights) -> None:
        g, u = (env[n] for n in op["in"])
        env[op["out"]] = ops.swiglu(g, u)

    def op_last_token(self, op, env, weights) -> None:
        x = env[op["in"][0]]
        env[op["out"]] = x[[r1 - 1 for _, r1, _, _ in env["seqs"]]]
