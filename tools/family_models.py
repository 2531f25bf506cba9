"""Tiny random models of every supported family (dense and mixtures of experts), made by transformers itself,
as HF folders and GGUFs.

`make_hf(family, folder)` builds the family's model offline from a config (`from_config`), draws random
weights, and saves it with `save_pretrained` (safetensors, transformers 5's config.json) next to the
synthetic tokenizer. `as_transformers4(folder)` rewrites that config.json as transformers 4 wrote it
(top-level `rope_theta` and `rope_scaling`, no `layer_types`). `hf_to_gguf.write_gguf` writes the same
weights as llama.cpp's converter would.

The shapes are small but not degenerate: grouped-query attention, windows shorter than the test prompt,
soft-caps and multipliers far enough from 1 that a missing op changes the logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_synthetic as ms
from synthetic_tokenizer import BOS_ID, EOS_ID, PAD_ID

VOCAB = 512
WINDOW = 16            # shorter than the tests' 64-token prompt, so it is crossed
# rows of 256 and 512: whole Q4_K blocks, so every quantized GGUF type applies to every matrix; 12 layers, so
# that a quarter of the model's bytes is above the runtime's minimum (two of the largest packs and a KV cache)
_COMMON = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 12,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-6, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
           "tie_word_embeddings": False}


def _default_rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


# family -> (transformers config class name, its arguments beyond _COMMON)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW, "rope_parameters": _default_rope(1e6)}),
    "qwen2": ("Qwen2Config", {"rope_parameters": _default_rope(1e6), "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"rope_parameters": _default_rope(1e6)}),
    "gemma2": ("Gemma2Config", {
        "sliding_window": WINDOW, "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0, "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh", "rope_parameters": _default_rope(10000.0)}),
    "gemma3": ("Gemma3TextConfig", {
        "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
        "layer_types": ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(12)],
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {"sliding_attention": _default_rope(10000.0),
                            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}}),
    "olmo2": ("Olmo2Config", {"rope_parameters": _default_rope(500000.0)}),
    "granite": ("GraniteConfig", {
        "embedding_multiplier": 6.0, "attention_multiplier": 0.1, "residual_multiplier": 0.3,
        "logits_scaling": 4.0, "rope_parameters": _default_rope(10000.0)}),
    "phi3": ("Phi3Config", {
        "sliding_window": WINDOW, "original_max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
}
GEMMA_LIKE = ("gemma2", "gemma3")   # norms stored as w - 1

# Mixtures of experts: 8 experts of 256, top 2, 4 layers (each expert its own pack; a quarter of them is 8 packs).
# The top-k renormalization is what llama.cpp assumes for each GGUF architecture (mixtral and qwen3moe: yes,
# qwen2moe and olmoe: no), so that the HF folder and its GGUF are the same model.
_MOE = {"num_hidden_layers": 4, "num_experts_per_tok": 2}
MOE_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {**_MOE, "num_local_experts": 8, "intermediate_size": 256,
                                  "rope_parameters": _default_rope(1e6)}),
    "qwen2moe": ("Qwen2MoeConfig", {**_MOE, "num_experts": 8, "moe_intermediate_size": 256,
                                    "shared_expert_intermediate_size": 512, "norm_topk_prob": False,
                                    "rope_parameters": _default_rope(1e6)}),
    "qwen3moe": ("Qwen3MoeConfig", {**_MOE, "num_experts": 8, "moe_intermediate_size": 256, "norm_topk_prob": True,
                                    "rope_parameters": _default_rope(1e6)}),
    "olmoe": ("OlmoeConfig", {**_MOE, "num_experts": 8, "intermediate_size": 256, "norm_topk_prob": False,
                              "rope_parameters": _default_rope(10000.0)}),
}


def make_hf(family: str, folder: Path | str, seed: int = 0, std: float = 0.08) -> Path:
    """Write a tiny random `family` model as an HF folder (F32 safetensors, config, tokenizer)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, extra = FAMILIES[family] if family in FAMILIES else MOE_FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**_COMMON, **extra})
    cfg.attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:   # around 1 (gemma: around 0, it adds the 1)
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if family in GEMMA_LIKE else 1.0))
            else:
                p.copy_(torch.randn_like(p) * std)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(ms.hf_tokenizer_json(VOCAB), encoding="utf-8")
    spec = ms.Spec(vocab=VOCAB, context=_COMMON["max_position_embeddings"])
    (folder / "tokenizer_config.json").write_text(json.dumps(ms._tokenizer_config(spec), indent=2), encoding="utf-8")
    return folder


def as_transformers4(folder: Path | str) -> dict[str, Any]:
    """Rewrite folder/config.json as transformers 4 wrote it; returns the new config."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    params = cfg.pop("rope_parameters")
    if "full_attention" in params:                      # gemma3: one map per layer type
        cfg["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        params = params["full_attention"]
    params = dict(params)
    cfg["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        cfg["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    cfg["rope_scaling"] = None if params.get("rope_type") == "default" else params
    types = cfg.pop("layer_types", None)
    if cfg.get("model_type") == "gemma3_text" and types:
        cfg["sliding_window_pattern"] = types.index("full_attention") + 1
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return cfg


def load_reference(folder: Path | str) -> Any:
    """The folder's model in transformers, float32, eager attention (soft-capping needs it)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=sorted({**FAMILIES, **MOE_FAMILIES}))
    ap.add_argument("folder")
    ap.add_argument("--transformers4", action="store_true", help="write config.json as transformers 4 did")
    args = ap.parse_args()
    make_hf(args.family, args.folder)
    if args.transformers4:
        as_transformers4(args.folder)
    print(args.folder)
