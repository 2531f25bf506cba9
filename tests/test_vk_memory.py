"""Device memory as allocated, not as the engine's books say: every vkAllocateMemory is counted
(`Device.allocated_bytes`), and an engine's peak of device-local bytes must fit its --vram-gb.

On lavapipe all memory is one device-local heap, so the io, readback and staging buffers count as
VRAM there, as the backend's `reserved_bytes` assumes."""

from __future__ import annotations

import json
from contextlib import ExitStack

import make_synthetic as ms
import numpy as np
import pytest
from vk_helpers import GIB, assert_device_peak_within, greedy
from vkpack.compiler.build import build
from vkpack.runtime import vk as gpu
from vkpack.runtime.engine import Engine
from vkpack.runtime.tiers import BudgetError
from vkpack.runtime.vk.memory import KINDS, MemoryMixin

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")


def _live(dev) -> dict[bool, int]:
    return {local: dev.allocated_bytes(local) for local in (True, False)}


# ---- the accounting ----

def test_every_allocation_and_free_is_counted(dev):
    before = _live(dev)
    blocks = [dev.alloc_block(n, kind) for n, kind in zip((1 << 20, 3 << 16, 5 << 12), KINDS, strict=True)]
    own = dev.alloc(12345, "device")                       # a buffer with a block of its own
    want = {True: 0, False: 0}
    for b in (*blocks, own.block):
        want[dev.info.memory_types[b.type_index].device_local] += b.size
    assert {k: v - before[k] for k, v in _live(dev).items()} == want
    assert want[True] >= (1 << 20) + 12345                 # "device" memory is device-local everywhere
    with pytest.raises(gpu.VulkanError, match="maxMemoryAllocationSize"):
        dev.alloc_block(dev.info.max_memory_allocation_size + 1)
    assert {k: v - before[k] for k, v in _live(dev).items()} == want   # a refused allocation counts nothing
    for b in blocks:
        b.destroy()
    own.destroy()
    own.destroy()                                          # twice: freed once, counted once
    assert _live(dev) == before
    assert all(dev.peak_allocated_bytes(k) >= before[k] + want[k] for k in (True, False))


def test_staging_slots_are_counted(dev, monkeypatch):
    """Staged copies allocate slots on first use: they show up like any other memory."""
    monkeypatch.setattr(dev, "direct_copies", False)
    monkeypatch.setattr(dev, "STAGING_SLOT_BYTES", 64 << 10)
    buf = dev.alloc(1 << 20)
    before = _live(dev)
    dev.upload(buf, bytes(buf.size))
    assert dev.download(buf, 16) == bytes(16)
    slots = sum(s.buf.block.size for p in dev._staging.values() for s in p.slots)
    assert slots > 0 and sum(_live(dev).values()) - sum(before.values()) == slots
    dev._close_memory()
    assert _live(dev) == before
    buf.destroy()


def test_close_frees_every_byte(tmp_path, monkeypatch):
    monkeypatch.setenv("VKPACK_CACHE", str(tmp_path))
    d = gpu.Device()
    d.alloc_block(1 << 20)
    d.alloc(4096, "upload")
    d.upload(d.alloc(64), b"x" * 64)
    d.close()
    assert _live(d) == {True: 0, False: 0}
    assert d.peak_allocated_bytes(True) + d.peak_allocated_bytes(False) >= (1 << 20) + 4096 + 64


def test_heap_usage_is_the_drivers_word(dev):
    """VK_EXT_memory_budget's usage of the main heap, sampled after each allocation; None without it."""
    if not dev.info.has_memory_budget:
        assert dev.heap_usage() is dev.peak_heap_usage() is dev.heap_usage_at_open is None
        return
    n = 64 << 20
    before = dev.heap_usage()
    block = dev.alloc_block(n)
    assert dev.heap_usage() >= before + n
    assert dev.peak_heap_usage() >= dev.heap_usage()
    block.destroy()
    assert dev.heap_usage() < dev.peak_heap_usage()


# ---- an engine under --vram-gb ----

