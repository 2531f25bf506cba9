"""The benchmark tools' shared steps, run small (the benchmarks themselves are not part of the tests)."""

from __future__ import annotations

import os

import bench_run
import make_synthetic as ms
from vkpack.pack_format.reader import Archive


def test_bench_run_generates_and_builds_once(tmp_path):
    """bench_run writes the synthetic GGUF and builds its archive, and rebuilds only a stale archive."""
    spec = ms.Spec(layers=1, hidden=64, heads=2, kv_heads=1, ffn=128, vocab=320)
    gguf, arch = tmp_path / "m.gguf", tmp_path / "m.vkpack"
    bench_run._generated(gguf, arch, spec, "F16")
    with Archive(arch) as a:
        assert "blk.0.ffn_up.weight" in a.tensors
    built = arch.stat().st_mtime_ns
    bench_run._generated(gguf, arch, spec, "F16")
    assert arch.stat().st_mtime_ns == built                      # up to date: left alone
    os.utime(arch, ns=(0, 0))                                   # older than its GGUF: built again
    bench_run._generated(gguf, arch, spec, "F16")
    assert arch.stat().st_mtime_ns > 0
