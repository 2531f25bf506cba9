"""Shared fixtures: the repo's tools/ and tests/vk_helpers.py on sys.path, the real SmolLM2 model, small synthetic models."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))   # vk_helpers

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into the cache."""
    import smollm2

    try:
        return smollm2.smollm2_gguf()
    except smollm2.ModelUnavailable as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_archive(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 built once per test session with default options."""
    from vkpack.compiler.build import build

    out = tmp_path_factory.mktemp("smol") / "smollm2.vkpack"
    build(smollm2_gguf, out, progress=False)
    return out


@pytest.fixture(scope="module")
def dev():
    """A Vulkan device for the kernel tests (each vk test module skips itself without one)."""
    from vkpack.runtime import vk

    d = vk.Device()
    yield d
    d.close()


@pytest.fixture(scope="module")
def ops(dev):
    from vkpack.runtime import vk

    return vk.Ops(dev)


@pytest.fixture(scope="module")
def tiny_q8_archive(tmp_path_factory) -> Path:
    """A 2-layer, 384-token llama in Q8_0 with 1 MB packs: servers that need a model, not its answers."""
    import make_synthetic as ms
    from vkpack.compiler.build import build

    folder = tmp_path_factory.mktemp("tiny_q8")
    src = ms.write_gguf(folder / "m.gguf", ms.Spec(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=384,
                                                   std=0.3), dtype="Q8_0", seed=5)
    out = folder / "m.vkpack"
    build(src, out, max_pack_mb=1, progress=False)
    return out
