"""The engine-backend contract (runtime/backend.py) is all the engine needs: a third backend, written
here from the contract alone, runs whole models, resident and streamed, and matches the numpy backend."""

from __future__ import annotations

import inspect
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.runtime import engine, graph, kv, prefetch, tiers
from vkpack.runtime.backend import Backend, Backing, PassInputs, Placement
from vkpack.runtime.cpu import ops
from vkpack.runtime.cpu.dequant import dequantize
from vkpack.runtime.engine import Engine


@pytest.fixture(scope="module", params=["llama-Q8_0", "qwen3-F16"])
def small_archive(request, tmp_path_factory):
    """A llama (Q8_0 GGUF) and a qwen3 (q/k norms, biases absent; F16 safetensors), 1 MiB packs."""
    arch, dtype = request.param.split("-")
    d = tmp_path_factory.mktemp(arch)
    spec = ms.Spec(arch=arch, layers=4, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=512, std=0.1)
    src = (ms.write_gguf(d / "m.gguf", spec, dtype=dtype, seed=3) if arch == "llama"
           else ms.write_hf(d / "m", spec, dtype=dtype, seed=3))
    build(src, d / "m.vkpack", max_pack_mb=1, progress=False)
    return d / "m.vkpack"


class _Blocks:
    """The tier's blocks as numpy bytes."""

    def __init__(self, sizes: list[int]):
        self.blocks = [np.zeros(n, dtype=np.uint8) for n in sizes]

    def view(self, a):
        return self.blocks[a.block][a.offset:a.offset + a.requested]

    def close(self) -> None:
        self.blocks = []


