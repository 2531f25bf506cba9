"""Granite (3.x): the llama decoder with four multipliers: of the embedding, of the attention scores
(instead of 1/sqrt(head_dim)), of each branch before the residual add, and a divisor of the logits."""

from __future__ import annotations

from typing import Any

from ..hparams_check import check_value
from . import register
from .base import Family, gguf_getter, hf_getter


@register
class Granite(Family):
    name = "granite"
    hf_architectures = ("GraniteForCausalLM",)
    gguf_architectures = ("granite",)

    def hf_extras(self, cfg: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
        get = hf_getter(cfg)
        return _scales(get("embedding_multiplier", 1.0), get("attention_multiplier", hp["head_dim"] ** -0.5),
                       get("residual_multiplier", 1.0), get("logits_scaling", 1.0), "config.json ")

    def gguf_extras(self, meta: dict[str, Any], arch: str, hp: dict[str, Any]) -> dict[str, Any]:
        get = gguf_getter(meta, arch)
        return _scales(get("embedding_scale", 1.0), get("attention.scale", hp["head_dim"] ** -0.5),
                       get("residual_scale", 1.0), get("logit_scale"), f"GGUF {arch}.")


def _scales(embed: Any, attn: Any, residual: Any, logits: Any, where: str) -> dict[str, Any]:
    values = {"embedding multiplier": embed, "attention multiplier": attn, "residual multiplier": residual,
              "logits scaling": logits}
    for key, v in values.items():
        check_value(v, "positive", f"{where}{key}")
    return {"embed_scale": None if embed == 1 else float(embed), "attn_scale": float(attn),
            "residual_scale": None if residual == 1 else float(residual),
            "logit_scale": None if logits == 1 else 1.0 / float(logits)}
