"""What a model family tells the compiler: tensor names, hyperparameters, and its graph.

The decoder graph below is shared by the llama-like families; a family file only states
its quirks (biases, q/k norms, rope convention, name table). The runtime executes the
emitted ops and never looks at the family.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ...pack_format.errors import SourceError

# HF tensor names -> normalized (GGUF-style) names; "{}" is the layer index.
HF_RENAME = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.self_attn.o_proj.bias": "blk.{}.attn_output.bias",
    "model.layers.{}.self_attn.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "blk.{}.attn_k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # recomputed from rope_theta
}
_HF_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in HF_RENAME.items()]


def normalize_hf_name(name: str) -> str | None:
    """HF name -> normalized name, None for tensors to drop; unknown names raise SourceError."""
    for pat, target in _HF_PATTERNS:
        m = pat.match(name)
        if m:
            return None if target is None else target.replace("{}", m.group(1)) if m.groups() else target
    raise SourceError(f"tensor {name!r} is not part of any supported layout")


class Family:
    """Base family: the llama-style decoder. Subclasses set the class attributes."""

    name = "llama"
    hf_architectures: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()
    qkv_bias = False          # qwen2: biases on q, k, v
    qk_norm = False           # qwen3: RMSNorm over each head of q and k
    gguf_rope_mode = "norm"   # llama.cpp's converter permutes llama q/k for adjacent-pair rope

    # ---- hyperparameters ----
    def hparams(self, source: Any) -> dict[str, Any]:
        """Normalized hyperparameters from GGUF metadata or an HF config.json."""
        if source.format == "gguf":
            hp = self._gguf_hparams(source.meta, source.arch_names[0])
            hp["rope_mode"] = self.gguf_rope_mode
        else:
            hp = self._hf_hparams(source.meta)
            hp["rope_mode"] = "neox"
        hp["qkv_bias"] = self.qkv_bias
        hp["qk_norm"] = self.qk_norm
        hp["act"] = "silu"
        return hp

    def _gguf_hparams(self, meta: dict[str, Any], arch: str) -> dict[str, Any]:
        def get(key: str, default: Any = KeyError) -> Any:
            full = f"{arch}.{key}"
            if full in meta:
                return meta[full]
            if default is KeyError:
                raise SourceError(f"GGUF metadata lacks {full}")
            return default

        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // n_heads))
        n_vocab = get("vocab_size", None)
        if n_vocab is None:
            n_vocab = len(meta.get("tokenizer.ggml.tokens", []))
        scaling = None
        stype = get("rope.scaling.type", None)
        if stype and stype != "none":
            scaling = {"type": stype, "factor": float(get("rope.scaling.factor", 1.0)),
                       "original_context": int(get("rope.scaling.original_context_length", 0))}
        return {
            "n_layers": int(get("block_count")), "hidden": hidden, "n_heads": n_heads,
            "n_kv_heads": int(get("attention.head_count_kv", n_heads)), "head_dim": head_dim,
            "ffn": int(get("feed_forward_length")), "vocab": int(n_vocab),
            "context": int(get("context_length", 2048)), "rope_theta": float(get("rope.freq_base", 10000.0)),
            "rope_dim": int(get("rope.dimension_count", head_dim)), "rope_scaling": scaling,
            "norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        }

    def _hf_hparams(self, cfg: dict[str, Any]) -> dict[str, Any]:
        def get(key: str, default: Any = KeyError) -> Any:
            if key in cfg and cfg[key] is not None:
                return cfg[key]
            if default is KeyError:
                raise SourceError(f"config.json lacks {key!r}")
            return default

        n_heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        head_dim = int(get("head_dim", hidden // n_heads))
        rs = cfg.get("rope_scaling")
        scaling = None
        if isinstance(rs, dict):
            rtype = rs.get("rope_type", rs.get("type"))
            if rtype not in (None, "default"):
                scaling = {"type": rtype, "factor": float(rs.get("factor", 1.0)),
                           "original_context": int(rs.get("original_max_position_embeddings", 0) or 0),
                           "low_freq_factor": float(rs.get("low_freq_factor", 1.0)),
                           "high_freq_factor": float(rs.get("high_freq_factor", 4.0))}
        return {
            "n_layers": int(get("num_hidden_layers")), "hidden": hidden, "n_heads": n_heads,
            "n_kv_heads": int(get("num_key_value_heads", n_heads)), "head_dim": head_dim,
            "ffn": int(get("intermediate_size")), "vocab": int(get("vocab_size")),
            "context": int(get("max_position_embeddings", 2048)), "rope_theta": float(get("rope_theta", 10000.0)),
            "rope_dim": head_dim, "rope_scaling": scaling, "norm_eps": float(get("rms_norm_eps", 1e-5)),
        }

    # ---- graph ----
    def graph(self, hp: dict[str, Any], tensor_names: set[str], freq_factors: list[float] | None) -> dict[str, Any]:
        """The access graph of one forward pass (steps of ops; packs are filled in by the planner)."""
        tied = "output.weight" not in tensor_names
        steps = [{"name": "embed", "kind": "embed", "layer": None, "gather": True,
                  "ops": [op("embed", ["tokens"], "x", ["token_embd.weight"])]}]
        rope = {"n_heads": hp["n_heads"], "head_dim": hp["head_dim"], "rope_dim": hp["rope_dim"],
                "theta": hp["rope_theta"], "mode": hp["rope_mode"], "freq_factors": freq_factors}
        for i in range(hp["n_layers"]):
            b = f"blk.{i}."
            ops = [op("rms_norm", ["x"], "h", [b + "attn_norm.weight"], eps=hp["norm_eps"])]
            for proj in ("q", "k", "v"):
                ops.append(_linear(["h"], proj, b + f"attn_{proj}", tensor_names))
            if self.qk_norm:
                ops.append(op("rms_norm", ["q"], "q", [b + "attn_q_norm.weight"], eps=hp["norm_eps"], group=hp["head_dim"]))
                ops.append(op("rms_norm", ["k"], "k", [b + "attn_k_norm.weight"], eps=hp["norm_eps"], group=hp["head_dim"]))
            ops.append(op("rope", ["q"], "q", **rope))
            ops.append(op("rope", ["k"], "k", **{**rope, "n_heads": hp["n_kv_heads"]}))
            ops.append(op("attention", ["q", "k", "v"], "o", layer=i, n_heads=hp["n_heads"],
                          n_kv_heads=hp["n_kv_heads"], head_dim=hp["head_dim"], scale=1.0 / math.sqrt(hp["head_dim"])))
            ops.append(_linear(["o"], "a", b + "attn_output", tensor_names))
            ops.append(op("add", ["x", "a"], "x"))
            steps.append({"name": f"blk.{i}.attn", "kind": "attn", "layer": i, "gather": False, "ops": ops})
            ops = [op("rms_norm", ["x"], "h", [b + "ffn_norm.weight"], eps=hp["norm_eps"]),
                   _linear(["h"], "g", b + "ffn_gate", tensor_names),
                   _linear(["h"], "u", b + "ffn_up", tensor_names),
                   op("swiglu", ["g", "u"], "m"),
                   _linear(["m"], "a", b + "ffn_down", tensor_names),
                   op("add", ["x", "a"], "x")]
            steps.append({"name": f"blk.{i}.mlp", "kind": "mlp", "layer": i, "gather": False, "ops": ops})
        head = "token_embd.weight" if tied else "output.weight"
        steps.append({"name": "head", "kind": "head", "layer": None, "gather": False, "ops": [
            op("last_token", ["x"], "x"),
            op("rms_norm", ["x"], "h", ["output_norm.weight"], eps=hp["norm_eps"]),
            op("linear", ["h"], "logits", [head])]})
        return {"steps": steps, "loop_to": 0, "inputs": ["tokens", "positions"], "outputs": ["logits"],
                "kv_cache": {"n_layers": hp["n_layers"], "n_kv_heads": hp["n_kv_heads"], "head_dim": hp["head_dim"]}}

    def pack_group(self, name: str) -> tuple[str, int | None]:
        """(pack kind, layer) a normalized tensor belongs to."""
        if name.startswith("token_embd."):
            return "embed", None
        if name.startswith(("output_norm.", "output.")):
            return "head", None
        m = re.match(r"^blk\.(\d+)\.(attn|ffn)_", name)
        if m:
            return ("attn" if m.group(2) == "attn" else "mlp"), int(m.group(1))
        raise SourceError(f"tensor {name!r} does not belong to any pack group of {self.name}")


def op(name: str, inputs: list[str], out: str, weights: list[str] | None = None, **attrs: Any) -> dict[str, Any]:
    return {"op": name, "in": inputs, "out": out, "w": weights or [], "attrs": attrs}


def _linear(inputs: list[str], out: str, base: str, names: set[str]) -> dict[str, Any]:
    w = [base + ".weight"]
    if base + ".bias" in names:
        w.append(base + ".bias")
    return op("linear", inputs, out, w)
