"""OLMoE: the llama decoder (pre-norms) with q/k norms over the whole q and k projections, as olmo2's, and
a mixture of SwiGLU experts (softmax router, top-k weights not renormalized in llama.cpp's GGUF graph;
norm_topk_prob in HF configs). neox rope in GGUF too."""

from __future__ import annotations

from typing import Any, ClassVar

from ...pack_format.errors import SourceError
from . import register
from .base import Family
from .moe import HF_MLP_EXPERTS


@register
class Olmoe(Family):
    name = "olmoe"
    hf_architectures = ("OlmoeForCausalLM",)
    gguf_architectures = ("olmoe",)
    qk_norm = "full"
    gguf_rope_mode = "neox"
    gguf_moe_norm = False
    hf_rename: ClassVar[dict[str, str | None]] = HF_MLP_EXPERTS

    def hf_extras(self, cfg: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
        if cfg.get("clip_qkv") is not None:
            raise SourceError(f"config.json clip_qkv {cfg['clip_qkv']!r}: clipping q, k, v is not supported")
        return super().hf_extras(cfg, hp)
