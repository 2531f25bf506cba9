"""Mixtral: llama's decoder with a mixture of SwiGLU experts in place of the MLP; softmax router, top-k
weights always renormalized. A Mixtral GGUF says `llama` (with `llama.expert_count`), so the llama family
reads it: the MoE layers come from the shared code in archs/moe.py, not from this file."""

from __future__ import annotations

from typing import ClassVar

from . import register
from .base import Family

_MIXTRAL_RENAME: dict[str, str | None] = {
    "model.layers.{}.block_sparse_moe.gate.weight": "blk.{}.ffn_gate_inp.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight": "blk.{}.ffn_gate.{}.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w3.weight": "blk.{}.ffn_up.{}.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w2.weight": "blk.{}.ffn_down.{}.weight",
}


@register
class Mixtral(Family):
    name = "mixtral"
    hf_architectures = ("MixtralForCausalLM",)
    hf_rename: ClassVar[dict[str, str | None]] = _MIXTRAL_RENAME
    hf_moe_norm = True
