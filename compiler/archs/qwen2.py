"""Qwen2 / Qwen2.5: llama's layout plus biases on q, k and v, and neox rope in GGUF too."""

from __future__ import annotations

from . import register
from .base import Family


@register
class Qwen2(Family):
    name = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_architectures = ("qwen2",)
    qkv_bias = True
    gguf_rope_mode = "neox"  # llama.cpp does not permute qwen2's q/k
