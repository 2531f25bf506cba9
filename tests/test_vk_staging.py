"""Staged and threaded host->device copies: slots, upload_file, memory-type choice, reserved bytes.

lavapipe maps its device memory, so `direct_copies = False` forces the staging path a discrete
GPU takes (slots in host memory, vkCmdCopyBuffer on the transfer queue).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import types

import make_synthetic as ms
import numpy as np
import pytest
from vk_helpers import assert_device_peak_within, greedy, rel_err
from vkpack.compiler.build import build
from vkpack.pack_format.reader import Archive
from vkpack.runtime import vk as gpu
from vkpack.runtime.vk import staging
from vkpack.runtime.vk.device import MemoryHeap, MemoryType
from vkpack.runtime.vk.memory import MemoryMixin

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")
SLOT = 64 << 10


@pytest.fixture(params=["staged", "direct"])
def copying(request, dev, monkeypatch):
    """The device with small slots, 3 copy threads and small chunks, staged or in place."""
    monkeypatch.setattr(dev, "direct_copies", request.param == "direct")
    monkeypatch.setattr(dev, "STAGING_SLOT_BYTES", SLOT)
    monkeypatch.setattr(dev, "copy_threads", 3)
    monkeypatch.setattr(staging, "MIN_CHUNK", 16 << 10)
    yield dev
    dev._close_memory()   # drop the small slots


def _rand(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("n", [1, 4095, SLOT - 1, SLOT, SLOT + 1, 5 * SLOT + 17, (1 << 20) + 3])
@pytest.mark.parametrize("off", [0, 1, 333])
def test_round_trip_bit_exact(copying, n, off):
    dev = copying
    buf = dev.alloc(n + off + 5)
    dev.upload(buf, bytes(buf.size))
    data = _rand(n, n + off)
    dev.upload(buf, data, off)
    got = dev.download(buf)
    assert got[off:off + n] == data.tobytes()
    assert got[:off] == bytes(off) and got[off + n:] == bytes(5)   # nothing written outside
    buf.destroy()


def test_sources_of_every_kind(copying):
    dev = copying
    buf = dev.alloc(4 * SLOT)
    a = np.arange(3 * SLOT // 4, dtype=np.float32).reshape(3, -1)[:, ::2]   # not contiguous
    for src in (a, a.tobytes(), memoryview(bytearray(a.tobytes())), np.float32(7.0)):
        dev.upload(buf, src, 16)
        want = np.ascontiguousarray(src).tobytes() if not isinstance(src, memoryview) else bytes(src)
        assert dev.download(buf, len(want), 16) == want
    buf.destroy()


@pytest.mark.parametrize("max_slots", [None, 2])
def test_many_threads_at_once(copying, tmp_path, monkeypatch, max_slots):
    """Eight threads upload (from memory and from a file) into one block at once; with
    max_slots=2 they queue for slots (and must not deadlock)."""
    dev = copying
    if max_slots:
        monkeypatch.setattr(dev, "upload_slots", lambda: max_slots)
    n_threads, part = 8, 3 * SLOT + 1001
    stride = -(-part // dev.buffer_alignment) * dev.buffer_alignment
    block = dev.alloc_block(n_threads * stride)
    buf = dev.buffer(block, 0, n_threads * stride)
    dev.upload(buf, bytes(buf.size))
    want = np.zeros(buf.size, np.uint8)
    path = tmp_path / "src.bin"
    file_data = _rand(n_threads * part + 7, 99)
    file_data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    start = threading.Barrier(n_threads)
    errors = []

    def work(i: int) -> None:
        try:
            start.wait()
            for rep in range(3):
                if (i + rep) % 2:
                    data = _rand(part, 10 * i + rep)
                    dev.upload(buf, data, i * stride)
                else:
                    dev.upload_file(buf, fd, 7 + i * part, part, i * stride)
        except BaseException as e:
            errors.append(e)

    for i in range(n_threads):
        want[i * stride:i * stride + part] = (_rand(part, 10 * i + 2) if i % 2 else file_data[7 + i * part:7 + (i + 1) * part])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "copies hung"
    finally:
        os.close(fd)
    assert not errors, errors
    assert dev.download(buf) == want.tobytes()
    if not dev._direct(block):
        pool = dev._pool("upload")
        assert len(pool.slots) <= (max_slots or dev.upload_slots()) and len(pool.free) == len(pool.slots)
    buf.destroy()
    block.destroy()


@pytest.mark.parametrize("file_off,n,dst_off", [(0, 1, 0), (13, 200001, 5), (SLOT - 1, 2 * SLOT + 3, 64),
                                                  ((1 << 20) - 7, 7, 0)])
def test_upload_file_odd_offsets(copying, tmp_path, file_off, n, dst_off):
    dev = copying
    data = _rand(1 << 20, 3)
    (tmp_path / "f.bin").write_bytes(data.tobytes())
    buf = dev.alloc(n + dst_off + 3)
    dev.upload(buf, bytes(buf.size))
    with open(tmp_path / "f.bin", "rb") as f:
        dev.upload_file(buf, f.fileno(), file_off, n, dst_off)
    got = dev.download(buf)
    assert got[dst_off:dst_off + n] == data[file_off:file_off + n].tobytes()
    assert got[:dst_off] == bytes(dst_off) and got[dst_off + n:] == bytes(3)
    buf.destroy()


def test_upload_file_errors(copying, tmp_path):
    dev = copying
    (tmp_path / "f.bin").write_bytes(bytes(1000))
    buf = dev.alloc(4096)
    with open(tmp_path / "f.bin", "rb") as f:
        fd = f.fileno()
        for file_off, n, dst_off, what in ((-1, 10, 0, "outside file"), (990, 11, 0, "outside file of 1000"),
                                           (1001, 0, 0, "outside file"), (0, 10, 4090, "outside buffer"),
                                           (0, -1, 0, "outside buffer"), (0, 10, -1, "outside buffer")):
            with pytest.raises(gpu.VulkanError, match=what):
                dev.upload_file(buf, fd, file_off, n, dst_off)
        dev.upload_file(buf, fd, 1000, 0)   # empty read at the end is fine
        with pytest.raises(gpu.VulkanError, match="file ends"):
            staging.pread_into(fd, bytearray(20), 990)
    buf.destroy()
    with pytest.raises(gpu.VulkanError, match="destroyed"):
        dev.upload_file(buf, os.open(os.devnull, os.O_RDONLY), 0, 0)


def test_failed_chunk_raises_and_frees_slots(copying):
    """An error in one thread's chunk reaches the caller; every slot goes back to the pool."""
    dev = copying
    buf = dev.alloc(8 * SLOT)

    def fill(out, pos, m):
        if pos >= 3 * SLOT:
            raise OSError("disk on fire")
        out[:] = 1

    in_place = dev._direct(buf.block)   # a discrete GPU's VRAM is staged even with direct_copies
    pool = None if in_place else dev._pool("upload")
    direct = np.frombuffer(buf.view(), np.uint8) if in_place else None
    job = staging.Job(8 * SLOT, SLOT // 2, fill, direct=direct, pool=pool, dst=buf._buf)
    with pytest.raises(OSError, match="disk on fire"):
        staging.run(dev, job, 3)
    if pool:
        assert len(pool.free) == len(pool.slots) and all(not s.busy for s in pool.slots)
    buf.destroy()


# ---- memory types (a discrete GPU simulated on the real device's info) ----

NV_HEAPS = (MemoryHeap(0, 80 << 30, True), MemoryHeap(1, 128 << 30, False))
NV_TYPES = (MemoryType(0, 0, True, False, False, False),   # VRAM
            MemoryType(1, 1, False, True, True, False),    # system, write-combined
            MemoryType(2, 1, False, True, True, True),     # system, cached
            MemoryType(3, 0, True, True, True, False))     # VRAM through ReBAR


def _fake(dev, kind: str, heaps, mtypes):
    info = dataclasses.replace(dev.info, type=kind, heaps=heaps, memory_types=mtypes,
                               unified_memory=any(t.device_local and t.host_visible for t in mtypes))
    f = types.SimpleNamespace(info=info, _buffer_type_bits=(1 << len(mtypes)) - 1, direct_copies=True,
                              STAGING_SLOT_BYTES=8 << 20, READBACK_SLOTS=2, upload_slots=lambda: 9)
    f.memory_type = {k: MemoryMixin._pick_type(f, k) for k in ("device", "upload", "readback")}
    f._in_place = lambda i: MemoryMixin._in_place(f, i)
    return f


def test_discrete_gpu_keeps_weights_out_of_the_bar(dev):
    f = _fake(dev, "discrete", NV_HEAPS, NV_TYPES)
    assert f.memory_type == {"device": 0, "upload": 2, "readback": 2}
    assert MemoryMixin.staging_vram_bytes(f) == 0          # staging lives in system memory
    bar_only = (MemoryType(0, 0, True, True, True, False), MemoryType(1, 1, False, True, True, False))
    g = _fake(dev, "discrete", NV_HEAPS, bar_only)
    assert g.memory_type["device"] == 0 and not g._in_place(0)   # mapped VRAM, still DMA'd
    assert g.memory_type["upload"] == 1


def test_integrated_gpu_writes_in_place(dev):
    heaps = (MemoryHeap(0, 16 << 30, True),)
    mtypes = (MemoryType(0, 0, True, False, False, False), MemoryType(1, 0, True, True, True, True))
    f = _fake(dev, "integrated", heaps, mtypes)
    assert f.memory_type["device"] == 1 and f._in_place(1)
    assert MemoryMixin.staging_vram_bytes(f) == 0
    f.direct_copies = False   # staging in the only (device-local) heap counts against the budget
    assert MemoryMixin.staging_vram_bytes(f) == (9 + 2) * (8 << 20)


def test_reserved_staging_bytes(dev, monkeypatch):
    """Only staging in device-local memory counts against the budget: lavapipe's (its one heap)
    when staging is forced, never an NVIDIA GPU's (system memory)."""
    assert dev.staging_vram_bytes() == 0
    monkeypatch.setattr(dev, "direct_copies", False)
    local = dev.info.memory_types[dev.memory_type["upload"]].device_local
    slots = dev.upload_slots() + dev.READBACK_SLOTS
    assert dev.staging_vram_bytes() == (slots * dev.STAGING_SLOT_BYTES if local else 0)


# ---- archives and the engine ----

@pytest.fixture(scope="module")
def raw_archive(tmp_path_factory):
    """Packs stored raw (codec none), 1 MiB each, enough layers for eviction."""
    d = tmp_path_factory.mktemp("raw")
    spec = ms.Spec(layers=6, hidden=256, heads=4, kv_heads=2, ffn=768, vocab=512, std=0.1)
    src = ms.write_gguf(d / "m.gguf", spec, dtype="F16", seed=6)
    build(src, d / "m.vkpack", codec="none", max_pack_mb=1, progress=False)
    return d / "m.vkpack"


@pytest.fixture(scope="module")
def raw_reference(raw_archive):
    """The numpy backend on raw_archive: prompt ids, 10 greedy tokens, the prompt's logits."""
    from vkpack.runtime.engine import Engine

    with Engine(raw_archive, device="numpy") as c:
        ids = c.encode("stream the packs from the file")
        return ids, greedy(c, ids, 10), c.logits(ids)


def test_archive_pack_span_reads_the_stored_bytes(raw_archive):
    with Archive(raw_archive) as a:
        for p in a.packs:
            off, n = a.pack_span(p.id)
            assert os.pread(a.fileno(), n, off) == bytes(a.stored_bytes(p.id))


@pytest.mark.parametrize("direct", [True, False], ids=["in-place", "staged"])
def test_streaming_engine_reads_raw_packs_from_the_file(raw_archive, raw_reference, monkeypatch, direct):
    """Under a small budget, packs come back after eviction read from the archive file by
    `Device.upload_file` (preadv into staging or mapped memory), the tokens match the numpy backend
    (--ram-gb 0: no pack is kept in pinned memory), and the device memory really allocated, staging
    slots included, stays within --vram-gb."""
    from vkpack.runtime.engine import Engine

    init = MemoryMixin._init_memory

    def small_staging(self):
        init(self)
        self.direct_copies, self.STAGING_SLOT_BYTES, self.copy_threads = direct, 256 << 10, 2

    monkeypatch.setattr(MemoryMixin, "_init_memory", small_staging)
    monkeypatch.setattr(staging, "MIN_CHUNK", 64 << 10)
    reads = []
    orig = MemoryMixin.upload_file
    monkeypatch.setattr(MemoryMixin, "upload_file",
                        lambda self, buf, fd, off, *a, **k: reads.append(off) or orig(self, buf, fd, off, *a, **k))
    ids, ref, ref_logits = raw_reference
    with Engine(raw_archive, device="vulkan") as probe:
        need = (probe.model_bytes // 2 + probe.min_bytes) // 256 * 256
    with Engine(raw_archive, device="vulkan", vram_gb=need / 2**30, ram_gb=0) as g:
        assert g.backend.host_cache is None
        dev = g.backend.dev
        local = dev.info.memory_types[dev.memory_type["upload"]].device_local   # lavapipe: one heap
        assert (dev.staging_vram_bytes() > 0) == (not direct and local)
        assert g.backend.reserved_bytes >= dev.staging_vram_bytes()
        assert greedy(g, ids, 10) == ref
        assert rel_err(g.logits(ids), ref_logits) < 1e-3
        assert g.tier.evictions > 0 and reads, "no pack was reloaded from the file"
        assert_device_peak_within(g, need / 2**30)
        staged = not dev._in_place(dev.memory_type["device"])
        assert bool(dev._staging.get("upload") and dev._staging["upload"].slots) == staged


def test_measure_upload_smoke(copying):
    from vk_bench import measure_upload

    res = measure_upload(copying, 1 << 20, threads=2, reps=1)
    assert len(res) == 9 and all(v > 0 for v in res.values())
