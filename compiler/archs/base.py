"""What a model family tells the compiler: tensor names, hyperparameters, and its graph.

The decoder graph below is shared by the llama-like families; a family file only states
its quirks (biases, q/k norms, rope convention, name table). The runtime executes the
emitted ops and never looks at the family.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any, ClassVar

from ...pack_format.errors import SourceError
from .hf_rope import rope_settings

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
class Family:
    """Base family: the llama-style decoder. Subclasses set the class attributes."""

    name = "llama"
    hf_architectures: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()
    qkv_bias = False          # qwen2: biases on q, k, v
    qk_norm: bool | str = False   # True: RMSNorm over each head of q and k (qwen3, gemma3); "full": over all of q, k (olmo2)
    gguf_rope_mode = "norm"   # llama.cpp's converter permutes llama q/k for adjacent-pair rope
    act = "silu"              # the gated MLP's activation: "silu" (swiglu) or "gelu_tanh" (geglu)
    pre_norms = True          # RMSNorm before attention and before the MLP (olmo2 has none)
    post_norms = False        # RMSNorm of the attention and MLP outputs before the residual add (gemma2/3, olmo2)
    hf_norm_offset = 0.0      # gemma's HF weights store w - 1; GGUF converters add the 1 back
    hf_rename: ClassVar[dict[str, str | None]] = {}    # a family's HF names that differ from HF_RENAME
    hf_default_theta = 10000.0
    gguf_moe_norm = True      # MoE GGUFs: renormalize the top-k weights (llama.cpp fixes this per architecture)
    hf_moe_norm: bool | None = None   # MoE HF configs: None reads norm_topk_prob; a family may fix it (mixtral)

    # ---- hyperparameters ----
    def hparams(self, source: Any) -> dict[str, Any]:
        """Normalized hyperparameters from GGUF metadata or an HF config.json."""
        if source.format == "gguf":
            hp = self._gguf_hparams(source.meta, source.arch_names[0])
            hp["rope_mode"] = self.gguf_rope_mode
            hp["norm_offset"] = 0.0
            hp.update(self.gguf_extras(source.meta, source.arch_names[0], hp))
        else:
            hp = self._hf_hparams(source.meta)
            hp["rope_mode"] = "neox"
            hp["norm_offset"] = self.hf_norm_offset
            hp.update(self.hf_extras(source.meta, hp))
        from .moe import moe_hparams

        moe = moe_hparams(source, self)
        if moe:
            moe["expert_ffn"] = moe["expert_ffn"] or hp["ffn"]
        hp.update(moe)
        hp["qkv_bias"] = self.qkv_bias
        hp["qk_norm"] = bool(self.qk_norm)
        hp["act"] = self.act
        return hp

    def gguf_extras(self, meta: dict[str, Any], arch: str, hp: dict[str, Any]) -> dict[str, Any]:
        """Family hyperparameters beyond the llama set (scales, windows, soft-caps), from GGUF keys. The base
        reads `attention.sliding_window` (every layer slides; llama.cpp ignores the key for llama, but a
        file that states a window means it)."""
        window = gguf_getter(meta, arch)("attention.sliding_window", 0)
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise SourceError(f"GGUF {arch}.attention.sliding_window {window!r}: expected a count")
        if window and window < hp["context"]:
            return {"sliding_window": window, "swa_layers": [True] * hp["n_layers"]}
        return {}

    def hf_extras(self, cfg: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
        """The same from config.json; the base reads sliding windows, which any family may have."""
        return hf_windows(cfg, hp)

    def _gguf_hparams(self, meta: dict[str, Any], arch: str) -> dict[str, Any]:
        get = gguf_getter(meta, arch)
        n_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // n_heads))
        n_vocab = get("vocab_size", None)
        if n_vocab is None:
            n_vocab = len(meta.get("tokenizer.ggml.tokens", []))
        scaling = None
        stype = get("rope.scaling.type", None)
        if stype and stype != "none":
            if stype not in ("linear", "llama3"):
                raise SourceError(f"GGUF {arch}.rope.scaling.type {stype!r} is not supported (linear is)")
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
        get = hf_getter(cfg)
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        if act is not None and act not in _ACTS[self.act]:
            raise SourceError(f"config.json hidden_act {act!r}: the {self.name} family runs {self.act} "
                              f"({', '.join(_ACTS[self.act])})")
        n_heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        if n_heads <= 0:
            raise SourceError(f"config.json num_attention_heads {n_heads}: must be > 0")
        head_dim = int(get("head_dim", hidden // n_heads))
        rope = rope_settings(cfg, self.global_layer_type, self.hf_default_theta)
        return {
            "n_layers": int(get("num_hidden_layers")), "hidden": hidden, "n_heads": n_heads,
            "n_kv_heads": int(get("num_key_value_heads", n_heads)), "head_dim": head_dim,
            "ffn": int(get("intermediate_size")), "vocab": int(get("vocab_size")),
            "context": int(get("max_position_embeddings", 2048)), "rope_theta": rope["theta"],
            "rope_dim": int(head_dim * rope["partial"]) // 2 * 2, "rope_scaling": rope["scaling"],
            "norm_eps": float(get("rms_norm_eps", 1e-5)),
        }

    global_layer_type: str | None = "full_attention"   # the rope_parameters map of full-attention layers

    # ---- tensors ----
    def source_tensors(self, source: Any, hp: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """(normalized name, tensor) for every tensor the archive keeps; a family splits fused ones here, and
        GGUF's 3-D expert tensors become one per expert (archs/moe.py)."""
        from .moe import split_experts

        for t in source.tensors:
            name = t.name if source.format == "gguf" else self.normalize_hf_name(t.name)
            if name is not None:
                yield from split_experts(name, t)

    def normalize_hf_name(self, name: str) -> str | None:
        """HF name -> normalized name, None for tensors to drop; unknown names raise SourceError."""
        for pat, target in self._patterns():
            m = pat.match(name)
            if m:
                for g in m.groups() if target is not None else ():  # the layer, then (experts) the expert
                    target = target.replace("{}", g, 1)
                return target
        raise SourceError(f"tensor {name!r} is not part of the {self.name} layout")

    def _patterns(self) -> list[tuple[re.Pattern, str | None]]:
        cached = self.__dict__.get("_compiled")
        if cached is None:
            table = {**HF_RENAME, **self.hf_rename}
            cached = self.__dict__["_compiled"] = [(_pattern(k), v) for k, v in table.items()]
        return cached

    # ---- graph ----
    def window(self, hp: dict[str, Any], layer: int) -> int | None:
        """The sliding window of a layer's attention, None for full attention."""
        w = hp.get("sliding_window")
        if not w:
            return None
        swa = hp.get("swa_layers")
        return w if swa is None or swa[layer] else None

    def graph(self, hp: dict[str, Any], tensor_names: set[str], freq_factors: list[float] | None) -> dict[str, Any]:
        """The access graph of one forward pass (steps of ops; packs are filled in by the planner)."""
        tied = "output.weight" not in tensor_names
        norm = _norm_op(hp)
        embed = [op("embed", ["tokens"], "x", ["token_embd.weight"])]
        if hp.get("embed_scale"):
            embed.append(op("scale", ["x"], "x", factor=hp["embed_scale"]))
        steps = [{"name": "embed", "kind": "embed", "layer": None, "gather": True, "ops": embed}]
        glu = "geglu" if self.act == "gelu_tanh" else "swiglu"
        hd = hp["head_dim"]
        for i in range(hp["n_layers"]):
            b = f"blk.{i}."
            window = self.window(hp, i)
            local_rope = window is not None and hp.get("rope_theta_swa")
            rope = {"n_heads": hp["n_heads"], "head_dim": hd, "rope_dim": hp["rope_dim"],
                    "theta": hp["rope_theta_swa"] if local_rope else hp["rope_theta"], "mode": hp["rope_mode"],
                    "freq_factors": None if local_rope else freq_factors}
            src = "x"
            ops = []
            if self.pre_norms:
                ops.append(norm(["x"], "h", b + "attn_norm.weight"))
                src = "h"
            for proj in ("q", "k", "v"):
                ops.append(_linear([src], proj, b + f"attn_{proj}", tensor_names))
            if self.qk_norm:
                group = {} if self.qk_norm == "full" else {"group": hd}
                ops.append(norm(["q"], "q", b + "attn_q_norm.weight", **group))
                ops.append(norm(["k"], "k", b + "attn_k_norm.weight", **group))
            ops.append(op("rope", ["q"], "q", **rope))
            ops.append(op("rope", ["k"], "k", **{**rope, "n_heads": hp["n_kv_heads"]}))
            attn = {"layer": i, "n_heads": hp["n_heads"], "n_kv_heads": hp["n_kv_heads"], "head_dim": hd,
                    "scale": hp.get("attn_scale") or 1.0 / math.sqrt(hd)}
            if hp.get("attn_softcap"):
                attn["softcap"] = hp["attn_softcap"]
            if window is not None:
                attn["window"] = window
            ops.append(op("attention", ["q", "k", "v"], "o", **attn))
            ops.append(_linear(["o"], "a", b + "attn_output", tensor_names))
            ops += self._residual(hp, norm, b + "post_attention_norm.weight")
            steps.append({"name": f"blk.{i}.attn", "kind": "attn", "layer": i, "gather": False, "ops": ops})
            src = "x"
            ops = []
            if self.pre_norms:
                ops.append(norm(["x"], "h", b + "ffn_norm.weight"))
                src = "h"
            if b + "ffn_gate_inp.weight" in tensor_names:  # a mixture of experts (archs/moe.py)
                from .moe import moe_ops

                ops += moe_ops(hp, i, src, tensor_names)
            else:
                ops += [_linear([src], "g", b + "ffn_gate", tensor_names),
                        _linear([src], "u", b + "ffn_up", tensor_names),
                        op(glu, ["g", "u"], "m"),
                        _linear(["m"], "a", b + "ffn_down", tensor_names)]
            ops += self._residual(hp, norm, b + "post_ffw_norm.weight")
            steps.append({"name": f"blk.{i}.mlp", "kind": "mlp", "layer": i, "gather": False, "ops": ops})
        head = "token_embd.weight" if tied else "output.weight"
        ops = [op("last_token", ["x"], "x"), norm(["x"], "h", "output_norm.weight"), op("linear", ["h"], "logits", [head])]
        if hp.get("logit_scale"):
            ops.append(op("scale", ["logits"], "logits", factor=hp["logit_scale"]))
        if hp.get("final_softcap"):
            ops.append(op("softcap", ["logits"], "logits", cap=hp["final_softcap"]))
        steps.append({"name": "head", "kind": "head", "layer": None, "gather": False, "ops": ops})
        return {"steps": steps, "loop_to": 0, "inputs": ["tokens", "positions"], "outputs": ["logits"],
                "kv_cache": {"n_layers": hp["n_layers"], "n_kv_heads": hp["n_kv_heads"], "head_dim": hd}}

    def _residual(self, hp: dict[str, Any], norm: Any, post_norm: str) -> list[dict[str, Any]]:
        """A branch's output `a` added to the residual stream: post-norm and multiplier where the family has them."""
        ops = []
        if self.post_norms:
            ops.append(norm(["a"], "a", post_norm))
        if hp.get("residual_scale"):
            ops.append(op("scale", ["a"], "a", factor=hp["residual_scale"]))
        ops.append(op("add", ["x", "a"], "x"))
        return ops

    def pack_group(self, name: str) -> tuple[str, int | None]:
        """(pack kind, layer) a normalized tensor belongs to."""
        if name.startswith("token_embd."):
            return "embed", None
        if name.startswith(("output_norm.", "output.")):
            return "head", None
        m = re.match(r"^blk\.(\d+)\.ffn_(?:gate|up|down)\.\d+\.weight$", name)
        if m:  # one expert's matrix: its own pack (archs/moe.py)
            return "expert", int(m.group(1))
        m = re.match(r"^blk\.(\d+)\.(attn|ffn|post_attention|post_ffw)_", name)
        if m:
            return ("attn" if m.group(2) in ("attn", "post_attention") else "mlp"), int(m.group(1))
        raise SourceError(f"tensor {name!r} does not belong to any pack group of {self.name}")


