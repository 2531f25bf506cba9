"""Decode steps as native programs (runtime/native/program.py, program.h) against the same engine op by op.

The program path computes the products with the same row kernels and the other ops with the numpy
reference's formulas in another summation order: logits within 1e-5 relative (max |a - b| over max |b|)
of the per-op native path and 1e-4 of the numpy backend, greedy tokens equal. Each test also checks that
programs ran (`programs.calls`), so that a path that silently falls back cannot pass.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.runtime import native
from vkpack.runtime.engine import Engine
from vkpack.runtime.native.program import FIELDS, P_MATMUL

ok, why = native.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"native kernels unavailable: {why}")
PROGRAM_TOL = 1e-5
NUMPY_TOL = 1e-4


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _archive(d, arch: str, dtype: str, **kw):
    spec = ms.Spec(arch=arch, layers=3, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=600, std=0.05, **kw)
    src = ms.write_gguf(d / "m.gguf", spec, dtype=dtype, seed=5)
    build(src, d / "m.vkpack", max_pack_mb=1, progress=False)
    return d / "m.vkpack"


@pytest.fixture(scope="module", params=[("llama", "Q4_K_M"), ("qwen2", "Q8_0"), ("qwen3", "F16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def archive(request, tmp_path_factory):
    """llama (rope "norm"), qwen2 (q/k/v biases, rope "neox", tied head), qwen3 (per-head q/k norms)."""
    arch, dtype = request.param
    kw = {"tied": True} if arch == "qwen2" else {}
    return _archive(tmp_path_factory.mktemp(arch), arch, dtype, **kw)


def decode(eng: Engine, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decode of n tokens after the prompt, one pass a token; the tokens and each pass's logits."""
    out, rows = [], []
    with eng.kv_session(len(ids) + n + 1) as kv:
        logits = eng.forward_batch([(ids, 0, kv)])[-1]
        for i in range(n):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = eng.forward_batch([([tok], len(ids) + i, kv)])[-1]
            rows.append(logits)
    return out, np.array(rows)


def test_program_matches_op_by_op_and_numpy(archive):
    ids = list(range(5, 25))
    with Engine(archive, device="cpu") as eng, Engine(archive, device="numpy") as ref:
        progs = eng.backend.programs
        assert progs is not None
        toks, logits = decode(eng, ids, 12)
        # resident: every layer's steps in one program a pass (the embedding and head run op by op)
        assert progs.calls == 12
        want_toks, want = decode(ref, ids, 12)
        eng.backend.programs = None
        by_op_toks, by_op = decode(eng, ids, 12)
    assert toks == by_op_toks == want_toks
    assert rel_err(logits, by_op) < PROGRAM_TOL
    assert rel_err(logits, want) < NUMPY_TOL


@pytest.mark.parametrize("flags", [("-DVKP_PORTABLE",), ("-march=haswell",)], ids=["portable", "avx2"])
def test_other_builds_run_the_same_program(archive, flags, monkeypatch):
    """The portable C and AVX2 builds of program.h (attention's dot products and exp differ per build)."""
    import platform

    if "-march=haswell" in flags and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86 build")
    kernels = native.Kernels(native.build(flags))
    monkeypatch.setattr("vkpack.runtime.native.backend.load_kernels", lambda: kernels)
    ids = list(range(5, 25))
    with Engine(archive, device="cpu") as eng, Engine(archive, device="numpy") as ref:
        assert eng.backend.kernels is kernels
        toks, logits = decode(eng, ids, 6)
        assert eng.backend.programs.calls == 6
        want_toks, want = decode(ref, ids, 6)
    assert toks == want_toks
    assert rel_err(logits, want) < NUMPY_TOL


