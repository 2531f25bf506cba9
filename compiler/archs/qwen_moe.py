"""Qwen1.5/Qwen2 MoE and Qwen3 MoE: the qwen2 and qwen3 decoders with a mixture of SwiGLU experts (softmax
router, top-k). qwen2moe adds a shared expert on every token, scaled by sigmoid(its own gate). llama.cpp
renormalizes the top-k weights for qwen3moe GGUFs and not for qwen2moe ones, whatever the source config
said; HF configs state it as norm_topk_prob."""

from __future__ import annotations

from typing import ClassVar

from . import register
from .base import Family
from .moe import HF_MLP_EXPERTS


@register
class Qwen2Moe(Family):
    name = "qwen2moe"
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_architectures = ("qwen2moe",)
    qkv_bias = True
    gguf_rope_mode = "neox"
    gguf_moe_norm = False
    hf_rename: ClassVar[dict[str, str | None]] = HF_MLP_EXPERTS


@register
class Qwen3Moe(Family):
    name = "qwen3moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_architectures = ("qwen3moe",)
    qk_norm = True
    gguf_rope_mode = "neox"
    hf_rename: ClassVar[dict[str, str | None]] = HF_MLP_EXPERTS
