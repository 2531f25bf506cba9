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
