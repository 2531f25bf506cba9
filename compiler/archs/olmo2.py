"""OLMo 2: no norms before attention or the MLP but RMSNorm of their outputs before the residual add, and
q/k norms over the whole q and k projections (not per head). neox rope in GGUF too (llama.cpp does not
permute its q/k)."""

from __future__ import annotations

from typing import Any, ClassVar

from . import register
from .base import Family, gguf_getter

_OLMO2_RENAME: dict[str, str | None] = {
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.post_attention_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "blk.{}.post_ffw_norm.weight",
}


@register
class Olmo2(Family):
    name = "olmo2"
    hf_architectures = ("Olmo2ForCausalLM",)
    gguf_architectures = ("olmo2",)
    qk_norm = "full"
    gguf_rope_mode = "neox"
    pre_norms = False
    post_norms = True
    hf_rename: ClassVar[dict[str, str | None]] = _OLMO2_RENAME

    def gguf_extras(self, meta: dict[str, Any], arch: str, hp: dict[str, Any]) -> dict[str, Any]:
        window = gguf_getter(meta, arch)("attention.sliding_window", 0)
        if window:  # OLMo 3 (the same GGUF architecture) slides; OLMo 2 does not
            from ...pack_format.errors import SourceError
            raise SourceError(f"GGUF {arch}.attention.sliding_window {window}: OLMo 3 is not supported")
        return {}
