"""Qwen3: qwen2 without the biases, with an RMSNorm over each head of q and k before rope."""

from __future__ import annotations

from . import register
from .base import Family


@register
class Qwen3(Family):
    name = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_architectures = ("qwen3",)
    qk_norm = True
    gguf_rope_mode = "neox"
