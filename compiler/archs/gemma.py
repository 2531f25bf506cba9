"""Gemma 2 and Gemma 3: GeGLU, the embedding scaled by sqrt(hidden), RMSNorm with (1 + w), norms after
attention and after the MLP, sliding-window attention on most layers, q/k norms and a separate rope base
for local layers (gemma3), and soft-capped attention and final logits (gemma2).

The HF weights store each norm's w - 1 (llama.cpp's converter adds the 1, so GGUF norms need no offset).
Where GGUF metadata is silent, the values are llama.cpp's for the same files: the sliding window 4096 and
pattern of gemma2, the local rope base 10000 and pattern 6 of gemma3, and the attention scale.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ...pack_format.errors import SourceError
from ..hparams_check import check_value
from . import register
from .base import Family, gguf_getter, hf_windows
from .hf_rope import rope_settings

_GEMMA_RENAME: dict[str, str | None] = {
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.post_attention_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "blk.{}.post_ffw_norm.weight",
}


class _Gemma(Family):
    gguf_rope_mode = "neox"
    act = "gelu_tanh"
    post_norms = True
    hf_norm_offset = 1.0
    hf_rename: ClassVar[dict[str, str | None]] = _GEMMA_RENAME
    swa_pattern = 2              # every n-th layer is global (llama.cpp's default for the family)
    big_layers = 0               # the 27B's layer count, whose attention scale is 1/sqrt(hidden / heads)

    def hf_extras(self, cfg: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
        scalar = cfg.get("query_pre_attn_scalar", hp["head_dim"])
        check_value(scalar, "positive", "config.json query_pre_attn_scalar")
        out = {"embed_scale": math.sqrt(hp["hidden"]), "attn_scale": float(scalar) ** -0.5,
               "attn_softcap": _cap(cfg, "attn_logit_softcapping"),
               "final_softcap": _cap(cfg, "final_logit_softcapping")}
        if "layer_types" not in cfg and cfg.get("sliding_window"):  # a transformers 4 config: the family's rule
            cfg = {**cfg, "layer_types": ["full_attention" if (i + 1) % self._hf_pattern(cfg) == 0
                                          else "sliding_attention" for i in range(hp["n_layers"])]}
        out.update(hf_windows(cfg, hp))
        return out

    def _hf_pattern(self, cfg: dict[str, Any]) -> int:
        return self.swa_pattern

    def gguf_extras(self, meta: dict[str, Any], arch: str, hp: dict[str, Any]) -> dict[str, Any]:
        get = gguf_getter(meta, arch)
        heads = hp["n_heads"]
        scale = get("attention.scale", None)   # else llama.cpp's rule for these files
        if scale is None:
            scale = (hp["hidden"] // heads if hp["n_layers"] == self.big_layers else hp["head_dim"]) ** -0.5
        out = {"embed_scale": math.sqrt(hp["hidden"]), "attn_scale": scale,
               "attn_softcap": _num(get("attn_logit_softcapping", None), f"{arch}.attn_logit_softcapping"),
               "final_softcap": _num(get("final_logit_softcapping", None), f"{arch}.final_logit_softcapping")}
        window = self._gguf_window(get)
        if window:
            out["sliding_window"] = int(window)
            out["swa_layers"] = _gguf_swa_layers(get, hp["n_layers"], self.swa_pattern, arch)
        return out

    def _gguf_window(self, get: Any) -> int | None:
        return get("attention.sliding_window", 4096)


@register
class Gemma2(_Gemma):
    name = "gemma2"
    hf_architectures = ("Gemma2ForCausalLM",)
    gguf_architectures = ("gemma2",)
    big_layers = 46


@register
class Gemma3(_Gemma):
    name = "gemma3"
    hf_architectures = ("Gemma3ForCausalLM",)
    gguf_architectures = ("gemma3",)
    qk_norm = True
    swa_pattern = 6
    big_layers = 62
    hf_default_theta = 1_000_000.0

    def hf_extras(self, cfg: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
        out = super().hf_extras(cfg, hp)
        if "rope_parameters" in cfg:
            local = rope_settings(cfg, "sliding_attention")
            if local["scaling"] is not None:
                raise SourceError("config.json: rope scaling on gemma3's sliding layers is not supported")
            out["rope_theta_swa"] = local["theta"]
        else:
            out["rope_theta_swa"] = float(cfg.get("rope_local_base_freq", 10000.0))
        return out

    def _hf_pattern(self, cfg: dict[str, Any]) -> int:
        return int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or self.swa_pattern)

    def gguf_extras(self, meta: dict[str, Any], arch: str, hp: dict[str, Any]) -> dict[str, Any]:
        out = super().gguf_extras(meta, arch, hp)
        if out.get("sliding_window"):
            out["rope_theta_swa"] = float(gguf_getter(meta, arch)("rope.freq_base_swa", 10000.0))
        return out

    def _gguf_window(self, get: Any) -> int | None:
        w = get("attention.sliding_window", 0)
        return w if w and w > 0 else None


def _gguf_swa_layers(get: Any, n_layers: int, pattern: int, arch: str) -> list[bool]:
    """Which layers slide: GGUF's sliding_window_pattern (a list of bools, or every n-th layer global)."""
    value = get("attention.sliding_window_pattern", pattern)
    if isinstance(value, list):
        if len(value) != n_layers:
            raise SourceError(f"GGUF {arch}.attention.sliding_window_pattern has {len(value)} entries "
                              f"for {n_layers} layers")
        return [bool(v) for v in value]
    n = int(value)
    return [n == 0 or i % n < n - 1 for i in range(n_layers)]


def _cap(cfg: dict[str, Any], key: str) -> float | None:
    return _num(cfg.get(key), f"config.json {key}")


def _num(v: Any, where: str) -> float | None:
    """A soft-cap: absent or 0 is none, else a positive number."""
    if v is None or (v == 0 and not isinstance(v, bool)):
        return None
    check_value(v, "positive", where)
    return float(v)
