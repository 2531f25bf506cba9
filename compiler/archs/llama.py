"""Llama 2/3, SmolLM, TinyLlama, Mistral: the plain pre-norm decoder with SwiGLU and GQA."""

from __future__ import annotations

from . import register
from .base import Family


@register
class Llama(Family):
    name = "llama"
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    gguf_architectures = ("llama", "mistral")
