"""Device, memory, copies, errors, leak accounting and the no-Vulkan fallback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from vk_helpers import Arena
from vkpack.pack_format.errors import VkpackError
from vkpack.runtime import vk as gpu
from vkpack.runtime.vk import _lib

OK, WHY = gpu.available()
needs_vulkan = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")


def test_import_without_vulkan_package_falls_back():
    """With the `vulkan` package unimportable, the backend still imports and says why."""
    code = ("import sys; sys.modules['vulkan'] = None\n"
            "from vkpack.runtime import vk\n"
            "ok, why = vk.available()\n"
            "assert ok is False and 'vulkan' in why, why\n"
            "try:\n    vk.Device()\nexcept vk.VulkanUnavailable as e:\n    print('unavailable:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "unavailable:" in r.stdout


def test_available_shape():
    ok, why = gpu.available()
    assert isinstance(ok, bool) and isinstance(why, str) and why



@pytest.fixture(scope="module")
def dev():
    if not OK:
        pytest.skip(f"no Vulkan device: {WHY}")
    d = gpu.Device()
    yield d
    d.close()


@needs_vulkan
def test_device_info(dev):
    i = dev.info
    assert i.type in ("discrete", "integrated", "virtual", "cpu", "other")
    assert i.api_version >= (1, 2, 0)
    assert i.max_storage_buffer_range > 0 and i.max_memory_allocation_size > 0
    assert i.subgroup_size >= 1 and i.min_storage_buffer_offset_alignment >= 1
    assert i.heaps and i.memory_types and i.main_heap.size > 0
    assert dev.transfer_queue_kind in ("dedicated-family", "second-queue", "shared")
    budget = dev.memory_budget()
    assert (budget is None) == (not i.has_memory_budget)
    if budget is not None:
        assert len(budget) == len(i.heaps)
    assert dev.buffer_alignment % 16 == 0


@needs_vulkan
def test_device_index_errors():
    with pytest.raises(gpu.VulkanError, match="out of range"):
        gpu.Device(index=99)


@needs_vulkan
@pytest.mark.parametrize("direct", [True, False])
def test_upload_download(dev, direct, monkeypatch):
    monkeypatch.setattr(dev, "direct_copies", direct)
    monkeypatch.setattr(dev, "STAGING_SLOT_BYTES", 4096)   # several chunks through the two slots
    rng = np.random.default_rng(1)
    for n, off in ((1, 0), (1000, 3), (3 * 4096 + 5, 16)):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        buf = dev.alloc(n + off + 7)
        dev.upload(buf, data, off)
        assert dev.download(buf, n, off) == data.tobytes()
        assert len(dev.download(buf)) == buf.size
        buf.destroy()
    dev._close_memory()   # staging slots were made with the small slot size


@needs_vulkan
def test_buffers_in_one_block(dev):
    a = dev.buffer_alignment
    block = dev.alloc_block(1 << 20)
    bufs = [dev.buffer(block, i * 4 * a, 3 * a) for i in range(8)]
    for i, b in enumerate(bufs):
        dev.upload(b, bytes([i]) * b.size)
    assert [dev.download(b, 1) for b in bufs] == [bytes([i]) for i in range(8)]
    with pytest.raises(gpu.VulkanError, match="multiple of"):
        dev.buffer(block, a // 2, 64)
    with pytest.raises(gpu.VulkanError, match="does not fit"):
        dev.buffer(block, (1 << 20) - a, 2 * a)
    for b in bufs:
        b.destroy()
    block.destroy()
    arena = Arena(dev, 1 << 16)
    x, y = arena.alloc(10), arena.alloc(100)
    assert y.offset % a == 0 and y.offset >= x.offset + 10
    arena.destroy()


@needs_vulkan
def test_errors_have_context(dev):
    assert issubclass(gpu.VulkanError, VkpackError)
    with pytest.raises(gpu.VulkanError, match="block size 0"):
        dev.alloc_block(0)
    with pytest.raises(gpu.VulkanError, match="maxMemoryAllocationSize"):
        dev.alloc_block(dev.info.max_memory_allocation_size + 1)
    buf = dev.alloc(64)
    with pytest.raises(gpu.VulkanError, match="outside buffer of 64 bytes"):
        dev.upload(buf, b"x" * 10, 60)
    buf.destroy()
    with pytest.raises(gpu.VulkanError, match="destroyed"):
        dev.download(buf)


@needs_vulkan
def test_call_maps_results(dev):
    vk = _lib.vk
    fence = vk.vkCreateFence(dev._dev, vk.VkFenceCreateInfo(), None)
    try:
        assert _lib.call(vk.vkWaitForFences, dev._dev, 1, [fence], True, 0) is _lib.TIMEOUT
        assert _lib.call(vk.vkGetFenceStatus, dev._dev, fence) is _lib.NOT_READY
    finally:
        vk.vkDestroyFence(dev._dev, fence, None)

    def oom():
        raise vk.VkErrorOutOfDeviceMemory()

    with pytest.raises(gpu.DeviceOutOfMemory, match="oom failed: VkErrorOutOfDeviceMemory .while testing."):
        _lib.call(oom, context="while testing")


@needs_vulkan
def test_no_leaks_create_destroy(dev):
    """Create and destroy N objects of each kind; the live handle counts return to the baseline, but
    for what the recycler keeps for the next recorder (one fence, command buffer and descriptor pool
    here: one recorder lived at a time)."""
    from vkpack.runtime.vk.recorder import recycler

    def held() -> dict[str, int]:
        r = recycler(dev)
        return {"fence": len(r.fences), "command_buffer": len(r.cmds), "descriptor_pool": len(r.dpools)}

    base, held0 = _lib.handle_counts(), held()
    for i in range(20):
        b = dev.alloc(256 + i)
        blk = dev.alloc_block(1 << 16)
        sub = dev.buffer(blk, 0, 1024)
        k = gpu.Kernel(dev, "add", 3, 4, (2,), {0: 64})
        rec = gpu.Recorder(dev, timestamps=i % 2 == 0)
        rec.dispatch(k, [sub, sub, b], (1, 1, 1), (4).to_bytes(4, "little"))
        rec.run()
        if i % 2 == 0:
            assert rec.gpu_time_s() >= 0.0
        rec.destroy()
        arena = Arena(dev, 1 << 14)
        arena.alloc(100)
        arena.destroy()
        k.destroy()
        sub.destroy()
        blk.destroy()
        b.destroy()
    kept = held()
    assert all(n <= max(1, held0[k]) for k, n in kept.items()), kept
    expect = {k: base.get(k, 0) + kept.get(k, 0) - held0.get(k, 0) for k in set(base) | set(kept)}
    assert _lib.handle_counts() == {k: v for k, v in expect.items() if v}


@needs_vulkan
def test_close_releases_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("VKPACK_CACHE", str(tmp_path))
    base = _lib.handle_counts()
    d = gpu.Device()
    ops = gpu.Ops(d)
    x = d.alloc(4096)
    rec = gpu.Recorder(d)
    ops.add(rec, x, x, x, 1024)
    rec.run()                      # nothing destroyed by hand
    d.close()
    assert _lib.handle_counts() == base
    assert list(tmp_path.glob("pipelines-*.bin")), "pipeline cache was not saved"
    d2 = gpu.Device()              # loads the saved cache
    gpu.Ops(d2).add(gpu.Recorder(d2), d2.alloc(64), d2.alloc(64), d2.alloc(64), 16)
    d2.close()
    assert _lib.handle_counts() == base


def test_committed_spirv_is_fresh():
    """Every variant's .spv exists and was built from the current .comp/.glsl (content hash)."""
    from vkpack.runtime.vk import spirv
    stale = [n for n in spirv.variants() if spirv.is_stale(n)]
    assert not stale, f"rebuild with tools/build_shaders.py: {stale}"
