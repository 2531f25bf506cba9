"""Decode steps as native programs: a run of graph steps written as one table for `vkp_program` (program.h).

Op by op, a decode step returns to Python ~10 times (norm, three products, two ropes, attention, a
product, an add): on the 2-core VM that was ~35 % of SmolLM2's token spent outside the products, and
on a 16-core host every product started the OpenMP threads anew. A program runs a run of steps (every
layer of a resident model or of a hybrid plan's CPU segment; a streamed model's steps whose packs two of
the largest hold) in one parallel region, with a barrier only where an op reads what the ones before it
wrote.

Which steps: passes of fewer than `MAX_TOKENS` tokens (decode, small batches; prefill keeps the per-op
path, whose GEMM and attention are built for many tokens) whose ops are all of rms_norm, linear (any
stored type the kernels read, optional bias), rope, attention (no softcap, no sliding window), add and
swiglu. For anything else, or arrays not as expected (a KV cache too short for the pass), the steps
run op by op as before: the same results, the reference's errors.

The table of a run is written once per (steps, tokens, sequence lengths) and kept (`Template`); a pass
fills in what changes between passes: the addresses of its activations, weights, caches and rope
tables, and the sequences' positions. Every array named in the table is allocated here or checked here
(dtype, shape, contiguity) on every pass; C trusts the table (loader.py's rule: no unchecked pointer
reaches C).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...pack_format.constants import GGML_TYPE_IDS, row_bytes
from ..cpu import ops
from .loader import BoundWeight, _addr

MAX_TOKENS = 16   # the kernels' GEMM_MIN_TOKENS: from there on products are GEMMs, and the per-op path wins
P_NORM, P_MATMUL, P_ROPE, P_KV_STORE, P_ATTN, P_ADD, P_SWIGLU = range(1, 8)
FIELDS = 18       # struct vkp_ins: op, sync, p[6], n[8], f[2] (the f's as float64 bits)
P0, N0, F0 = 2, 8, 16
SUPPORTED = {"rms_norm", "linear", "rope", "attention", "add", "swiglu"}
MAX_TEMPLATES = 256


def step_supported(step: dict[str, Any]) -> bool:
    """Whether every op of `step` has an instruction (attrs included): decided once per step."""
    for op in step["ops"]:
        a = op["attrs"]
        if op["op"] not in SUPPORTED:
            return False
        if op["op"] == "attention" and (a.get("softcap") or a.get("window") or a["head_dim"] > 512
                                        or a["n_heads"] % a["n_kv_heads"]):
            return False
        if op["op"] == "rope" and (a["mode"] not in ("norm", "neox") or op["in"][0] != op["out"]):
            return False
        if op["op"] == "linear" and len(op["w"]) > 2:
            return False
    return True


@dataclass
class Template:
    """A run's table and where each pass's addresses and positions go in it (flat indices)."""

    table: np.ndarray
    arena_floats: int
    local_idx: np.ndarray            # table slots holding arena addresses, and their byte offsets
    local_off: np.ndarray
    outs: list[tuple[str, int, int]]  # (activation, float offset in the arena, width): env after the run
    inputs: list[tuple[str, int, list[tuple[int, int]]]] = field(default_factory=list)  # (name, width, slots)
    weights: list[tuple[int, int, str, int, int, int, int, int]] = field(default_factory=list)  # slot, si, name, part,
    #                                                                      rows, cols, type id, row bytes
    vectors: list[tuple[int, int, str, int, int]] = field(default_factory=list)          # slot, si, name, size, byte offset
    caches: list[tuple[int, int, int, int, int]] = field(default_factory=list)           # slot, seq, layer, k/v, width
    positions: list[tuple[int, int]] = field(default_factory=list)                       # slot, seq
    rope: list[tuple[int, int, tuple]] = field(default_factory=list)                     # cos slot, sin slot, key
    fill_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))    # the slots above, in order


class _Writer:
    """Writes a template: instructions, and which arena slices were written since the last barrier."""

    def __init__(self, n_tok: int, widths: dict[str, int]):
        self.n_tok, self.widths = n_tok, widths
        self.rows: list[list[float]] = []
        self.dirty: set[Any] = set()
        self.arena = 0
        self.current: dict[str, tuple[Any, int]] = {}   # activation -> (its slice's key, width) as last written
        self.local: list[tuple[int, int]] = []          # (slot, byte offset) of arena addresses
        self.inputs: dict[str, list[tuple[int, int]]] = {}
        self.input_width: dict[str, int] = {}
        self.t = Template(np.zeros(0), 0, np.zeros(0), np.zeros(0), [])

    def alloc(self, name: str, width: int) -> tuple[Any, int]:
        """A new arena slice for activation `name`: its key and float offset."""
        off = self.arena
        self.arena += self.n_tok * width
        self.current[name] = (("arena", off), width)
        return ("arena", off), off

    def read(self, name: str, width: int, row: int, k: int, off_floats: int = 0) -> Any:
        """Pointer k of instruction `row` is activation `name` (+ off_floats) as last written (by this
        run, or before it: a pass input); returns the key of what is read."""
        cur = self.current.get(name)
        if cur is None:
            if self.input_width.setdefault(name, width) != width:
                raise _NotForProgram(f"{name} read at widths {self.input_width[name]} and {width}")
            self.inputs.setdefault(name, []).append((row * FIELDS + P0 + k, 4 * off_floats))
            return ("env", name)
        key, cw = cur
        if cw != width:
            raise _NotForProgram(f"{name} is {cw} wide, read as {width}")
        self.ptr_local(row, k, key[1] + off_floats)
        return key

    def add(self, op: int, reads: tuple[Any, ...], writes: tuple[Any, ...], n: list[int],
            f: tuple[float, float] = (0.0, 0.0)) -> int:
        """Append an instruction (its pointers filled by the caller); returns its row."""
        sync = bool(self.dirty.intersection(reads) or self.dirty.intersection(writes))
        if sync:
            self.dirty.clear()
        self.dirty.update(writes)
        self.rows.append([op, int(sync), 0, 0, 0, 0, 0, 0, *n, *([0] * (8 - len(n))), f[0], f[1]])
        return len(self.rows) - 1

    def read_again(self, key: Any, name: str, row: int, k: int) -> None:
        """Pointer k of instruction `row` is what `key` (an earlier `read` of `name`) named."""
        if key[0] == "env":
            self.inputs[name].append((row * FIELDS + P0 + k, 0))
        else:
            self.ptr_local(row, k, key[1])

    def ptr_local(self, row: int, k: int, off_floats: int) -> None:
        self.local.append((row * FIELDS + P0 + k, 4 * off_floats))

    def finish(self) -> Template:
        t = self.t
        table = np.zeros((len(self.rows), FIELDS), dtype=np.int64)
        fv = table.view(np.float64)
        for i, r in enumerate(self.rows):
            table[i, :F0] = r[:F0]
            fv[i, F0], fv[i, F0 + 1] = r[F0], r[F0 + 1]
        t.table = table
        t.arena_floats = max(self.arena, 1)
        t.local_idx = np.array([s for s, _ in self.local], dtype=np.int64)
        t.local_off = np.array([o for _, o in self.local], dtype=np.int64)
        t.outs = [(name, key[1], w) for name, (key, w) in self.current.items()]
        t.inputs = [(name, self.input_width[name], slots) for name, slots in self.inputs.items()]
        t.fill_idx = np.array([x[0] for x in t.weights] + [x[0] for x in t.vectors] + [x[0] for x in t.caches]
                              + [x[0] for x in t.positions] + [i for c, sn, _k in t.rope for i in (c, sn)],
                              dtype=np.int64)
        return t


class StepProgram:
    """Runs runs of supported steps of few-token passes through `vkp_program`."""

    def __init__(self, lib_program: Callable[..., int], steps: list[dict[str, Any]], tensors: dict[str, Any],
                 widths: dict[str, int], threads: int):
        self._run = lib_program
        self.steps = steps
        self.tensors = tensors
        self.widths = widths
        self.threads = threads
        self.max_tokens = MAX_TOKENS
        self.supported = [step_supported(s) for s in steps]
        self._templates: dict[tuple, Template | None] = {}
        self._rope: dict[tuple, tuple[np.ndarray, np.ndarray, int, int]] = {}
        self.calls = 0

    def begin(self) -> None:
        """A new pass: its positions differ, so do its rope tables."""
        self._rope = {}

    # ---- one pass of a run ----
    def run(self, steps: range, env: dict[str, Any], lookup: Callable[[int, str, int], Any],
            seqs: list[tuple[int, int, int, Any]]) -> bool:
        """Steps `steps` (consecutive, each `supported`) over the pass's activations `env`, weights by
        `lookup(step, name, part index)` (held by the caller meanwhile). False, with nothing written,
        where the pass's arrays are not as the table needs (the caller then runs the steps op by op)."""
        n_tok = len(env["positions"])
        key = (steps.start, steps.stop, tuple(r1 - r0 for r0, r1, _p, _kv in seqs))
        if key in self._templates:
            t = self._templates[key]
        else:
            if len(self._templates) >= MAX_TEMPLATES:
                self._templates.clear()
            t = self._templates[key] = self._write(steps, n_tok, seqs)
        if t is None:   # written before and found not writable
            return False
        table = t.table
        flat = table.reshape(-1)
        arena = np.empty(t.arena_floats, dtype=np.float32)
        flat[t.local_idx] = _addr(arena) + t.local_off
        keep: list[Any] = []
        for name, width, slots in t.inputs:
            a = env.get(name)
            if (not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != (n_tok, width)
                    or not a.flags.c_contiguous):
                return False
            p = _addr(a)
            keep.append(a)
            for slot, off in slots:
                flat[slot] = p + off
        vals: list[int] = []   # in the order of t.fill_idx: weights, vectors, caches, positions, rope
        for _slot, si, name, pi, rows, cols, type_id, rb in t.weights:
            w = lookup(si, name, pi)
            if (not isinstance(w, BoundWeight) or w.rows != rows or w.cols != cols or w._type != type_id
                    or w._rb != rb):
                return False
            vals.append(w._pw)
        for _slot, si, name, size, off in t.vectors:
            w = lookup(si, name, 0)
            if (not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 1 or w.size != size
                    or not w.flags.c_contiguous):
                return False
            keep.append(w)
            vals.append(_addr(w) + off)
        seen: dict[tuple[int, int, int], int] = {}
        for _slot, s, layer, which, width in t.caches:
            p = seen.get((s, layer, which))
            if p is None:
                r0, r1, pos0, kv = seqs[s]
                c = kv[layer][which]
                if (not isinstance(c, np.ndarray) or c.dtype != np.float32 or c.ndim != 2 or c.shape[1] != width
                        or c.shape[0] < pos0 + r1 - r0 or not c.flags.c_contiguous or not c.flags.writeable):
                    return False
                keep.append(c)
                p = seen[(s, layer, which)] = _addr(c)
            vals.append(p)
        vals += [seqs[s][2] for _slot, s in t.positions]
        for _c, _s, rkey in t.rope:
            vals += self._tables(rkey, env["positions"])
        flat[t.fill_idx] = vals
        rc = self._run(table.ctypes.data, len(table), self.threads)
        if rc != 0:
            raise ValueError(f"vkp_program rejected steps {self.steps[steps.start]['name']!r}.. (rc {rc})")
        for name, off, width in t.outs:
            env[name] = arena[off:off + n_tok * width].reshape(n_tok, width)
        self.calls += 1
        return True

    def _tables(self, key: tuple, positions: np.ndarray) -> tuple[int, int]:
        """This pass's cos and sin tables for rope attrs `key` (once per pass, as the numpy backend's)."""
        hit = self._rope.get(key)
        if hit is None:
            rope_dim, theta, factors = key
            cos, sin = ops.rope_tables(positions, rope_dim, theta, list(factors) if factors else None)
            cos, sin = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
            hit = self._rope[key] = (cos, sin, _addr(cos), _addr(sin))
        return hit[2], hit[3]

    def product(self, w: BoundWeight, x: np.ndarray, y: np.ndarray) -> None:
        """y[:, :w.rows] = x @ W.T as a one-instruction program: the way a step's products run (rows in
        chunks the threads take in turn), for products outside a program (a step op by op, the hybrid
        planner's CPU probe). x: float32 (n, cols), n < MAX_TOKENS; rows of x and y contiguous."""
        n_tok, px, ldx, py, ldy = w.operands(x, y)
        if not 0 < n_tok < MAX_TOKENS:
            raise ValueError(f"a program's product takes 1..{MAX_TOKENS - 1} rows of x, got {n_tok}")
        if w.rows == 0:
            return
        table = np.array([[P_MATMUL, 0, w._pw, px, py, 0, 0, 0, w._type, w._rb, w.rows, w.cols, ldx, ldy, n_tok,
                           0, 0, 0]], dtype=np.int64)
        if self._run(table.ctypes.data, 1, self.threads) != 0:
            raise ValueError(f"vkp_program rejected a {w.rows}x{w.cols} product of {n_tok} rows")

    # ---- writing a run's table ----
    def _write(self, steps: range, n_tok: int, seqs: list[tuple[int, int, int, Any]]) -> Template | None:
        """The run's template; None where its ops cannot be written as a table (then op by op)."""
        w = _Writer(n_tok, self.widths)
        try:
            for si in steps:
                for op in self.steps[si]["ops"]:
                    self._op(w, si, op, n_tok, seqs)
        except _NotForProgram:
            return None
        return w.finish()

    def _op(self, w: _Writer, si: int, op: dict[str, Any], n_tok: int, seqs: list[tuple[int, int, int, Any]]) -> None:
        """Append op's instructions. Each reads its inputs (as last written) before its output is
        allocated: an add's output may carry its input's name."""
        t, kind, a, r = w.t, op["op"], op["attrs"], len(w.rows)
        if kind == "rms_norm":
            width = self.widths[op["out"]]
            g = a.get("group") or width
            rin = w.read(op["in"][0], width, r, 0)
            out, off = w.alloc(op["out"], width)
            w.ptr_local(r, 2, off)
            w.add(P_NORM, (rin,), (out,), [n_tok, width, g, width, width, int(n_tok == 1 and g == width)],
                  (float(a["eps"]), float(a.get("offset") or 0.0)))
            t.vectors.append((r * FIELDS + P0 + 1, si, op["w"][0], width if g == width else g, 0))
        elif kind == "linear":
            tensor = self.tensors[op["w"][0]]
            rows, cols = tensor.shape[0], tensor.shape[-1]
            if self.widths.get(op["out"]) != rows or tensor.dtype not in GGML_TYPE_IDS:
                raise _NotForProgram(op["out"])
            type_id, rb = GGML_TYPE_IDS[tensor.dtype], row_bytes(tensor.dtype, cols)
            rin = w.read(op["in"][0], cols, r, 1)
            out, off = w.alloc(op["out"], rows)
            for pi, part in enumerate(tensor.parts):   # row parts write apart: no barrier between them
                r = len(w.rows)
                n = part.row_end - part.row_start
                if pi:
                    w.read_again(rin, op["in"][0], r, 1)
                w.ptr_local(r, 2, off + part.row_start)
                w.add(P_MATMUL, (rin,), ((out, pi),), [type_id, rb, n, cols, cols, rows, n_tok])
                t.weights.append((r * FIELDS + P0, si, op["w"][0], pi, n, cols, type_id, rb))
                if len(op["w"]) > 1:
                    t.vectors.append((r * FIELDS + P0 + 3, si, op["w"][1], rows, 4 * part.row_start))
            w.dirty.add(out)
        elif kind == "rope":
            width = a["n_heads"] * a["head_dim"]
            cur = w.current.get(op["in"][0])
            if cur is None or cur[1] != width:
                raise _NotForProgram("rope rotates in place: only an activation this run wrote")
            key = cur[0]
            w.ptr_local(r, 0, key[1])
            w.add(P_ROPE, (key,), (key,), [n_tok, a["n_heads"], a["head_dim"], a["rope_dim"],
                                          int(a["mode"] == "neox"), width])
            factors = a.get("freq_factors")
            t.rope.append((r * FIELDS + P0 + 1, r * FIELDS + P0 + 2,
                           (a["rope_dim"], a["theta"], tuple(factors) if factors else None)))
        elif kind == "attention":
            h, hk, hd = a["n_heads"], a["n_kv_heads"], a["head_dim"]
            q, k, v = op["in"]
            for s, (r0, r1, _pos0, _kv) in enumerate(seqs):   # each sequence's caches and rows: no barrier between
                r = len(w.rows)
                kk = w.read(k, hk * hd, r, 0, r0 * hk * hd)
                kv_ = w.read(v, hk * hd, r, 1, r0 * hk * hd)
                w.add(P_KV_STORE, (kk, kv_), (("kv", a["layer"], s),), [r1 - r0, 0, hk * hd, hk * hd, hk * hd])
                t.caches += [(r * FIELDS + P0 + 2, s, a["layer"], 0, hk * hd), (r * FIELDS + P0 + 3, s, a["layer"], 1, hk * hd)]
                t.positions.append((r * FIELDS + N0 + 1, s))
            r = len(w.rows)
            kqs = [w.read(q, h * hd, r + s, 0, r0 * h * hd) for s, (r0, _r1, _p, _kv) in enumerate(seqs)]
            out, off = w.alloc(op["out"], h * hd)
            for s, (r0, r1, _pos0, _kv) in enumerate(seqs):
                r = len(w.rows)
                kq = kqs[s]
                w.ptr_local(r, 3, off + r0 * h * hd)
                w.add(P_ATTN, (kq, ("kv", a["layer"], s)), ((out, s),), [r1 - r0, 0, h, hk, hd, h * hd, hk * hd, h * hd],
                      (float(a["scale"]), 0.0))
                t.caches += [(r * FIELDS + P0 + 1, s, a["layer"], 0, hk * hd), (r * FIELDS + P0 + 2, s, a["layer"], 1, hk * hd)]
                t.positions.append((r * FIELDS + N0 + 1, s))
            w.dirty.add(out)
        elif kind in ("add", "swiglu"):
            width = self.widths[op["out"]]
            ka = w.read(op["in"][0], width, r, 0)
            kb = w.read(op["in"][1], width, r, 1)
            out, off = w.alloc(op["out"], width)
            w.ptr_local(r, 2, off)
            w.add(P_ADD if kind == "add" else P_SWIGLU, (ka, kb), (out,), [n_tok * width])
        else:
            raise _NotForProgram(kind)


class _NotForProgram(Exception):
    """A run whose ops or widths the table cannot express: it runs op by op."""
