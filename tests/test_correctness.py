"""Numerics against an independent implementation: Hugging Face transformers on torch CPU.

Tolerances: last-position logits within a relative error of 1e-3 (max |ours - ref| over
max |ref|); greedy decoding identical for 32 steps. SmolLM2 runs on both CPU backends: the numpy
reference and the native kernels (which fall back to numpy where they cannot be built).
"""

from __future__ import annotations

import numpy as np
import pytest

import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.runtime.engine import Engine

pytest.importorskip("torch")
pytest.importorskip("transformers")
import hf_reference  # needs torch

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
           "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n"]
REL_TOL = 1e-3


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def hf_smol(smollm2_gguf):
    return hf_reference.load_hf_gguf(smollm2_gguf)


@pytest.fixture(scope="module", params=["numpy", "cpu"])
def smol(request, smollm2_archive, hf_smol):
    model, tok = hf_smol
    eng = Engine(smollm2_archive, device=request.param)
    yield eng, model, tok
    eng.close()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_logits_match_transformers(smol, prompt):
    eng, model, tok = smol
    ids = eng.encode(prompt)
    assert ids == tok.encode(prompt, add_special_tokens=False)
    ref = hf_reference.hf_logits(model, ids)[-1]
    assert rel_err(eng.logits(ids), ref) < REL_TOL


def test_smollm2_greedy_32_tokens_match_transformers(smol):
    eng, model, _ = smol
    for prompt in PROMPTS[:2]:
        ids = eng.encode(prompt)
        eng.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        assert eng.last_ids == hf_reference.hf_greedy(model, ids, 32), prompt


def test_smollm2_quarter_budget_same_tokens(smol, smollm2_archive):
    eng, _, _ = smol
    ids = eng.encode(PROMPTS[2])
    eng.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
    ref = list(eng.last_ids)
    with Engine(smollm2_archive, vram_gb=eng.model_bytes / 4 / 2**30, device=eng.backend.name) as small:
        small.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        assert small.last_ids == ref
        assert small.stats()["device_budget"] < eng.model_bytes / 3


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_synthetic_hf_folders_match_transformers(tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM

    spec = ms.Spec(arch=arch, layers=3, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=512, std=0.1,
                   head_dim=48 if arch == "qwen3" else None)
    folder = ms.write_hf(tmp_path / arch, spec, dtype="F32", seed=11)
    build(folder, tmp_path / "m.vkpack", progress=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with Engine(tmp_path / "m.vkpack") as eng:
        ids = eng.encode("hello there, general kenobi")
        ref = hf_reference.hf_logits(model, ids)[-1]
        assert rel_err(eng.logits(ids), ref) < REL_TOL
        eng.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
        assert eng.last_ids == hf_reference.hf_greedy(model, ids, 32)


def test_gguf_norm_rope_equals_hf_neox_rope(tmp_path):
    """The same llama as a GGUF (permuted q/k, adjacent-pair rope) and an HF folder (halves rope)."""
    spec = ms.Spec(layers=2, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=512, std=0.1)
    build(ms.write_gguf(tmp_path / "m.gguf", spec, dtype="F32", seed=3), tmp_path / "g.vkpack", progress=False)
    build(ms.write_hf(tmp_path / "hf", spec, dtype="F32", seed=3), tmp_path / "h.vkpack", progress=False)
    with Engine(tmp_path / "g.vkpack") as g, Engine(tmp_path / "h.vkpack") as h:
        assert g.hp["rope_mode"] == "norm" and h.hp["rope_mode"] == "neox"
        ids = g.encode("permutation check")
        assert rel_err(g.logits(ids), h.logits(ids)) < 1e-5