def test_batched_sequences_of_different_lengths(archive):
    """Several sequences in one pass (a server step): 1, 2 and 3 new tokens at different positions."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 600, n).tolist() for n in (7, 4, 11)]
    new = [rng.integers(5, 600, n).tolist() for n in (1, 2, 3)]
    with Engine(archive, device="cpu") as eng:
        with eng.kv_session(32) as k0, eng.kv_session(32) as k1, eng.kv_session(32) as k2:
            kvs = [k0, k1, k2]
            eng.forward_batch([(p, 0, kv) for p, kv in zip(prompts, kvs)])
            calls = eng.backend.programs.calls
            got = eng.forward_batch([(t, len(p), kv) for t, p, kv in zip(new, prompts, kvs)])
            assert eng.backend.programs.calls == calls + 1
        eng.backend.programs = None
        want = [eng.logits(p + t) for p, t in zip(prompts, new)]
    for g, w in zip(got, want):
        assert rel_err(g, w) < PROGRAM_TOL


def test_streamed_tier_runs_a_step_at_a_time_within_its_budget(tmp_path):
    """A budget below the model: runs are single steps whose packs two of the largest hold (here the
    attention steps; the MLP steps, 4.7 MB in 1 MB packs, go op by op, part by part), and the tier never
    holds more than its budget."""
    spec = ms.Spec(layers=4, hidden=512, heads=4, kv_heads=2, ffn=1536, vocab=600, std=0.05)
    src = ms.write_gguf(tmp_path / "m.gguf", spec, dtype="F16", seed=8)
    build(src, tmp_path / "m.vkpack", max_pack_mb=1, progress=False)
    archive = tmp_path / "m.vkpack"
    ids = list(range(5, 15))
    with Engine(archive, device="cpu") as full:
        want, want_logits = decode(full, ids, 8)
        assert full.backend.programs.calls == 1 + 8
        floor, model = full.min_bytes, full.model_bytes
    with Engine(archive, device="cpu", vram_gb=(floor + model / 8) / 2**30) as small:
        assert small.tier.budget < small.model_bytes
        assert not small.backend.resident
        got, logits = decode(small, ids, 8)
        assert got == want
        assert rel_err(logits, want_logits) < PROGRAM_TOL
        # the attention steps, one program each, in the 10-token prompt's pass and the 8 decode passes
        assert small.backend.programs.calls == (1 + 8) * spec.layers
        assert small.tier.evictions > 0
        assert small.stats()["peak_device_bytes"] <= small.tier.budget
    # at the floor, a step's first pack may sit where the next one no longer fits beside it (here once, in
    # the 11 passes over a 22-row cache): that step goes op by op, and what its hold pinned is let go
    with Engine(archive, device="cpu", vram_gb=floor / 2**30, prefetch_lookahead=0) as least:
        assert decode(least, ids, 11)[0][:8] == want
        assert 0 < least.backend.programs.calls
        assert not any(e.pins for e in least.tier.entries.values())


def test_moe_steps_run_op_by_op_between_programs(tmp_path):
    """A mixture's MLP steps have no instruction (their moe op): they run op by op, the attention steps
    as programs, with the same results as all op by op."""
    spec = ms.Spec(arch="qwen3moe", layers=2, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=400, std=0.05,
                   experts=4, experts_used=2, expert_ffn=64)
    src = ms.write_gguf(tmp_path / "m.gguf", spec, dtype="F16", seed=2)
    build(src, tmp_path / "m.vkpack", max_pack_mb=1, progress=False)
    ids = list(range(5, 20))
    with Engine(tmp_path / "m.vkpack", device="cpu") as eng:
        toks, logits = decode(eng, ids, 6)
        assert eng.backend.programs.calls >= 6 * 2   # each layer's attention step, every pass
        eng.backend.programs = None
        by_op_toks, by_op = decode(eng, ids, 6)
    assert toks == by_op_toks
    assert rel_err(logits, by_op) < PROGRAM_TOL


def test_a_pass_past_the_cache_gets_the_reference_error(archive):
    """A pass whose positions the session's cache cannot hold falls back to the per-op path, whose
    check names the problem (nothing is written past the cache)."""
    with Engine(archive, device="cpu") as eng, eng.kv_session(8) as kv:
        eng.forward_batch([(list(range(5, 12)), 0, kv)])
        with pytest.raises(ValueError, match="KV rows"):
            eng.forward_batch([([5, 6], 7, kv)])


def test_the_kernel_refuses_a_malformed_table():
    """C checks what it can of each instruction before running any: a product whose row length is not
    whole blocks, or whose rows are shorter than its type needs, is refused (-1) and nothing is written."""
    kernels = native.load()
    y = np.full((1, 4), 7.0, dtype=np.float32)
    x = np.ones((1, 48), dtype=np.float32)
    w = np.zeros(4 * 34, dtype=np.uint8)
    table = np.zeros((1, FIELDS), dtype=np.int64)
    table[0, 0] = P_MATMUL
    table[0, 2:5] = [w.ctypes.data, x.ctypes.data, y.ctypes.data]
    table[0, 8:15] = [8, 34, 4, 48, 48, 4, 1]          # Q8_0: 48 columns is not whole 32-element blocks
    assert kernels.run_program(ctypes.c_void_p(table.ctypes.data), 1, 1) == -1
    table[0, 8:15] = [8, 20, 4, 32, 48, 4, 1]          # a Q8_0 row of 32 needs 34 bytes, not 20
    assert kernels.run_program(ctypes.c_void_p(table.ctypes.data), 1, 1) == -1
    assert (y == 7.0).all()
    table[0, 8:15] = [8, 34, 4, 32, 48, 4, 1]          # well formed: zero weights
    assert kernels.run_program(ctypes.c_void_p(table.ctypes.data), 1, 1) == 0
    assert (y == 0.0).all()
