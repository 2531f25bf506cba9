"""The engine on the numpy backend: budgets, eviction, errors, and no model parsing at run time."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.pack_format.errors import VkpackError
from vkpack.runtime.engine import Engine
from vkpack.runtime.tiers import BudgetError

MIB = 1 << 20


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    """A llama with enough packs (12 layers, 1 MiB packs) for eviction to matter, and a quarter of its bytes
    above the native backend's minimum (two packs, the KV cache, the GEMM's scratch)."""
    d = tmp_path_factory.mktemp("small")
    spec = ms.Spec(layers=12, hidden=256, heads=4, kv_heads=2, ffn=768, vocab=512, std=0.1)
    src = ms.write_gguf(d / "m.gguf", spec, dtype="F16", seed=5)
    out = d / "m.vkpack"
    build(src, out, max_pack_mb=1, progress=False)
    return out


def _greedy(eng: Engine, ids: list[int], n: int) -> list[int]:
    eng.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)
    return list(eng.last_ids)


def test_quarter_budget_same_tokens_and_peak_under_budget(small_archive):
    with Engine(small_archive) as full:
        ids = full.encode("hello world, this is a test")
        ref = _greedy(full, ids, 24)
        ref_logits = full.logits(ids)
        model = full.model_bytes
    for lookahead in (0, 3):
        vram = max(model // 4, 1) / 2**30
        with Engine(small_archive, vram_gb=vram, prefetch_lookahead=lookahead) as eng:
            assert eng.tier.budget < model // 2
            assert _greedy(eng, ids, 24) == ref
            np.testing.assert_array_equal(eng.logits(ids), ref_logits)
            assert eng.tier.evictions > 0  # (real device memory under budget: tests/test_vk_memory.py)


def test_graph_policy_streams_model_minus_budget_lru_streams_all(small_archive):
    per_token = {}
    for policy in ("graph", "lru"):
        probe = Engine(small_archive)
        model, kv = probe.model_bytes, probe.session_bytes(64)
        probe.close()
        budget = model // 2 + kv
        with Engine(small_archive, vram_gb=budget / 2**30, policy=policy, prefetch_lookahead=0, context=64) as eng:
            ids = eng.encode("streaming test")
            _greedy(eng, ids, 4)  # warm: the first token loads everything once
            before = eng.metrics.bytes_uploaded
            _greedy(eng, ids, 17)  # 1 prefill + 16 decode passes
            per_token[policy] = (eng.metrics.bytes_uploaded - before) / 17
    # Belady keeps a fixed resident set and streams the rest; LRU streams everything on a cycle
    assert per_token["graph"] < 0.75 * model
    assert per_token["lru"] > 0.9 * model
    assert per_token["graph"] >= (model - budget) * 0.9


def test_lru_counts_a_load_as_a_use(small_archive):
    """A pack loaded on a miss is the most recently used one: counted only on hits, a pack read once a pass
    (all of them, where a step's packs are pinned together for a native program) looked the oldest right
    after its load, and LRU evicted it first (the case above streamed 0.55x the model a token)."""
    with Engine(small_archive) as probe:
        floor = probe.min_bytes
    with Engine(small_archive, vram_gb=floor / 2**30, policy="lru", prefetch_lookahead=0) as eng:
        lru, name = eng.policy, eng.archive.graph["steps"][1]["ops"][1]["w"][0]
        pack = eng.archive.tensors[name].parts[0].pack
        assert pack not in eng.tier.entries
        eng.loader.release(eng.loader.acquire(pack, 0))
        assert lru._last[pack] == lru._clock


def test_budget_below_minimum_is_refused_with_the_minimum(small_archive):
    with pytest.raises(BudgetError, match=r"at minimum: [\d.]+ MiB"):
        Engine(small_archive, vram_gb=0.1 / 1024)


def test_prompt_longer_than_context_is_refused(small_archive):
    with Engine(small_archive, context=16) as eng, pytest.raises(VkpackError, match="context of 16"):
        eng.generate(list(range(3, 40)), max_tokens=4)


def test_corrupt_pack_named_during_generation(small_archive, tmp_path):
    data = bytearray(small_archive.read_bytes())
    with Engine(small_archive) as eng:
        victim = eng.archive.packs[3]
    data[victim.offset + 10] ^= 0xFF
    bad = tmp_path / "bad.vkpack"
    bad.write_bytes(bytes(data))
    # resident (no budget): every pack is loaded, and checked, when the engine opens
    with pytest.raises(VkpackError, match=f"pack {victim.id}"):
        Engine(bad, prefetch_lookahead=0)
    # streamed: the first pass that needs the pack names it
    with Engine(small_archive) as probe:
        budget = probe.min_bytes
    with Engine(bad, vram_gb=budget / 2**30, prefetch_lookahead=0) as eng, \
            pytest.raises(VkpackError, match=f"pack {victim.id}"):
        eng.generate("hello", max_tokens=2)


def test_seeded_sampling_repeats(small_archive):
    with Engine(small_archive) as eng:
        a = eng.generate("abc", max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
        b = eng.generate("abc", max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
        assert a == b


def test_batch_forward_equals_separate_forwards(small_archive):
    with Engine(small_archive) as eng:
        a, b = eng.encode("first sequence here"), eng.encode("second")
        la, lb = eng.logits(a), eng.logits(b)
        with eng.kv_session(32) as kva, eng.kv_session(32) as kvb:
            both = eng.executor.forward_batch([(np.asarray(a), 0, kva), (np.asarray(b), 0, kvb)])
        # BLAS blocks differently for 1 and 2 sequences: f32 rounding only
        np.testing.assert_allclose(both[0], la, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(both[1], lb, rtol=1e-4, atol=1e-4)


def test_runtime_never_imports_model_parsers(small_archive):
    code = ("import sys; from vkpack.runtime.engine import Engine; e = Engine(sys.argv[1]); "
            "e.generate('hi', max_tokens=3); "
            "bad = [m for m in ('gguf', 'safetensors') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(small_archive)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_run_streams_and_summarizes(small_archive):
    r = subprocess.run([sys.executable, "-m", "vkpack", "run", str(small_archive), "-p", "hello", "-n", "5",
                        "--temperature", "0", "--vram-gb", "0.01"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr and "Traceback" not in r.stderr


def test_cli_run_bad_budget_is_one_line(small_archive):
    r = subprocess.run([sys.executable, "-m", "vkpack", "run", str(small_archive), "-p", "x", "--vram-gb", "0.00001"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "minimum" in r.stderr
