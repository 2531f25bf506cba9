"""Write an HF folder of a supported family as a GGUF, in the layout llama.cpp's converter produces.

Used by the family tests: the same weights as the HF folder, so vkpack's GGUF path can be checked against
transformers. What follows llama.cpp's converter (facts of the format, not its code): the tensor names
(`blk.N.attn_q`, `post_attention_norm`, `post_ffw_norm`, phi3's fused `attn_qkv` and gate+up `ffn_up`), q/k
rows permuted to adjacent-pair rope order for llama, mistral and granite, gemma's norms stored as w + 1,
llama3 rope scaling as a `rope_freqs` tensor, and the metadata keys of each architecture. Two keys llama.cpp
does not write for these families are written where the model needs them: `attention.scale` when gemma's
query_pre_attn_scalar is not what llama.cpp would assume, and `attention.sliding_window` for mistral.

`reference_state_dict` goes the other way (GGUF -> dequantized HF tensors, through gguf-py's dequantizer),
so that a quantized GGUF can be compared with transformers running the very same rounded weights.

Types: F32, F16, BF16, Q8_0 (gguf-py's quantizers) and Q4_K (the small quantizer below; gguf-py has no
K-quant quantizer). 1-D tensors stay F32; a matrix whose rows are not whole blocks falls back to F16 with a
warning, as llama.cpp's quantizer falls back.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_synthetic import add_gguf_tokenizer
from vkpack.compiler.archs.gemma import Gemma2, Gemma3

log = logging.getLogger(__name__)
GT = gguf.GGMLQuantizationType
TYPES = {"F32": GT.F32, "F16": GT.F16, "BF16": GT.BF16, "Q8_0": GT.Q8_0, "Q4_K": GT.Q4_K}
# HF model_type -> GGUF architecture
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "olmo2": "olmo2", "granite": "granite", "phi3": "phi3",
        "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
PERMUTED = ("llama", "granite")      # GGUF architectures whose q/k rows the converter permutes
GEMMA = ("gemma2", "gemma3")
_LAYER = {  # HF name after "model.layers.N." -> GGUF name after "blk.N."
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    # mixtures of experts: the router, the shared expert (qwen2moe) and its sigmoid gate, stored [E] (llama.cpp
    # declares it {n_embd}); the experts themselves go through EXPERT below
    "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
# one expert's matrix, HF -> the 3-D GGUF tensor it is a slice of (llama.cpp's converter stacks them by expert)
EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                    r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_EXPERT_MATRIX = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_POST_ATTN = "post_attention_norm.weight"   # gemma and olmo2: post_attention_layernorm is the attention's post-norm
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_name(hf: str, model_type: str) -> str:
    if hf in _TOP:
        return _TOP[hf]
    parts = hf.split(".", 3)
    if parts[:2] != ["model", "layers"] or parts[3] not in _LAYER:
        raise ValueError(f"no GGUF name for {hf!r}")
    tail = _LAYER[parts[3]]
    if parts[3] == "post_attention_layernorm.weight" and ARCH[model_type] in (*GEMMA, "olmo2"):
        tail = _POST_ATTN
    return f"blk.{parts[2]}.{tail}"


def _gguf_tensors(weights: dict[str, np.ndarray], model_type: str) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) in the source's order, each layer's experts stacked into `ffn_*_exps` [n, rows, cols]
    where its first expert tensor was, and the shared expert's gate [1, E] as [E]."""
    out: list[tuple[str, Any]] = []
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for hf, x in weights.items():
        m = EXPERT.match(hf)
        if m is None:
            name = gguf_name(hf, model_type)
            out.append((name, x.reshape(-1) if name.endswith("ffn_gate_inp_shexp.weight") else x))
            continue
        name = f"blk.{m.group(1)}.ffn_{_EXPERT_MATRIX[m.group(3)]}_exps.weight"
        if name not in stacks:
            stacks[name] = {}
            out.append((name, stacks[name]))
        stacks[name][int(m.group(2))] = x
    return [(n, np.stack([x[e] for e in range(len(x))]) if isinstance(x, dict) else x) for n, x in out]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rope rows -> GGUF's adjacent-pair order (each head's two halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder: Path | str, out: Path | str, dtype: str = "F32") -> Path:
    """The HF folder's model as one GGUF at `out`, its matrices stored as `dtype`."""
    from safetensors.numpy import load_file

    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    mt = cfg["model_type"]
    arch = ARCH[mt]
    weights: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(f))
    w = gguf.GGUFWriter(out, arch)
    _metadata(w, cfg, arch, dtype)
    add_gguf_tokenizer(w, cfg["vocab_size"])
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, x in _gguf_tensors(weights, mt):
        x = x.astype(np.float32)
        if arch in PERMUTED and name.endswith("attn_q.weight"):
            x = permute(x, heads)
        elif arch in PERMUTED and name.endswith("attn_k.weight"):
            x = permute(x, kv)
        if arch in GEMMA and name.endswith("norm.weight"):
            x = x + np.float32(1.0)
        qt = _type_for(x, dtype, name)
        shape = gguf.quants.quant_shape_to_byte_shape(x.shape, qt)      # numpy order, in bytes
        w.add_tensor(name, np.ascontiguousarray(_encode(x, qt)).view(np.uint8).reshape(shape), raw_shape=shape,
                     raw_dtype=qt)
    freqs = _llama3_rope_freqs(cfg)
    if freqs is not None:
        w.add_tensor("rope_freqs.weight", freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _metadata(w: gguf.GGUFWriter, cfg: dict[str, Any], arch: str, dtype: str) -> None:
    K = gguf.Keys
    a = arch
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = _rope(cfg)
    w.add_uint32(K.General.FILE_TYPE, {"F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q4_K": 15}[dtype])
    w.add_uint32(K.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    w.add_uint32(K.LLM.VOCAB_SIZE.format(arch=a), cfg["vocab_size"])
    w.add_uint32(K.LLM.CONTEXT_LENGTH.format(arch=a), cfg["max_position_embeddings"])
    w.add_uint32(K.LLM.EMBEDDING_LENGTH.format(arch=a), cfg["hidden_size"])
    w.add_uint32(K.LLM.FEED_FORWARD_LENGTH.format(arch=a), cfg["intermediate_size"])
    w.add_uint32(K.LLM.BLOCK_COUNT.format(arch=a), cfg["num_hidden_layers"])
    w.add_uint32(K.Attention.HEAD_COUNT.format(arch=a), cfg["num_attention_heads"])
    w.add_uint32(K.Attention.HEAD_COUNT_KV.format(arch=a), cfg["num_key_value_heads"])
    w.add_uint32(K.Attention.KEY_LENGTH.format(arch=a), hd)
    w.add_uint32(K.Attention.VALUE_LENGTH.format(arch=a), hd)
    w.add_float32(K.Attention.LAYERNORM_RMS_EPS.format(arch=a), cfg["rms_norm_eps"])
    w.add_float32(K.Rope.FREQ_BASE.format(arch=a), rope["rope_theta"])
    rot = hd if arch != "phi3" else int(rope.get("partial_rotary_factor", 1.0) * cfg["hidden_size"]) // cfg["num_attention_heads"]
    w.add_uint32(K.Rope.DIMENSION_COUNT.format(arch=a), rot)
    if rope.get("rope_type") == "linear":
        w.add_string(K.Rope.SCALING_TYPE.format(arch=a), "linear")
        w.add_float32(K.Rope.SCALING_FACTOR.format(arch=a), rope["factor"])
    if arch in GEMMA:
        scalar = cfg["query_pre_attn_scalar"]
        big = {"gemma2": Gemma2.big_layers, "gemma3": Gemma3.big_layers}[arch]   # llama.cpp's 27B rule
        assumed = cfg["hidden_size"] // cfg["num_attention_heads"] if cfg["num_hidden_layers"] == big else hd
        if scalar != assumed:
            w.add_float32(K.Attention.SCALE.format(arch=a), scalar ** -0.5)
        if cfg.get("attn_logit_softcapping"):
            w.add_float32(K.LLM.ATTN_LOGIT_SOFTCAPPING.format(arch=a), cfg["attn_logit_softcapping"])
        if cfg.get("final_logit_softcapping"):
            w.add_float32(K.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=a), cfg["final_logit_softcapping"])
    if cfg.get("sliding_window"):
        w.add_uint32(K.Attention.SLIDING_WINDOW.format(arch=a), cfg["sliding_window"])
        if arch == "gemma3":
            w.add_array(K.Attention.SLIDING_WINDOW_PATTERN.format(arch=a),
                        [t == "sliding_attention" for t in cfg["layer_types"]])
            w.add_float32(K.Rope.FREQ_BASE_SWA.format(arch=a), cfg["rope_parameters"]["sliding_attention"]["rope_theta"])
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if n_experts:   # as llama.cpp's converter writes them; the top-k renormalization is llama.cpp's per architecture
        if arch == "qwen3moe" and not cfg.get("norm_topk_prob") or arch in ("qwen2moe", "olmoe") and cfg.get("norm_topk_prob"):
            log.warning("%s: norm_topk_prob %s differs from what llama.cpp assumes for %s GGUFs",
                        cfg["model_type"], cfg.get("norm_topk_prob"), arch)
        w.add_uint32(K.LLM.EXPERT_COUNT.format(arch=a), n_experts)
        w.add_uint32(K.LLM.EXPERT_USED_COUNT.format(arch=a), cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_uint32(K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_uint32(K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=a), cfg["shared_expert_intermediate_size"])
    if arch == "granite":
        w.add_float32(K.LLM.EMBEDDING_SCALE.format(arch=a), cfg["embedding_multiplier"])
        w.add_float32(K.Attention.SCALE.format(arch=a), cfg["attention_multiplier"])
        w.add_float32(K.LLM.RESIDUAL_SCALE.format(arch=a), cfg["residual_multiplier"])
        w.add_float32(K.LLM.LOGIT_SCALE.format(arch=a), cfg["logits_scaling"])


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    p = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {})}
    return p.get("full_attention", p)


