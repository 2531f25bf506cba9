"""Phi-3 / Phi-3.5 / Phi-4 (dense): llama's decoder with q, k, v stored as one fused `qkv` matrix and gate
and up as one `gate_up` matrix (gate first). The compiler splits them by rows at build time, which costs
nothing (rows are whole blocks in every GGUF type) and leaves the runtime's graph the llama one.

Rope is neox and may cover only part of each head (`partial_rotary_factor`). A sliding window applies to
every layer, as transformers applies it (llama.cpp ignores phi3's window; the two differ past it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

from ...pack_format.errors import SourceError
from . import register
from .base import Family

_PHI3_RENAME: dict[str, str | None] = {
    "model.layers.{}.self_attn.qkv_proj.weight": "blk.{}.attn_qkv.weight",
    "model.layers.{}.mlp.gate_up_proj.weight": "blk.{}.ffn_gate_up.weight",
}


@register
class Phi3(Family):
    name = "phi3"
    hf_architectures = ("Phi3ForCausalLM",)
    gguf_architectures = ("phi3",)
    gguf_rope_mode = "neox"
    hf_rename: ClassVar[dict[str, str | None]] = _PHI3_RENAME

    def source_tensors(self, source: Any, hp: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        gguf = source.format == "gguf"
        for name, t in super().source_tensors(source, hp):
            if name.startswith("rope_factors_"):
                raise SourceError(f"tensor {name!r}: phi3's longrope scaling is not supported")
            if name.endswith(".attn_qkv.weight"):
                q, kv = hp["n_heads"] * hp["head_dim"], hp["n_kv_heads"] * hp["head_dim"]
                yield from _split(name, t, [("attn_q", q), ("attn_k", kv), ("attn_v", kv)])
            elif name.endswith(".ffn_gate_up.weight") or (gguf and name.endswith(".ffn_up.weight")):
                yield from _split(name, t, [("ffn_gate", hp["ffn"]), ("ffn_up", hp["ffn"])])
            else:
                yield name, t


def _split(name: str, t: Any, parts: list[tuple[str, int]]) -> Iterator[tuple[str, Any]]:
    """Row ranges of a fused matrix as tensors of their own (same file, later offsets)."""
    rows = sum(n for _, n in parts)
    if len(t.shape) != 2 or t.shape[0] != rows:
        raise SourceError(f"tensor {name!r} has shape {list(t.shape)}; its parts need {rows} rows")
    prefix = name.rsplit(".", 2)[0]
    row = 0
    for part, n in parts:
        yield f"{prefix}.{part}.weight", replace(t, shape=(n, t.shape[1]), nbytes=n * t.row_bytes,
                                                 offset=t.offset + row * t.row_bytes)
        row += n
