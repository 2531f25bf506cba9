"""Streamed packs kept in pinned system memory (vk/host_cache.py), on lavapipe made to act like a
discrete GPU (its device memory staged, not written in place)."""

from __future__ import annotations

import make_synthetic as ms
import numpy as np
import pytest
from vk_helpers import assert_device_peak_within, greedy, rel_err
from vkpack.compiler.build import build
from vkpack.runtime import vk
from vkpack.runtime.engine import Engine
from vkpack.runtime.vk.host_cache import HostPackCache
from vkpack.runtime.vk.memory import MemoryMixin

ok, why = vk.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"no Vulkan: {why}")


@pytest.fixture
def discrete(monkeypatch):
    """Device memory is never written in place: uploads go through staging, as on a discrete GPU."""
    monkeypatch.setattr(MemoryMixin, "_in_place", lambda self, type_index: False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("hc")
    spec = ms.Spec(layers=8, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=1024, std=0.1)
    src = ms.write_gguf(d / "m.gguf", spec, dtype="F16", seed=11)
    build(src, d / "m.vkpack", max_pack_mb=1, progress=False)
    with Engine(d / "m.vkpack", device="numpy") as c:
        ids = c.encode("pinned packs stream again")
        tokens = greedy(c, ids, 8)
        yield d / "m.vkpack", ids, c.logits(ids), tokens, c.model_bytes


def _run(path, ids, model_bytes, ram_gb=None):
    """Greedy tokens and logits under a VRAM budget that holds a fifth of the packs besides the
    minimum (staging slots count as VRAM on lavapipe's one device-local heap)."""
    with Engine(path, device="vulkan") as probe:
        floor = probe.min_bytes
    vram_gb = (floor + model_bytes / 5) / 2**30
    with Engine(path, device="vulkan", vram_gb=vram_gb, ram_gb=ram_gb) as g:
        assert g.tier.budget < g.model_bytes
        logits = g.logits(ids)
        tokens = greedy(g, ids, 8)
        hc = g.backend.host_cache
        seen = None if hc is None else {"hits": hc.hits, "packs": len(hc.entries), "used": hc.used, "full": hc.full}
        assert_device_peak_within(g, vram_gb)
        return logits, tokens, seen, g.stats()


def test_streamed_packs_reload_from_pinned_memory(model, discrete):
    path, ids, ref_logits, ref_tokens, model_bytes = model
    logits, tokens, hc, st = _run(path, ids, model_bytes)
    assert hc is not None and hc["hits"] > 0         # later passes copied packs from the cache
    assert hc["packs"] > 0 and hc["used"] <= model_bytes
    assert rel_err(logits, ref_logits) < 1e-3
    assert tokens == ref_tokens
    assert st["peak_ram_bytes"] >= hc["used"] > 0    # pinned memory is reported as RAM in use


def test_ram_budget_bounds_the_pinned_memory(model, discrete):
    path, ids, ref_logits, ref_tokens, model_bytes = model
    ram = model_bytes // 3
    logits, tokens, hc, st = _run(path, ids, model_bytes, ram_gb=ram / 2**30)
    assert hc["full"] and 0 < hc["used"] <= ram       # admitted until full, the rest streams from the file
    assert hc["hits"] > 0
    assert st["peak_ram_bytes"] <= st["ram_budget"]
    assert tokens == ref_tokens
    assert rel_err(logits, ref_logits) < 1e-3


def test_no_pinned_copy_where_device_memory_is_host_memory(model, dev):
    path, ids, *_, model_bytes = model
    if not dev._in_place(dev.memory_type["device"]):
        pytest.skip("this device's memory is staged")
    _, _, hc, _ = _run(path, ids, model_bytes)
    assert hc is None


def test_cache_round_trips_bytes_and_stops_at_its_budget(dev):
    hc = HostPackCache(dev, budget=3 << 20, block_bytes=2 << 20)
    rng = np.random.default_rng(0)
    data = {p: rng.integers(0, 256, (700 << 10) + 13 * p, dtype=np.uint8) for p in range(5)}
    placed = []
    for p, d in data.items():
        room = hc.reserve(len(d))
        if room is None:
            break
        np.copyto(hc.host_view(room[0], room[1], len(d)), d)
        hc.commit(p, room[0], room[1], len(d))
        placed.append(p)
    assert hc.full and 2 <= len(placed) < len(data) and hc.used <= 3 << 20
    assert hc.reserve(1) is None                   # once full, nothing more is admitted
    dst = dev.alloc(1 << 20)
    for p in placed:
        hc.copy_to(p, dst, 64)
        got = np.frombuffer(dev.download(dst, len(data[p]), 64), dtype=np.uint8)
        assert np.array_equal(got, data[p])
    dst.destroy()
    hc.close()
    assert hc.used == 0 and not hc.entries


def test_compressed_packs_are_not_decompressed_again(tmp_path, discrete):
    """A compressed pack's decoded bytes stay in the pinned cache: reloads read and decompress nothing
    (the RAM tier of decoded bytes is off while the cache holds them)."""
    spec = ms.Spec(layers=8, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=1024, std=0.1)
    build(ms.write_gguf(tmp_path / "m.gguf", spec, dtype="F16", seed=3), tmp_path / "z.vkpack",
          codec="blosc2-zstd", max_pack_mb=1, progress=False)
    with Engine(tmp_path / "z.vkpack", device="numpy") as c:
        ids = c.encode("compressed packs, pinned once")
        ref = greedy(c, ids, 6)
    with Engine(tmp_path / "z.vkpack", device="vulkan") as probe:
        floor, mb = probe.min_bytes, probe.model_bytes
    with Engine(tmp_path / "z.vkpack", device="vulkan", vram_gb=(floor + mb / 5) / 2**30) as g:
        assert any(p.codec != "none" for p in g.archive.packs)
        g.generate(ids, max_tokens=2, temperature=0, ignore_eos=True)   # every pack loaded (and cached) once
        m = g.metrics
        read0, dec0, up0 = m.bytes_read, m.bytes_decompressed, m.bytes_uploaded
        assert greedy(g, ids, 6) == ref
        assert m.bytes_uploaded > up0 and g.tier.evictions > 0        # packs did stream again
        assert (m.bytes_read, m.bytes_decompressed) == (read0, dec0)  # from pinned memory, not the archive