SPEC = ms.Spec(layers=4, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=1024, std=0.1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same small model as a GGUF and as a HF folder with linear rope scaling, whose rope
    frequency factors live in a device buffer outside the tier (raw 1 MB packs: it can stream)."""
    d = tmp_path_factory.mktemp("vram")
    build(ms.write_gguf(d / "m.gguf", SPEC, dtype="F16", seed=3), d / "plain.vkpack", codec="none",
          max_pack_mb=1, progress=False)
    hf = ms.write_hf(d / "hf", SPEC, dtype="F16", seed=3)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (hf / "config.json").write_text(json.dumps(cfg))
    build(hf, d / "rope-scaled.vkpack", codec="none", max_pack_mb=1, progress=False)
    return {"plain": d / "plain.vkpack", "rope-scaled": d / "rope-scaled.vkpack"}


def _streaming_vram(path) -> int:
    """A budget (bytes, a multiple of 256) that holds the minimum and a third of the model."""
    with Engine(path, device="vulkan") as probe:
        return (probe.min_bytes + probe.model_bytes // 3) // 256 * 256


def _staged(monkeypatch):
    """Copies through staging slots, as on a discrete GPU (on lavapipe the slots are VRAM)."""
    init = MemoryMixin._init_memory

    def staged(self):
        init(self)
        self.direct_copies, self.STAGING_SLOT_BYTES = False, 256 << 10

    monkeypatch.setattr(MemoryMixin, "_init_memory", staged)


@pytest.mark.parametrize("model,copies,extra", [
    ("plain", "direct", 0),
    ("plain", "staged", 0),
    ("rope-scaled", "direct", 0),
    ("plain", "direct", 171),   # a --vram-gb that is not a multiple of the tier's 256-byte granule
], ids=["plain", "staged", "rope-scaled", "vram-not-256-aligned"])
def test_streaming_engine_allocates_at_most_vram_gb(models, monkeypatch, model, copies, extra):
    """The device-local bytes the engine really allocated, at their peak, fit --vram-gb while it
    streams: the tier's blocks and everything outside them (io, readback, staging, rope factors)."""
    if copies == "staged":
        _staged(monkeypatch)
    path = models[model]
    vram_gb = (_streaming_vram(path) + extra) / GIB
    # ram_gb=0: no pinned pack cache (on lavapipe staged, "system memory" is the device-local heap too)
    with Engine(path, device="vulkan", vram_gb=vram_gb, ram_gb=0) as eng:
        greedy(eng, eng.encode("the budget is a physical fact"), 6)
        assert eng.tier.evictions > 0, "the model did not stream"
        dev = eng.backend.dev
        if dev.info.unified_memory:   # the io and readback buffers are device-local too: counted beside the tier
            assert dev.peak_allocated_bytes(device_local=True) > eng.tier.budget
        assert_device_peak_within(eng, vram_gb)


def test_batch_of_many_sequences_stays_within_vram_gb(models):
    """More sequences in one pass than the readback buffer holds (READBACK_ROWS): the rows come back
    in several copies, and no buffer grows outside the budget (VRAM where readback memory is device-local)."""
    path = models["plain"]
    n_seqs = 17
    with Engine(path, device="vulkan") as probe:
        vram = (probe.min_bytes + 2 * probe.model_bytes + n_seqs * probe.session_bytes(16)) // 256 * 256
    with Engine(path, device="vulkan", vram_gb=vram / GIB) as eng, ExitStack() as stack:
        ids = eng.encode("many at once")[:3]
        kvs = [stack.enter_context(eng.kv_session(16)) for _ in range(n_seqs)]
        out = eng.forward_batch([(ids, 0, kv) for kv in kvs])
        assert out.shape == (n_seqs, SPEC.vocab)
        np.testing.assert_allclose(out, np.broadcast_to(out[0], out.shape), rtol=1e-5, atol=1e-5)  # same inputs
        assert_device_peak_within(eng, vram / GIB)


LONG = ms.Spec(layers=4, hidden=512, heads=4, kv_heads=2, ffn=1024, vocab=1024, std=0.1, context=16384)


def test_streamed_batch_whose_sessions_take_most_of_the_budget(tmp_path):
    """Streaming, with sessions whose KV caches take most of --vram-gb: the steps pinned in flight are bounded
    by the room the sessions leave (a quarter of the whole budget had pinned all of it: a BudgetError in the
    middle of the pass), and the rows still agree."""
    path = tmp_path / "m.vkpack"
    build(ms.write_gguf(tmp_path / "m.gguf", LONG, dtype="F16", seed=3), path, codec="none", max_pack_mb=1,
          progress=False)
    n_seqs, rows = 8, 1024
    with Engine(path, device="vulkan", context=LONG.context) as probe:
        vram = probe.min_bytes + probe.model_bytes // 3
        per_session = probe.session_bytes(rows)
    vram_gb = (vram + n_seqs * per_session) / GIB
    with Engine(path, device="vulkan", vram_gb=vram_gb, context=LONG.context) as eng, ExitStack() as stack:
        assert not eng.backend.resident
        ids = eng.encode("many sessions, little room")[:3]
        kvs = [stack.enter_context(eng.kv_session(rows)) for _ in range(n_seqs)]
        assert sum(a.size for a in eng.tier.allocator.allocations() if a.tag == "kv") > 0.6 * eng.tier.budget
        out = eng.forward_batch([(ids, 0, kv) for kv in kvs])
        np.testing.assert_allclose(out, np.broadcast_to(out[0], out.shape), rtol=1e-5, atol=1e-5)
        assert eng.tier.evictions > 0, "the model did not stream"
        assert_device_peak_within(eng, vram_gb)


def test_resident_model_refuses_a_session_rather_than_evict_its_weights(models):
    """A resident model stays resident: sessions beyond the budget's free room get a BudgetError when they
    open (the server waits for one to end) instead of evicting packs that every pass pins whole (SmolLM2's
    shape: the 8th session of 1,024 rows evicted 52 packs, then the batch's pass failed)."""
    path = models["plain"]
    with Engine(path, device="vulkan") as eng, ExitStack() as stack:
        assert eng.backend.resident and eng.tier.keep_packs
        kvs = []
        with pytest.raises(BudgetError, match="beside the resident model"):
            for _ in range(1000):
                kvs.append(stack.enter_context(eng.kv_session(2048)))
        assert len(kvs) >= 1 and eng.tier.evictions == 0
        ids = eng.encode("still resident")[:3]
        out = eng.forward_batch([(ids, 0, kv) for kv in kvs])
        np.testing.assert_allclose(out, np.broadcast_to(out[0], out.shape), rtol=1e-5, atol=1e-5)
        assert eng.tier.evictions == 0
