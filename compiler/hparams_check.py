"""Hyperparameter checks: refuse a bad model up front, with a message that names the key.

Two passes, around the family file (compiler/archs/) that turns source metadata into normalized
hyperparameters:

- `check_source_keys` before it: the GGUF or config.json keys a family reads must have sane
  types and values (a head count of 0 would divide by zero there, inf would overflow `int()`,
  an array where a number belongs would raise TypeError);
- `check_hparams` after it: the normalized values must satisfy docs/FORMAT.md §6.2 and rule 11,
  and agree with the tensors actually present (layer count, every shape), so that no size is
  ever derived from a count the weights do not back (`block_count` 2^32, `num_hidden_layers`
  10^9), and a file with fewer or more layers than it claims is refused instead of run wrongly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..pack_format.errors import SourceError

MAX_COUNT = 1 << 40  # a count or dimension (docs/FORMAT.md rule 11, rule 16)

# GGUF keys (after "<arch>.") and config.json keys a family reads: key -> "count" | "count0" | "positive"
GGUF_KEYS = {
    "block_count": "count", "embedding_length": "count", "attention.head_count": "count",
    "attention.head_count_kv": "count", "attention.key_length": "count", "feed_forward_length": "count",
    "vocab_size": "count", "context_length": "count", "rope.dimension_count": "count",
    "rope.scaling.original_context_length": "count0", "rope.freq_base": "positive",
    "attention.layer_norm_rms_epsilon": "positive", "rope.scaling.factor": "positive",
}
HF_KEYS = {
    "num_hidden_layers": "count", "hidden_size": "count", "num_attention_heads": "count",
    "num_key_value_heads": "count", "head_dim": "count", "intermediate_size": "count", "vocab_size": "count",
    "max_position_embeddings": "count", "rope_theta": "positive", "rms_norm_eps": "positive",
}
HF_SCALING_KEYS = {"factor": "positive", "original_max_position_embeddings": "count0",
                   "low_freq_factor": "positive", "high_freq_factor": "positive"}
# normalized key -> where it comes from, for messages
SOURCE_NAMES = {
    "n_layers": ("block_count", "num_hidden_layers"), "hidden": ("embedding_length", "hidden_size"),
    "n_heads": ("attention.head_count", "num_attention_heads"),
    "n_kv_heads": ("attention.head_count_kv", "num_key_value_heads"), "head_dim": ("attention.key_length", "head_dim"),
    "ffn": ("feed_forward_length", "intermediate_size"), "vocab": ("vocab_size", "vocab_size"),
    "context": ("context_length", "max_position_embeddings"), "rope_dim": ("rope.dimension_count", "head_dim"),
    "rope_theta": ("rope.freq_base", "rope_theta"), "norm_eps": ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
}


# ---- before the family: source keys ----
def check_source_keys(source: Any) -> None:
    """SourceError naming the first GGUF / config.json key a family reads whose value is unusable."""
    if source.format == "gguf":
        prefix = f"{source.arch_names[0]}."
        for key, kind in GGUF_KEYS.items():
            check_value(source.meta.get(prefix + key), kind, f"GGUF key {prefix + key}")
        return
    cfg = source.meta
    for key, kind in HF_KEYS.items():
        check_value(cfg.get(key), kind, f"config.json {key!r}")
    rs = cfg.get("rope_scaling")
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise SourceError(f"config.json 'rope_scaling': expected an object or null, got {_show(rs)}")
    for key, kind in HF_SCALING_KEYS.items():
        check_value(rs.get(key), kind, f"config.json 'rope_scaling.{key}'")
    kind = rs.get("rope_type", rs.get("type"))
    if kind is not None and not isinstance(kind, str):
        raise SourceError(f"config.json 'rope_scaling.rope_type': expected a string, got {_show(kind)}")


def check_value(v: Any, kind: str, where: str) -> None:
    """SourceError naming `where` unless v is None or a finite number of `kind`: "count" (an integer in
    [1, MAX_COUNT]), "count0" (the same from 0) or "positive" (> 0)."""
    if v is None:
        return  # absent: the family's default applies (or it reports the missing key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SourceError(f"{where}: expected a number, got {_show(v)}")
    if not math.isfinite(v):
        raise SourceError(f"{where}: {v} is not a finite number")
    if kind == "positive":
        if v <= 0:
            raise SourceError(f"{where}: {v} must be > 0")
        return
    low = 0 if kind == "count0" else 1
    if v != int(v) or not low <= v <= MAX_COUNT:
        raise SourceError(f"{where}: {_show(v)} must be an integer in [{low}, {MAX_COUNT}]")


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


# ---- after the family: normalized values against the tensors ----
def check_hparams(hp: Mapping[str, Any], tensors: Mapping[str, Any], source_format: str) -> None:
    """SourceError naming the key when the normalized hyperparameters break docs/FORMAT.md §6.2,
    or disagree with the tensors present (their layers and shapes)."""
    hf = source_format != "gguf"

    def name(key: str) -> str:
        src = SOURCE_NAMES.get(key)
        return f"{key} ({src[hf]})" if src else key

    for key in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab", "context", "rope_dim"):
        v = hp.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_COUNT:
            raise SourceError(f"hyperparameter {name(key)}: {_show(v)} must be an integer in [1, {MAX_COUNT}]")
    for key in ("rope_theta", "norm_eps"):
        v = hp.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SourceError(f"hyperparameter {name(key)}: {_show(v)} must be a finite number > 0")
    if hp["n_heads"] % hp["n_kv_heads"]:
        raise SourceError(f"hyperparameter {name('n_heads')}: {hp['n_heads']} is not a multiple of "
                          f"{name('n_kv_heads')} {hp['n_kv_heads']}")
    if hp["rope_dim"] % 2 or hp["rope_dim"] > hp["head_dim"]:
        raise SourceError(f"hyperparameter {name('rope_dim')}: {hp['rope_dim']} must be even and at most "
                          f"{name('head_dim')} {hp['head_dim']}")
    _check_scaling(hp.get("rope_scaling"))
    _check_layers(hp, tensors, name("n_layers"))
    _check_shapes(hp, tensors, name)


def _check_scaling(sc: Any) -> None:
    if sc is None:
        return
    if not isinstance(sc, dict):
        raise SourceError(f"hyperparameter rope_scaling: {_show(sc)} is not a map")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        v = sc.get(key, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SourceError(f"hyperparameter rope_scaling.{key}: {_show(v)} must be a finite number > 0")
    if sc.get("type") == "llama3":
        if not isinstance(sc.get("original_context"), int) or sc["original_context"] < 1:
            raise SourceError(f"hyperparameter rope_scaling.original_context: {_show(sc.get('original_context'))} "
                              "must be a positive integer for llama3 scaling")
        if sc.get("low_freq_factor", 1.0) >= sc.get("high_freq_factor", 4.0):
            raise SourceError("hyperparameter rope_scaling: low_freq_factor must be below high_freq_factor")


_LAYER = re.compile(r"^blk\.(\d+)\.")


def _check_layers(hp: Mapping[str, Any], tensors: Mapping[str, Any], key: str) -> None:
    """The layer count must be exactly the layers whose tensors are present: a smaller count would
    drop layers silently, a larger one size the KV cache and the graph from nothing."""
    present = {int(m.group(1)) for n in tensors if (m := _LAYER.match(n))}
    n = hp["n_layers"]
    if len(present) != n or (present and (min(present) != 0 or max(present) != n - 1)):
        have = f"layers 0-{max(present)}" if present == set(range(len(present))) and present else \
            f"{len(present)} layers ({_show(sorted(present)[:8])})"
        raise SourceError(f"hyperparameter {key}: {n}, but the model has tensors for {have}")


def _check_shapes(hp: Mapping[str, Any], tensors: Mapping[str, Any], name: Any) -> None:
    """Each tensor present has the shape docs/FORMAT.md §6.1 gives it from the hyperparameters (the
    tensors every family shares; a family's own extras are checked by the activation widths)."""
    E, H, K, D, F, V = (hp[k] for k in ("hidden", "n_heads", "n_kv_heads", "head_dim", "ffn", "vocab"))
    expect = {"token_embd.weight": ((V, E), "vocab, hidden"), "output.weight": ((V, E), "vocab, hidden"),
              "output_norm.weight": ((E,), "hidden")}
    layer = {"attn_norm.weight": ((E,), "hidden"), "attn_q.weight": ((H * D, E), "n_heads*head_dim, hidden"),
             "attn_k.weight": ((K * D, E), "n_kv_heads*head_dim, hidden"),
             "attn_v.weight": ((K * D, E), "n_kv_heads*head_dim, hidden"),
             "attn_q.bias": ((H * D,), "n_heads*head_dim"), "attn_k.bias": ((K * D,), "n_kv_heads*head_dim"),
             "attn_v.bias": ((K * D,), "n_kv_heads*head_dim"),
             "attn_output.weight": ((E, H * D), "hidden, n_heads*head_dim"),
             "attn_output.bias": ((E,), "hidden"), "ffn_norm.weight": ((E,), "hidden"),
             "ffn_gate.weight": ((F, E), "ffn, hidden"), "ffn_up.weight": ((F, E), "ffn, hidden"),
             "ffn_down.weight": ((E, F), "hidden, ffn")}
    for tname, t in tensors.items():
        m = _LAYER.match(tname)
        want = layer.get(tname[m.end():]) if m else expect.get(tname)
        if want is not None and tuple(t.shape) != want[0]:
            raise SourceError(f"tensor {tname!r} has shape {list(t.shape)}, but the hyperparameters give "
                              f"[{want[1]}] = {list(want[0])}")