class CountingBackend:
    """Dequantized f32 weights, one numpy call per op, and a count of every contract call."""

    name = "counting"
    max_block = 1 << 28
    load_workers = 1
    reserved_bytes = 0

    def __init__(self, archive):
        self.archive = archive
        self.calls: Counter[str] = Counter()
        self.slices: dict[int, list] = {}
        for t in archive.tensors.values():
            for p in t.parts:
                self.slices.setdefault(p.pack, []).append((t, p))
        self.widths = archive.activation_widths
        self.closed = False

    def _n(self, t, p) -> int:
        return t.shape[0] if len(t.shape) == 1 else (p.row_end - p.row_start) * t.shape[-1]

    def make_backing(self, block_sizes):
        self.calls["make_backing"] += 1
        return _Blocks(block_sizes)

    def pack_bytes(self, pack: int) -> int:
        return sum(-(-4 * self._n(t, p) // 256) * 256 for t, p in self.slices.get(pack, [])) or 256

    def activation_bytes(self, tokens: int, n_ctx: int) -> int:
        return 4 * tokens * (sum(self.widths.values()) + 64 * n_ctx)

    def session_activation_bytes(self, tokens: int, n_ctx: int) -> int:
        return self.activation_bytes(tokens, n_ctx)

    def kv_rows(self, n_ctx: int) -> int:
        return n_ctx

    def attach(self, tier, placement: Placement):
        self.calls["attach"] += 1
        self.placement = placement
        return placement.ram_budget

    def load(self, pack: int, source, dest):
        self.calls["load"] += 1
        raw = memoryview(source.decoded())
        out, off = {}, 0
        for t, p in self.slices.get(pack, []):
            n = self._n(t, p)
            shape = t.shape if len(t.shape) == 1 else (p.row_end - p.row_start, t.shape[-1])
            arr = dest[off:off + 4 * n].view(np.float32).reshape(shape)
            arr[...] = dequantize(t.dtype, raw[p.offset:p.offset + p.nbytes], shape)
            out[(t.name, p.row_start)] = arr
            off += -(-4 * n // 256) * 256
        return out

    def kv_view(self, mem, n_ctx: int, width: int):
        return mem[:4 * n_ctx * width].view(np.float32).reshape(n_ctx, width)

    def copy_kv(self, src, dst, n: int) -> None:
        self.calls["copy_kv"] += 1
        for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
            dk[:n], dv[:n] = sk[:n], sv[:n]

    def host_steps(self, tokens: int) -> frozenset[int]:
        return frozenset()

    def placement(self) -> dict:
        return {}

    def forward(self, inputs: PassInputs, weights) -> np.ndarray:
        self.calls["forward"] += 1
        act = {"tokens": inputs.tokens, "positions": inputs.positions}
        for si, step in enumerate(self.archive.graph["steps"]):
            for oi, op in enumerate(step["ops"]):
                self.calls["op_" + op["op"]] += 1
                act[op["out"]] = self._op(op, act, inputs, lambda name, i=0, s=si, o=oi: weights.part(s, o, name, i))
        return act[inputs.output]

    def _op(self, op, act, inputs, part):
        a, x = op["attrs"], [act[n] for n in op["in"]]
        kind = op["op"]
        if kind == "embed":
            t = self.archive.tensors[op["w"][0]]
            y = np.zeros((len(inputs.tokens), t.shape[-1]), np.float32)
            for i, p in enumerate(t.parts):
                rows = (inputs.tokens >= p.row_start) & (inputs.tokens < p.row_end)
                if rows.any():
                    with part(t.name, i) as w:
                        y[rows] = w[inputs.tokens[rows] - p.row_start]
            return y
        if kind == "rms_norm":
            with part(op["w"][0]) as w:
                return ops.rms_norm(x[0], w, a["eps"], a.get("group"))
        if kind == "linear":
            t = self.archive.tensors[op["w"][0]]
            y = np.zeros((x[0].shape[0], t.shape[0]), np.float32)
            for i, p in enumerate(t.parts):
                with part(t.name, i) as w:
                    y[:, p.row_start:p.row_end] = x[0] @ w.T
            if len(op["w"]) > 1:
                with part(op["w"][1]) as b:
                    y += b
            return y
        if kind == "rope":
            cos, sin = ops.rope_tables(inputs.positions, a["rope_dim"], a["theta"], a.get("freq_factors"))
            return ops.rope(x[0], cos, sin, a["n_heads"], a["head_dim"], a["rope_dim"], a["mode"])
        if kind == "attention":
            out = np.zeros_like(x[0])
            for r0, r1, pos0, cache in inputs.seqs:
                kc, vc = cache[a["layer"]]
                kc[pos0:pos0 + r1 - r0], vc[pos0:pos0 + r1 - r0] = x[1][r0:r1], x[2][r0:r1]
                out[r0:r1] = ops.attention(x[0][r0:r1], kc, vc, pos0, a["n_heads"], a["n_kv_heads"],
                                           a["head_dim"], a["scale"])
            return out
        if kind == "add":
            return x[0] + x[1]
        if kind == "swiglu":
            return ops.swiglu(x[0], x[1])
        if kind == "last_token":
            return x[0][[r1 - 1 for _, r1, _, _ in inputs.seqs]]
        raise AssertionError(f"op {kind} not in the contract test")

    def host_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.calls["close"] += 1
        self.closed = True


def _greedy(eng: Engine, ids: list[int], n: int) -> list[int]:
    out = []
    with eng.kv_session(len(ids) + n) as cache:
        logits = eng.forward_batch([(ids, 0, cache)])[0]
        for i in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = eng.forward_batch([([tok], len(ids) + i, cache)])[0]
    return out


def test_the_counting_backend_implements_the_whole_contract(small_archive):
    with Engine(small_archive, device="numpy") as eng:
        backend = CountingBackend(eng.archive)
        assert isinstance(backend, Backend) and isinstance(eng.backend, Backend)
        assert isinstance(_Blocks([256]), Backing) and isinstance(eng.tier.backing, Backing)


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_a_backend_written_from_the_contract_runs_the_model(small_archive, streamed):
    made: list[CountingBackend] = []

    def factory(archive):
        made.append(CountingBackend(archive))
        return made[-1]

    with Engine(small_archive, device="numpy") as ref:
        ids = ref.encode("a backend from the contract alone")
        want_logits, want = ref.logits(ids), _greedy(ref, ids, 8)
        vram = ref.min_bytes / 2**30 * 1.5 if streamed else None
    with Engine(small_archive, device=factory, vram_gb=vram, prefetch_lookahead=2) as eng:
        backend = made[0]
        assert eng.backend is backend and backend.placement.resident is not streamed
        got = eng.logits(ids)
        # same reference kernels, different op loop and weight layout: fp32 rounding only
        assert np.max(np.abs(got - want_logits)) / np.max(np.abs(want_logits)) < 1e-5
        assert _greedy(eng, ids, 8) == want
        n_ops = sum(len(s["ops"]) for s in eng.archive.graph["steps"])
        assert backend.calls["forward"] == 1 + 9
        assert sum(v for k, v in backend.calls.items() if k.startswith("op_")) == 10 * n_ops
        packs = len(eng.archive.packs)
        if streamed:
            assert eng.tier.evictions > 0 and backend.calls["load"] > packs
        else:  # resident: every pack loaded once, at start
            assert backend.calls["load"] == packs
    assert backend.closed and backend.calls["close"] == 1


def test_the_engine_side_never_probes_the_backend():
    """No hasattr/getattr on the backend in the engine, the executor, the loader, KV sessions or tiers."""
    for mod in (engine, graph, prefetch, kv, tiers):
        src = inspect.getsource(mod)
        probes = re.findall(r"(?:hasattr|getattr)\([^)]*backend[^)]*\)", src)
        assert not probes, (Path(mod.__file__).name, probes)
        assert "hasattr(" not in src, Path(mod.__file__).name


def _contract_members() -> set[str]:
    return set(Backend.__annotations__) | {n for n in vars(Backend) if not n.startswith("_")}


def test_every_backend_class_defines_every_member_of_the_contract():
    from vkpack.runtime.cpu.backend import CpuBackend
    from vkpack.runtime.vk.backend import VulkanBackend  # importing needs no Vulkan device

    members = _contract_members()
    assert {"load", "forward", "kv_view", "attach", "pack_bytes", "activation_bytes", "close", "name"} <= members
    for cls in (CpuBackend, VulkanBackend, CountingBackend):
        missing = [m for m in members if not any(m in vars(k) or m in getattr(k, "__annotations__", {})
                                                  for k in cls.__mro__ if k is not object)]
        assert not missing, (cls.__name__, missing)