def _llama3_rope_freqs(cfg: dict[str, Any]) -> np.ndarray | None:
    """llama3 scaling as llama.cpp stores it: one divisor per frequency, 1 for short wavelengths."""
    p = _rope(cfg)
    if p.get("rope_type") != "llama3":
        return None
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    factor, lo, hi, old = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    out = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * p["rope_theta"] ** (i / hd)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _type_for(x: np.ndarray, dtype: str, name: str) -> GT:
    if x.ndim == 1 or dtype == "F32":
        return GT.F32
    qt = TYPES[dtype]
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if x.shape[-1] % block:
        log.warning("%s: rows of %d are not whole %s blocks; stored as F16", name, x.shape[-1], dtype)
        return GT.F16
    return qt


def _encode(x: np.ndarray, qt: GT) -> np.ndarray:
    if qt == GT.F32:
        return x
    if qt == GT.F16:
        return x.astype(np.float16)
    if qt == GT.Q4_K:
        return quantize_q4_k(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    return gguf.quants.quantize(x, qt)


# ---- Q4_K ----
# block_q4_K (144 B per 256 values): f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128
# bytes of 4-bit codes; value = d * sc_j * q - dmin * m_j for sub-block j of 32.


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q4_K of rows whose length is a multiple of 256: uint8 [rows, cols / 256 * 144]."""
    rows, cols = x.shape
    sub = x.reshape(-1, 8, 32).astype(np.float32)                         # [blocks, 8 sub-blocks, 32]
    lo = np.minimum(sub.min(-1), 0.0)                                     # the offset is never positive
    scale = (sub.max(-1) - lo) / 15.0
    d = (scale.max(-1) / 63.0).astype(np.float16)                         # [blocks]
    dmin = ((-lo).max(-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(np.divide(-lo, dmin32, out=np.zeros_like(lo), where=dmin32 > 0)), 0, 63).astype(np.uint8)
    step = (d32 * sc)[..., None]
    q = np.divide(sub + (dmin32 * mn)[..., None], step, out=np.zeros_like(sub), where=step > 0)
    q = np.clip(np.rint(q), 0, 15).astype(np.uint8)                       # [blocks, 8, 32]
    scales = np.zeros((len(sub), 12), np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(len(sub), 128)          # sub-blocks 2c (low) and 2c+1 (high)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return out.reshape(rows, cols // 256 * 144)


# ---- back to HF, for the reference ----


def reference_state_dict(path: Path | str, cfg: dict[str, Any], hf_names: list[str]) -> dict[str, np.ndarray]:
    """HF name -> float32 tensor as the GGUF at `path` stores it (dequantized, permutation and gemma's +1
    undone): what transformers should compute with to match a run of that GGUF."""
    reader = gguf.GGUFReader(path)
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        [int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    arch, heads, kv = ARCH[cfg["model_type"]], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {}
    for hf in hf_names:
        m = EXPERT.match(hf)
        if m is not None:  # one expert's slice of the stacked tensor
            out[hf] = np.asarray(stored[f"blk.{m.group(1)}.ffn_{_EXPERT_MATRIX[m.group(3)]}_exps.weight"][int(m.group(2))],
                                 dtype=np.float32)
            continue
        name = gguf_name(hf, cfg["model_type"])
        x = np.asarray(stored[name], dtype=np.float32)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            x = x.reshape(1, -1)
        if arch in GEMMA and name.endswith("norm.weight"):
            x = x - np.float32(1.0)
        if arch in PERMUTED and name.endswith("attn_q.weight"):
            x = unpermute(x, heads)
        elif arch in PERMUTED and name.endswith("attn_k.weight"):
            x = unpermute(x, kv)
        out[hf] = x
    return out