_ACTS = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")}


def _pattern(hf_name: str) -> re.Pattern:
    return re.compile("^" + re.escape(hf_name).replace(r"\{\}", r"(\d+)") + "$")


def _norm_op(hp: dict[str, Any]) -> Any:
    offset = hp.get("norm_offset") or 0.0

    def norm(inputs: list[str], out: str, weight: str, **attrs: Any) -> dict[str, Any]:
        extra = {"offset": offset} if offset else {}
        return op("rms_norm", inputs, out, [weight], eps=hp["norm_eps"], **attrs, **extra)
    return norm


def hf_windows(cfg: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    """{"sliding_window", "swa_layers"} as transformers applies them: `layer_types` (transformers 5, and
    gemma) names each layer's attention; else a `sliding_window` applies to every layer unless
    `use_sliding_window` is false (qwen2 configs carry a window they do not use)."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != hp["n_layers"]:
            raise SourceError(f"config.json layer_types: expected a list of {hp['n_layers']} layer types")
        unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention")}, key=str)
        if unknown:
            raise SourceError(f"config.json layer_types: {unknown[0]!r} is not supported "
                              "(full_attention, sliding_attention are)")
        swa = [t == "sliding_attention" for t in types]
        if not any(swa):
            return {}
        if window is None:
            raise SourceError("config.json layer_types names sliding_attention layers but sliding_window is null")
    elif window is None or cfg.get("use_sliding_window") is False:
        return {}
    else:
        swa = [True] * hp["n_layers"]
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise SourceError(f"config.json sliding_window {window!r}: expected a positive integer")
    if window >= hp["context"] and all(swa):
        return {}  # a window as long as the context never hides a position
    return {"sliding_window": window, "swa_layers": swa}


def gguf_getter(meta: dict[str, Any], arch: str) -> Any:
    """get(key[, default]) of `arch.key` in GGUF metadata; a missing key without default is an error."""
    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is KeyError:
            raise SourceError(f"GGUF metadata lacks {full}")
        return default
    return get


def hf_getter(cfg: dict[str, Any]) -> Any:
    """get(key[, default]) of a config.json value; null counts as absent."""
    def get(key: str, default: Any = KeyError) -> Any:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
        if default is KeyError:
            raise SourceError(f"config.json lacks {key!r}")
        return default
    return get


def op(name: str, inputs: list[str], out: str, weights: list[str] | None = None, **attrs: Any) -> dict[str, Any]:
    return {"op": name, "in": inputs, "out": out, "w": weights or [], "attrs": attrs}


def _linear(inputs: list[str], out: str, base: str, names: set[str]) -> dict[str, Any]:
    w = [base + ".weight"]
    if base + ".bias" in names:
        w.append(base + ".bias")
    return op("linear", inputs, out, w)
