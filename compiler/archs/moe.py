"""Mixture-of-experts layers for any family: hyperparameters, one tensor per expert matrix, the moe op.

A layer is a MoE layer when its router `blk.N.ffn_gate_inp.weight` is present (qwen3moe's
`mlp_only_layers` stay dense). Each expert matrix is a tensor of its own, `blk.N.ffn_{gate,up,down}.E.weight`
(llama.cpp's per-expert names), so that the planner can give each expert its own pack: GGUF's 3-D
`ffn_*_exps` tensors are cut at expert boundaries (each expert's rows are contiguous bytes, in every
block type), and HF's per-expert tensors are renamed. The shared expert keeps GGUF's `_shexp` names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from ...pack_format.errors import SourceError
from ..hparams_check import check_value
from .base import gguf_getter, hf_getter, op

EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down)\.(\d+)\.weight$")
_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
MATRICES = ("gate", "up", "down")
SHARED = ("ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
SHARED_GATE = "ffn_gate_inp_shexp.weight"

# HF names of the qwen2moe / qwen3moe / olmoe layout ("{}" the layer, then the expert)
HF_MLP_EXPERTS: dict[str, str | None] = {
    "model.layers.{}.mlp.gate.weight": "blk.{}.ffn_gate_inp.weight",
    "model.layers.{}.mlp.experts.{}.gate_proj.weight": "blk.{}.ffn_gate.{}.weight",
    "model.layers.{}.mlp.experts.{}.up_proj.weight": "blk.{}.ffn_up.{}.weight",
    "model.layers.{}.mlp.experts.{}.down_proj.weight": "blk.{}.ffn_down.{}.weight",
    "model.layers.{}.mlp.shared_expert.gate_proj.weight": "blk.{}.ffn_gate_shexp.weight",
    "model.layers.{}.mlp.shared_expert.up_proj.weight": "blk.{}.ffn_up_shexp.weight",
    "model.layers.{}.mlp.shared_expert.down_proj.weight": "blk.{}.ffn_down_shexp.weight",
    "model.layers.{}.mlp.shared_expert_gate.weight": "blk.{}.ffn_gate_inp_shexp.weight",
}


def expert_index(name: str) -> int | None:
    """The expert a normalized tensor belongs to, None for every other tensor."""
    m = EXPERT.match(name)
    return int(m.group(2)) if m else None


def split_experts(name: str, t: Any) -> Iterator[tuple[str, Any]]:
    """GGUF's 3-D `blk.N.ffn_*_exps` [n, rows, cols] as n tensors [rows, cols] (same file, later offsets),
    and the shared expert's gate [E] as [1, E] (one row either way); every other tensor as it is."""
    m = _EXPS.match(name)
    if m is None:
        if name.endswith("." + SHARED_GATE) and len(t.shape) == 1:
            return iter([(name, replace(t, shape=(1, t.shape[0])))])
        return iter([(name, t)])
    if len(t.shape) != 3:
        raise SourceError(f"tensor {name!r} has shape {list(t.shape)}; expected [experts, rows, columns]")
    n, rows = t.shape[0], t.shape[1]
    per = rows * t.row_bytes
    return iter([(f"blk.{m.group(1)}.ffn_{m.group(2)}.{e}.weight",
                  replace(t, shape=t.shape[1:], nbytes=per, offset=t.offset + e * per)) for e in range(n)])


def moe_hparams(source: Any, family: Any) -> dict[str, Any]:
    """n_experts, n_experts_used, expert_ffn, shared_ffn and moe_norm (renormalize the top-k weights), or
    {} for a dense model. GGUF: the top-k renormalization is the family's, as llama.cpp hard-codes it per
    architecture; HF: config.json's norm_topk_prob (transformers' default: false) unless the family fixes it."""
    if source.format == "gguf":
        arch = source.arch_names[0]
        get = gguf_getter(source.meta, arch)
        where = f"GGUF {arch}."
        n, k = get("expert_count", 0), get("expert_used_count", 0)
        ffn, shared = get("expert_feed_forward_length", None), get("expert_shared_feed_forward_length", 0)
        scale = get("expert_weights_scale", 0.0)
        check_value(scale, "count0" if scale == 0 else "positive", where + "expert_weights_scale")
        if scale not in (0, 1):
            raise SourceError(f"{where}expert_weights_scale {scale}: scaled expert weights are not supported")
        norm = family.gguf_moe_norm
    else:
        cfg = source.meta
        get = hf_getter(cfg)
        where = "config.json "
        n = get("num_local_experts", None) or get("num_experts", 0)
        k = get("num_experts_per_tok", 0)
        ffn, shared = get("moe_intermediate_size", None), get("shared_expert_intermediate_size", 0)
        norm = family.hf_moe_norm if family.hf_moe_norm is not None else get("norm_topk_prob", False)
        if not isinstance(norm, bool):
            raise SourceError(f"config.json norm_topk_prob {norm!r}: expected true or false")
    for key, v in (("expert_count", n), ("expert_used_count", k), ("expert_ffn", ffn), ("shared_ffn", shared)):
        check_value(v, "count0", where + key)
    if not n:
        return {}
    if not 1 <= k <= n:
        raise SourceError(f"{where}{'expert_used_count' if source.format == 'gguf' else 'num_experts_per_tok'} {k}: "
                          f"expected 1 to the {n} experts")
    return {"n_experts": int(n), "n_experts_used": int(k), "expert_ffn": int(ffn) if ffn else None,
            "shared_ffn": int(shared), "moe_norm": norm}


def moe_ops(hp: dict[str, Any], layer: int, src: str, names: set[str]) -> list[dict[str, Any]]:
    """Layer `layer`'s MLP as one moe op (router, top-k experts, optional gated shared expert) -> `a`."""
    b = f"blk.{layer}."
    n = hp.get("n_experts")
    if not n:
        raise SourceError(f"tensor {b}ffn_gate_inp.weight is a router, but the model states no expert count")
    experts = [[f"{b}ffn_{m}.{e}.weight" for m in MATRICES] for e in range(n)]
    have = {x for x in names if x.startswith(b) and EXPERT.match(x)}
    want = {x for e in experts for x in e}
    if have != want:
        odd = sorted(want - have)[:1] or sorted(have - want)[:1]
        raise SourceError(f"layer {layer} has {len(have)} expert matrices for {n} experts of 3 ({odd[0]!r} "
                          f"{'missing' if odd[0] in want else 'unexpected'})")
    if hp.get("act", "silu") != "silu":
        raise SourceError(f"layer {layer}: experts with activation {hp['act']!r} are not supported (silu is)")
    w = [b + "ffn_gate_inp.weight"]
    shared = [b + s for s in SHARED]
    if any(s in names for s in shared):
        if not all(s in names for s in shared):
            raise SourceError(f"layer {layer}: a shared expert needs {', '.join(shared)}")
        w += shared
        if b + SHARED_GATE in names:
            w.append(b + SHARED_GATE)
    elif b + SHARED_GATE in names:
        raise SourceError(f"layer {layer} has {b}{SHARED_GATE} but no shared expert")
    return [op("moe", [src], "a", w, k=hp["n_experts_used"], router="softmax", norm=hp["moe_norm"],
               experts=experts)]
