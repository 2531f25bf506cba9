"""Write llama/qwen2/qwen3(moe)-shaped models with random weights, as GGUF or as a HF folder.

Why: tests and benchmarks need models of any shape and size (tiny ones that
build in milliseconds, multi-GB ones to exercise streaming) without network.
Both outputs of one (spec, seed) are the SAME model: every tensor is drawn in
HF layout from a numpy RNG keyed by (seed, HF tensor name, row block), and the
GGUF writer converts it exactly as llama.cpp's `convert_hf_to_gguf.py` does.

GGUF Q/K convention: for `llama` the attn_q/attn_k rows are permuted from HF's
rotate-half (neox) rope order to GGUF's interleaved order with
`w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`
(n_head = kv heads for attn_k). qwen2/qwen3 GGUFs use neox rope and are not permuted.
GGUF 1-D tensors (norms, biases) are always F32, as llama.cpp writes them.

GGUF storage types (`gguf_types` gives the type of every tensor):
- F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1: the random f32 weights, cast or quantized with
  gguf-py's `gguf.quants.quantize` (exactly the HF model's values, up to quantization error).
- Q2_K/Q3_K/Q4_K/Q5_K/Q6_K: random GGML blocks, NOT the HF model's weights (gguf-py has no
  K-quantizer, and random weights need none). Every quant and sub-scale bit is uniform random
  (GGML packs them densely, so every code is equally likely); only the f16 super-block scales
  `d` (and `dmin`) are set, to d0 * U(0.5, 1.5) per block with d0 from the codes' moments so
  the values have mean ~0 and std ~`spec.std` (see `_k_params`). At the default std 0.02 every
  Q5_K/Q6_K `d` and ~1/3 of Q4_K's are f16 subnormals (llama.cpp's Q6_K `d` of such weights is
  ~1.5e-5, also subnormal), so kernels reading these files must handle subnormal halves.
- Q4_K_M: llama.cpp's Q4_K_M mix (`_q4_k_m_type`); the single types are "pure"
  (every 2-D tensor that type, like `llama-quantize --pure`), with no Q6_K output.
- Rows that are not a whole number of the type's blocks fall back as llama.cpp does
  (`_FALLBACK`), then to F16 if not whole 32-blocks either.

Mixtures of experts (`qwen3moe`, GGUF only; presets `moe_tiny` and `qwen3_30b_a3b`, Qwen3-30B-A3B's
shapes): each layer's MLP is a router `ffn_gate_inp` [experts, hidden] (F32, as llama.cpp's converter
forces it) and the experts stacked 3-D as the converter writes them, `ffn_{gate,up}_exps`
[experts, expert_ffn, hidden] and `ffn_down_exps` [experts, hidden, expert_ffn] (numpy order; GGUF's ne is
the reverse), with `{arch}.expert_count`, `expert_used_count` and `expert_feed_forward_length`. Random
weights do NOT route like a trained model by default: measured on the H100 host with the `qwen3_30b_a3b`
file, a 512-token prompt touched every expert, but one token at a time (random token ids) each router chose
nearly the same experts whatever the token (decode hit rates 99.4-99.9 % with a sixth of the experts
resident). The token's own part of the residual stream fades with depth: every layer adds a random
function of the normalized stream, and attention adds near-uniform averages over the past, the same for
every token (a 6-layer, 64-expert Q4_0 probe, 40 random tokens: consecutive tokens share 34 % of their
experts at layer 0 and 65-83 % at layers 1-5; Q8_0 alike, so not Q4_0's code bias). `embed_std` (e.g. 1.0
against the layers' 0.02) keeps the token's part on top: the same probe then shares 12-16 % (8 of 64
chosen at random: 12.5 %) and touches 63-64 of 64 experts in 40 tokens at every layer, i.e. near-uniform
routing, the worst case for an expert cache. Q4_0/Q8_0
tensors of a MoE spec are random blocks written directly (`_random_sym_blocks`: uniform codes, f16
scales of random sign as ggml's quantizer gives them, std ~`spec.std`), since gguf-py's quantizer would
take an hour for 30B weights; they are not an HF model's weights, and there is no HF model of a MoE spec.

Writers stream tensor by tensor, in row blocks of at most CHUNK_ELEMS values, so
peak memory stays far below the model size. The tokenizer they carry: synthetic_tokenizer.py.

CLI examples:
    python tools/make_synthetic.py --arch qwen3 --format gguf --dtype Q8_0 --preset tiny -o m.gguf
    python tools/make_synthetic.py --preset llama_1b --dtype Q4_K_M -o m-q4km.gguf
    python tools/make_synthetic.py --preset qwen3_30b_a3b --dtype Q4_0 -o qwen3moe-q4_0.gguf   # ~17.2 GB
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO

import gguf
import numpy as np

from synthetic_tokenizer import (BOS_ID, CHAT_TEMPLATE, CORPUS, EOS_ID, MIN_VOCAB, PAD_ID, SPECIALS,  # noqa: F401
                                 build_vocab, byte_symbols, hf_tokenizer_json)

log = logging.getLogger(__name__)

CHUNK_ELEMS = 1 << 22  # values per generated row block (16 MiB as float32)
ARCHS = {  # arch -> (HF class, default rope_theta, default rms_norm_eps)
    "llama": ("LlamaForCausalLM", 10000.0, 1e-5),
    "qwen2": ("Qwen2ForCausalLM", 1000000.0, 1e-6),
    "qwen3": ("Qwen3ForCausalLM", 1000000.0, 1e-6),
    "qwen3moe": ("Qwen3MoeForCausalLM", 1000000.0, 1e-6),
}
MOE_ARCHS = frozenset({"qwen3moe"})  # GGUF only: experts stacked 3-D (see the module doc)
QK_NORM_ARCHS = frozenset({"qwen3", "qwen3moe"})
GT, FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
DTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")
HF_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MIXES = {"Q4_K_M": "Q4_K"}  # mix -> its default type
# general.file_type as llama.cpp writes it; a pure K type gets the preset whose default type it is
# (the _S one where there are S/M/L: the one with the fewest upgrades).
FILE_TYPES = {"F32": FT.ALL_F32, "F16": FT.MOSTLY_F16, "BF16": FT.MOSTLY_BF16, "Q8_0": FT.MOSTLY_Q8_0,
              "Q4_0": FT.MOSTLY_Q4_0, "Q4_1": FT.MOSTLY_Q4_1, "Q5_0": FT.MOSTLY_Q5_0, "Q5_1": FT.MOSTLY_Q5_1,
              "Q2_K": FT.MOSTLY_Q2_K, "Q3_K": FT.MOSTLY_Q3_K_S, "Q4_K": FT.MOSTLY_Q4_K_S,
              "Q5_K": FT.MOSTLY_Q5_K_S, "Q6_K": FT.MOSTLY_Q6_K, "Q4_K_M": FT.MOSTLY_Q4_K_M}
K_QUANTS = frozenset({GT.Q2_K, GT.Q3_K, GT.Q4_K, GT.Q5_K, GT.Q6_K})
# llama.cpp's llama_tensor_get_type fallback for rows that are not whole 256-blocks, except that
# Q2_K/Q3_K go to Q4_0 (same 4.5 bits/weight) instead of IQ4_NL, which gguf-py cannot quantize (every
# vkpack backend reads IQ4_NL; tests write such blocks themselves). Anything else falls back to F16.
_FALLBACK = {GT.Q2_K: GT.Q4_0, GT.Q3_K: GT.Q4_0, GT.Q4_K: GT.Q5_0, GT.Q5_K: GT.Q5_1, GT.Q6_K: GT.Q8_0}

# ---- spec ----


@dataclass(frozen=True)
class Spec:
    """Shape of a decoder-only llama-family model; `head_dim` None means hidden // heads."""

    arch: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    vocab: int = 384
    head_dim: int | None = None
    context: int = 2048
    tied: bool = False
    rope_theta: float | None = None
    rms_eps: float | None = None
    std: float = 0.02
    embed_std: float | None = None   # the token embedding's std (None: std); see the module doc on routing
    experts: int = 0       # MoE only: experts per layer, how many each token uses, their ffn width
    experts_used: int = 0
    expert_ffn: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} not supported; expected one of {sorted(ARCHS)}")
        if (self.arch in MOE_ARCHS) != (self.experts > 0):
            raise ValueError(f"arch {self.arch!r} with {self.experts} experts: experts are for "
                             f"{', '.join(sorted(MOE_ARCHS))} only, and required there")
        if self.experts and not (1 <= self.experts_used <= self.experts and self.expert_ffn > 0):
            raise ValueError(f"experts_used {self.experts_used} must be 1..{self.experts} and "
                             f"expert_ffn {self.expert_ffn} positive")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.hd % 2:
            raise ValueError(f"head_dim {self.hd} must be even for rope")
        if self.vocab < MIN_VOCAB:
            raise ValueError(f"vocab {self.vocab} < {MIN_VOCAB} (specials + 256 byte tokens)")

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def theta(self) -> float:
        return self.rope_theta if self.rope_theta is not None else ARCHS[self.arch][1]

    @property
    def eps(self) -> float:
        return self.rms_eps if self.rms_eps is not None else ARCHS[self.arch][2]

    @classmethod
    def tiny(cls, arch: str = "llama") -> Spec:
        """2 layers, hidden 64: builds in well under a second."""
        return cls(arch=arch)

    @classmethod
    def llama_1b(cls, arch: str = "llama") -> Spec:
        """Llama-3.2-1B-like shapes (tied embeddings), vocab 49152: ~2.1 GB in F16."""
        return cls(arch=arch, layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192,
                   vocab=49152, tied=True)

    @classmethod
    def llama_8b(cls, arch: str = "llama") -> Spec:
        """Llama-3.1-8B-like shapes, vocab 49152: 7.4B params, ~14.8 GB in F16."""
        return cls(arch=arch, layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336,
                   vocab=49152)

    @classmethod
    def moe_tiny(cls, arch: str = "qwen3moe") -> Spec:
        """2 layers, hidden 64, 8 experts of ffn 32 (2 used): a MoE that builds in well under a second."""
        return cls(arch=arch, experts=8, experts_used=2, expert_ffn=32)

    @classmethod
    def qwen3_30b_a3b(cls, arch: str = "qwen3moe") -> Spec:
        """Qwen3-30B-A3B's shapes: 48 layers, 128 experts of ffn 768 (8 used), 30.5B params, ~17.2 GB in Q4_0."""
        return cls(arch=arch, layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, ffn=6144,
                   vocab=151936, context=40960, experts=128, experts_used=8, expert_ffn=768)

    def tensors(self) -> list[TensorDef]:
        """All tensors in file order, with HF and GGUF names and HF (numpy) shapes (a MoE's experts
        as the 3-D tensors llama.cpp's converter stacks, under its merged HF name)."""
        h, q, kv = self.hidden, self.heads * self.hd, self.kv_heads * self.hd
        perm = self.arch == "llama"
        out = [TensorDef("model.embed_tokens.weight", "token_embd.weight", (self.vocab, h))]
        for i in range(self.layers):
            p, g = f"model.layers.{i}.", f"blk.{i}."
            out += [
                TensorDef(p + "self_attn.q_proj.weight", g + "attn_q.weight", (q, h),
                          permute=self.heads if perm else 0),
                TensorDef(p + "self_attn.k_proj.weight", g + "attn_k.weight", (kv, h),
                          permute=self.kv_heads if perm else 0),
                TensorDef(p + "self_attn.v_proj.weight", g + "attn_v.weight", (kv, h)),
            ]
            if self.arch == "qwen2":
                out += [TensorDef(p + f"self_attn.{n}_proj.bias", g + f"attn_{n}.bias", (d,), "bias")
                        for n, d in (("q", q), ("k", kv), ("v", kv))]
            out.append(TensorDef(p + "self_attn.o_proj.weight", g + "attn_output.weight", (h, q)))
            if self.arch in QK_NORM_ARCHS:
                out += [TensorDef(p + f"self_attn.{n}_norm.weight", g + f"attn_{n}_norm.weight",
                                  (self.hd,), "norm") for n in ("q", "k")]
            if self.experts:  # the converter's order: router, then down, gate, up stacked by expert
                e, f = self.experts, self.expert_ffn
                out += [
                    TensorDef(p + "mlp.gate.weight", g + "ffn_gate_inp.weight", (e, h)),
                    TensorDef(p + "mlp.experts.down_proj.weight", g + "ffn_down_exps.weight", (e, h, f)),
                    TensorDef(p + "mlp.experts.gate_proj.weight", g + "ffn_gate_exps.weight", (e, f, h)),
                    TensorDef(p + "mlp.experts.up_proj.weight", g + "ffn_up_exps.weight", (e, f, h)),
                ]
            else:
                out += [
                    TensorDef(p + "mlp.gate_proj.weight", g + "ffn_gate.weight", (self.ffn, h)),
                    TensorDef(p + "mlp.up_proj.weight", g + "ffn_up.weight", (self.ffn, h)),
                    TensorDef(p + "mlp.down_proj.weight", g + "ffn_down.weight", (h, self.ffn)),
                ]
            out += [
                TensorDef(p + "input_layernorm.weight", g + "attn_norm.weight", (h,), "norm"),
                TensorDef(p + "post_attention_layernorm.weight", g + "ffn_norm.weight", (h,), "norm"),
            ]
        out.append(TensorDef("model.norm.weight", "output_norm.weight", (h,), "norm"))
        if not self.tied:
            out.append(TensorDef("lm_head.weight", "output.weight", (self.vocab, h)))
        return out

    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors())

    def with_target_gb(self, gb: float, dtype: str) -> Spec:
        """Return a copy whose layer count brings the weights to about `gb` GB (1e9 bytes)."""
        one = dataclasses.replace(self, layers=1).tensors()
        layer_b = _nbytes([t for t in one if t.gguf.startswith("blk.")], dtype, gguf_layout=False)
        fixed = _nbytes(one, dtype, gguf_layout=False) - layer_b  # embeddings, final norm, head
        layers = max(1, round((gb * 1e9 - fixed) / layer_b))
        if dtype in MIXES:  # a mix's layer size depends on the layer count: refine once at that count
            fixed = _nbytes(dataclasses.replace(self, layers=0).tensors(), dtype)
            layer_b = (_nbytes(dataclasses.replace(self, layers=layers).tensors(), dtype) - fixed) / layers
            layers = max(1, round((gb * 1e9 - fixed) / layer_b))
        return dataclasses.replace(self, layers=layers)


@dataclass(frozen=True)
class TensorDef:
    """One tensor: `kind` picks its init; `permute` is the GGUF Q/K head count (0: none)."""

    hf: str
    gguf: str
    shape: tuple[int, ...]
    kind: str = "weight"  # weight | norm | bias
    permute: int = 0


# ---- weights ----


def _block_rows(t: TensorDef) -> list[tuple[int, int]]:
    """(row0, rows) of each generated block of `t`."""
    rows = t.shape[0]
    step = rows if len(t.shape) == 1 else max(1, CHUNK_ELEMS // math.prod(t.shape[1:]))
    return [(r0, min(step, rows - r0)) for r0 in range(0, rows, step)]


def _block(t: TensorDef, seed: int, std: float, k: int, rows: int) -> np.ndarray:
    """Block k of `t` (float32, HF layout): drawn from RNG (seed, crc32(name), k)."""
    rng = np.random.default_rng([seed, zlib.crc32(t.hf.encode()), k])
    x = rng.standard_normal((rows, *t.shape[1:]), dtype=np.float32)
    x *= np.float32(std)
    if t.kind == "norm":
        x += np.float32(1.0)  # norms near 1, like a trained model
    return x


def _blocks(t: TensorDef, seed: int, std: float) -> Iterator[np.ndarray]:
    """Yield float32 row blocks of `t` in HF layout."""
    for k, (_r0, rows) in enumerate(_block_rows(t)):
        yield _block(t, seed, std, k, rows)


def _gguf_blocks(t: TensorDef, seed: int, std: float) -> Iterator[np.ndarray]:
    """Row blocks in GGUF layout: llama Q/K are permuted as llama.cpp's converter does."""
    if not t.permute:
        yield from _blocks(t, seed, std)
        return
    w = np.concatenate(list(_blocks(t, seed, std)))
    rows, n = w.shape[0], t.permute
    yield w.reshape(n, 2, rows // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encoded_gguf_tensors(tensors: list[TensorDef], types: dict[str, gguf.GGMLQuantizationType],
                          seed: int, std: float, random_types: frozenset = K_QUANTS,
                          stds: dict[str, float] | None = None):
    """Yield (tensor, [future of encoded bytes per block]) in file order; blocks are drawn and
    encoded on a thread pool (numpy's RNG and casts release the GIL), a bounded window ahead of
    the writer, so an 8B model is generated on all cores with bounded memory. Same bytes as serial."""
    workers = max(1, min(8, os.cpu_count() or 1))
    window: collections.deque = collections.deque()

    def encode_block(t: TensorDef, k: int, rows: int) -> bytes | np.ndarray:
        qt, sd = types[t.gguf], (stds or {}).get(t.gguf, std)
        if qt in random_types:
            if qt in _SYM_CODES:  # a contiguous array: written as it is, no copy
                return _random_sym_blocks(t, qt, seed, sd, k, rows)
            return _random_k_blocks(t, qt, seed, sd, k, rows).tobytes()
        return _encode(_block(t, seed, sd, k, rows), qt).tobytes()

    def encode_whole(t: TensorDef) -> bytes:
        sd = (stds or {}).get(t.gguf, std)
        return b"".join(_encode(b, types[t.gguf]).tobytes() for b in _gguf_blocks(t, seed, sd))

    def jobs():
        for t in tensors:
            if t.permute and types[t.gguf] not in random_types:  # the permutation needs the whole tensor
                yield t, [pool.submit(encode_whole, t)]
            else:
                yield t, [pool.submit(encode_block, t, k, rows) for k, (_r0, rows) in enumerate(_block_rows(t))]

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = 0
        for t, futs in jobs():
            window.append((t, futs))
            pending += len(futs)
            while pending > 2 * workers:
                done_t, done = window.popleft()
                pending -= len(done)
                yield done_t, done
        while window:
            yield window.popleft()


def gguf_types(tensors: list[TensorDef], dtype: str) -> dict[str, gguf.GGMLQuantizationType]:
    """GGUF storage type of each tensor, by GGUF name, for one of DTYPES.

    1-D tensors are F32. A single type applies to every 2-D tensor; Q4_K_M follows llama.cpp
    (`_q4_k_m_type`), with the layer count and tied output read from the tensor list, as
    llama.cpp does. Rows that are not whole blocks of the chosen type fall back via `_FALLBACK`.
    Example:
        >>> gguf_types(Spec.tiny().tensors(), "Q4_K")["blk.0.attn_q.weight"]   # rows of 64
        <GGMLQuantizationType.Q5_0: 6>
    """
    return {t.gguf: _fit(t, want) for t, want in _wanted_types(tensors, dtype)}


def _wanted_types(tensors: list[TensorDef], dtype: str) -> Iterator[tuple[TensorDef, gguf.GGMLQuantizationType]]:
    """(tensor, type before the row-size fallback)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported for GGUF; expected one of {DTYPES}")
    n_layers = len({t.gguf.split(".")[1] for t in tensors if t.gguf.startswith("blk.")})
    has_output = any(t.gguf == "output.weight" for t in tensors)
    if dtype in MIXES and any(len(t.shape) == 3 for t in tensors):
        raise ValueError(f"dtype {dtype} is a dense model's mix; store experts as one type (Q4_0, Q8_0, ...)")
    for t in tensors:
        if len(t.shape) == 1 or t.gguf.endswith(".ffn_gate_inp.weight"):  # routers: F32, as the converter
            yield t, GT.F32
        elif dtype == "Q4_K_M":
            yield t, _q4_k_m_type(t.gguf, n_layers, has_output)
        else:
            yield t, GT[dtype]


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule: the first and last eighth of the layers, and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _q4_k_m_type(name: str, n_layers: int, has_output: bool) -> gguf.GGMLQuantizationType:
    """llama.cpp's llama_tensor_get_type for LLAMA_FTYPE_MOSTLY_Q4_K_M (dense, non-Falcon models):
    Q6_K for `output` (for `token_embd` when tied, since it is then also the output) and for
    `attn_v`/`ffn_down` of the layers where `_use_more_bits`; Q4_K for all other 2-D tensors."""
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        return GT.Q6_K
    if name.endswith((".attn_v.weight", ".ffn_down.weight")) and _use_more_bits(int(name.split(".")[1]), n_layers):
        return GT.Q6_K
    return GT.Q4_K


def _fit(t: TensorDef, qt: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """`qt`, or its fallback where a row of `t` is not a whole number of `qt` blocks."""
    if t.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
        qt = _FALLBACK.get(qt, GT.F16)
        if t.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
            qt = GT.F16
    return qt


def _encode(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 block -> little-endian storage bytes (BF16 rounds to nearest even, as ggml)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return x.astype("<f4", copy=False)
    if qtype == gguf.GGMLQuantizationType.F16:
        return x.astype("<f2")
    return gguf.quants.quantize(x, qtype)


# ---- random K-quant blocks ----
# type -> (byte offset of d, of dmin or None, sub-scale codes, quant codes, min codes or None), where
# a value is d * s * q - dmin * m (GGML's block_q*_K; runtime/cpu/dequant.py reads the same layout).
_K_LAYOUT = {
    GT.Q2_K: (80, 82, (0, 15), (0, 3), (0, 15)),
    GT.Q3_K: (108, None, (-32, 31), (-4, 3), None),     # q: 2 bits + hmask bit; s: 6-bit code - 32
    GT.Q4_K: (0, 2, (0, 63), (0, 15), (0, 63)),
    GT.Q5_K: (0, 2, (0, 63), (0, 31), (0, 63)),
    GT.Q6_K: (208, None, (-128, 127), (-32, 31), None),  # s: int8; q: 6-bit code - 32
}
# Per-block factor on d and dmin, so a kernel that reads another block's scale shows it;
# one factor for both, so each block's mean stays ~0.
_U = (0.5, 1.5)


def _moments(lo: int, hi: int) -> tuple[float, float]:
    """E[X], E[X^2] for X uniform on the integers lo..hi."""
    n, mean = hi - lo + 1, (lo + hi) / 2
    return mean, (n * n - 1) / 12 + mean * mean


@lru_cache(maxsize=64)
def _k_params(qt: gguf.GGMLQuantizationType, std: float) -> tuple[float, float]:
    """(d0, r) so that d*s*q - dmin*m has mean ~0 and std `std`, with s, q, m independent uniform
    codes, d = d0*u and dmin = r*d0*u (u uniform on _U)."""
    _, _, s, q, m = _K_LAYOUT[qt]
    (es, es2), (eq, eq2) = _moments(*s), _moments(*q)
    eu2 = 1 + (_U[1] - _U[0]) ** 2 / 12
    if m is None:  # symmetric codes: mean is (E[s] E[q]) d, i.e. 0.25 d, negligible
        return std / math.sqrt(eu2 * es2 * eq2), 0.0
    em, em2 = _moments(*m)
    r = es * eq / em  # E[d s q] = E[dmin m]
    unit = eu2 * (es2 * eq2 + r * r * em2 - 2 * (es * eq) ** 2)
    return std / math.sqrt(unit), r


def _random_k_blocks(t: TensorDef, qt: gguf.GGMLQuantizationType, seed: int, std: float,
                     k: int, rows: int) -> np.ndarray:
    """Row block k of `t` as (n_blocks, type_size) uint8 random `qt` blocks (see the module doc)."""
    rng = np.random.default_rng([seed, zlib.crc32(t.hf.encode()), k])
    block, size = gguf.GGML_QUANT_SIZES[qt]
    n = rows * math.prod(t.shape[1:]) // block
    b = np.frombuffer(bytearray(rng.bytes(n * size)), np.uint8).reshape(n, size)
    d_off, m_off, *_ = _K_LAYOUT[qt]
    d0, r = _k_params(qt, std)
    u = rng.uniform(*_U, n)
    for off, scale in ((d_off, d0), (m_off, r * d0)):
        if off is not None:  # smallest positive subnormal .. largest finite half
            h = np.clip(scale * u, 2.0 ** -24, 65504.0).astype("<f2")
            b[:, off:off + 2] = h.view(np.uint8).reshape(n, 2)
    return b


# Symmetric legacy types written as random blocks for MoE specs: type -> (lowest, highest) code of q, where a
# value is d * q (Q4_0: a nibble minus 8; Q8_0: an int8), d the block's leading f16.
_SYM_CODES = {GT.Q4_0: (-8, 7), GT.Q8_0: (-128, 127)}


def _random_sym_blocks(t: TensorDef, qt: gguf.GGMLQuantizationType, seed: int, std: float,
                       k: int, rows: int) -> np.ndarray:
    """Row block k of `t` as (n_blocks * type_size,) random Q4_0/Q8_0 block bytes: uniform codes and
    d = +-d0 * U(0.5, 1.5), d0 so the values' std is ~`std`; the sign is random per block, as ggml's
    quantizer gives it (d = signed max / -8 or / 127), so Q4_0's code mean of -0.5 d cancels over blocks.
    All from random_raw (the generator's fastest path, ~3x rng.bytes) with no per-block Python work: the
    blocks are whole u16 words (18 and 34 bytes), so d is one strided u16 column."""
    rng = np.random.default_rng([seed, zlib.crc32(t.hf.encode()), k])
    block, size = gguf.GGML_QUANT_SIZES[qt]
    n = rows * math.prod(t.shape[1:]) // block
    words = rng.bit_generator.random_raw(-(-n * size // 8) + -(-n // 4)).view("<u2")
    blocks, bits = words[:n * size // 2].reshape(n, size // 2), words[-n:]
    eu2 = 1 + (_U[1] - _U[0]) ** 2 / 12
    d0 = std / math.sqrt(_moments(*_SYM_CODES[qt])[1] * eu2)
    u = (bits & 0x3FF).astype(np.float32) * np.float32((_U[1] - _U[0]) / 1024) + np.float32(_U[0])
    blocks[:, 0] = (u * np.float32(d0)).astype("<f2").view("<u2") | (bits & 0x8000)
    return blocks.reshape(-1).view(np.uint8)


def _tensor_nbytes(t: TensorDef, qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(t.shape) // block * size


def _nbytes(tensors: list[TensorDef], dtype: str, gguf_layout: bool = True) -> int:
    """Bytes of `tensors` as GGUF stores them, or (gguf_layout False) all in dtype's default type."""
    if gguf_layout:
        types = gguf_types(tensors, dtype)
        return sum(_tensor_nbytes(t, types[t.gguf]) for t in tensors)
    hf_type = GT[MIXES.get(dtype, dtype)]
    return sum(_tensor_nbytes(t, hf_type) for t in tensors)


def _pad(f: IO[bytes], align: int) -> None:
    f.write(b"\0" * (-f.tell() % align))


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.part")


# ---- GGUF ----


def write_gguf(path: Path | str, spec: Spec, dtype: str = "F16", seed: int = 0) -> Path:
    """Write `spec` with random weights as one GGUF file (atomically: temp file + rename).

    Args:
        path: output .gguf file.
        spec: model shape.
        dtype: one of DTYPES for 2-D tensors (see the module doc and `gguf_types`); 1-D are F32.
        seed: RNG seed; the same (spec, seed) gives the same bytes and (except K-quant tensors,
            which are random blocks) the same model as write_hf.
    Returns:
        The path written.
    Example:
        >>> write_gguf("tiny.gguf", Spec.tiny("qwen2"), "Q8_0", seed=1)
    """
    tensors = spec.tensors()
    types = gguf_types(tensors, dtype)
    fell = [f"{t.gguf} {want.name}->{types[t.gguf].name}" for t, want in _wanted_types(tensors, dtype)
            if types[t.gguf] != want]
    if fell:
        log.warning("%d tensors have rows that are not whole blocks, stored as: %s", len(fell), ", ".join(fell))
    path = Path(path)
    tmp = _tmp_path(path)
    w = gguf.GGUFWriter(tmp, spec.arch)
    try:
        _add_gguf_metadata(w, spec, dtype, seed)
        for t in tensors:
            qt = types[t.gguf]
            nbytes = _tensor_nbytes(t, qt)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, qt)
            w.add_tensor_info(t.gguf, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # Tensor data is streamed by hand: GGUFWriter.write_tensor_data wants whole tensors.
        fout = w.fout[0]
        _pad(fout, w.data_alignment)
        random_types = K_QUANTS | (frozenset(_SYM_CODES) if spec.experts else frozenset())
        stds = {"token_embd.weight": spec.embed_std} if spec.embed_std is not None else None
        for t, chunks in _encoded_gguf_tensors(tensors, types, seed, spec.std, random_types, stds):
            start = fout.tell()
            for chunk in chunks:
                fout.write(chunk.result())
            assert fout.tell() - start == _tensor_nbytes(t, types[t.gguf]), t.gguf
            _pad(fout, w.data_alignment)
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path


def _add_gguf_metadata(w: gguf.GGUFWriter, spec: Spec, dtype: str, seed: int) -> None:
    K, a = gguf.Keys, spec.arch
    w.add_string(K.General.NAME, f"vkpack-synthetic-{a}")
    w.add_string(K.General.DESCRIPTION,
                 f"random weights, seed={seed}, std={spec.std}; Q/K rows "
                 + ("permuted to GGUF interleaved rope order" if a == "llama" else "in HF order (neox rope)"))
    w.add_uint32(K.General.FILE_TYPE, int(FILE_TYPES[dtype]))
    w.add_uint32(K.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    w.add_uint32(K.LLM.VOCAB_SIZE.format(arch=a), spec.vocab)
    w.add_uint32(K.LLM.CONTEXT_LENGTH.format(arch=a), spec.context)
    w.add_uint32(K.LLM.EMBEDDING_LENGTH.format(arch=a), spec.hidden)
    w.add_uint32(K.LLM.FEED_FORWARD_LENGTH.format(arch=a), spec.ffn)
    w.add_uint32(K.LLM.BLOCK_COUNT.format(arch=a), spec.layers)
    w.add_uint32(K.Attention.HEAD_COUNT.format(arch=a), spec.heads)
    w.add_uint32(K.Attention.HEAD_COUNT_KV.format(arch=a), spec.kv_heads)
    w.add_float32(K.Rope.FREQ_BASE.format(arch=a), spec.theta)
    w.add_float32(K.Attention.LAYERNORM_RMS_EPS.format(arch=a), spec.eps)
    if a == "llama":
        w.add_uint32(K.Rope.DIMENSION_COUNT.format(arch=a), spec.hd)
    if spec.experts:  # as convert_hf_to_gguf.py's Qwen2MoeModel/TextModel write them
        w.add_uint32(K.LLM.EXPERT_COUNT.format(arch=a), spec.experts)
        w.add_uint32(K.LLM.EXPERT_USED_COUNT.format(arch=a), spec.experts_used)
        w.add_uint32(K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), spec.expert_ffn)
    if a in QK_NORM_ARCHS or spec.hd != spec.hidden // spec.heads:
        w.add_uint32(K.Attention.KEY_LENGTH.format(arch=a), spec.hd)
        w.add_uint32(K.Attention.VALUE_LENGTH.format(arch=a), spec.hd)
    add_gguf_tokenizer(w, spec.vocab)


def add_gguf_tokenizer(w: gguf.GGUFWriter, vocab: int) -> None:
    """The synthetic byte-level BPE of `vocab` tokens as GGUF tokenizer metadata, with its chat template."""
    K = gguf.Keys
    tokens, merges = build_vocab(vocab)
    w.add_string(K.Tokenizer.MODEL, "gpt2")
    w.add_string(K.Tokenizer.PRE, "gpt-2")  # the GPT-2 split regex, as llama.cpp names it (it rejects "gpt2")
    w.add_array(K.Tokenizer.LIST, list(tokens))
    w.add_array(K.Tokenizer.TOKEN_TYPE, [int(gguf.TokenType.CONTROL) if t in SPECIALS
                                         else int(gguf.TokenType.NORMAL) for t in tokens])
    w.add_array(K.Tokenizer.MERGES, [f"{x} {y}" for x, y in merges])
    w.add_uint32(K.Tokenizer.BOS_ID, BOS_ID)
    w.add_uint32(K.Tokenizer.EOS_ID, EOS_ID)
    w.add_uint32(K.Tokenizer.UNK_ID, PAD_ID)
    w.add_uint32(K.Tokenizer.PAD_ID, PAD_ID)
    w.add_bool(K.Tokenizer.ADD_BOS, False)
    w.add_string(K.Tokenizer.CHAT_TEMPLATE, CHAT_TEMPLATE)


# ---- HF folder ----


def write_hf(folder: Path | str, spec: Spec, dtype: str = "F16", seed: int = 0,
             shard_mb: float | None = None) -> Path:
    """Write `spec` with random weights as a HF model folder (config, safetensors, tokenizer).

    Args:
        folder: output folder (created; stale model*.safetensors from earlier runs are removed).
        spec: model shape.
        dtype: F32, F16 or BF16 for every tensor.
        seed: RNG seed; the same (spec, seed) is the same model as write_gguf's.
        shard_mb: if set, split weights into shards of at most this many MB (1e6 bytes).
    Returns:
        The folder.
    Example:
        >>> write_hf("tiny-hf", Spec.tiny("qwen3"), "BF16", seed=1, shard_mb=0.05)
    """
    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported for HF; expected one of {sorted(HF_DTYPES)}")
    if spec.experts:
        raise ValueError(f"{spec.arch}: mixtures of experts are written as GGUF only (see the module doc)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    qt = gguf.GGMLQuantizationType[dtype]
    shards = _plan_shards(spec.tensors(), qt, shard_mb)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for stale in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        _write_safetensors(folder / name, shard, qt, seed, spec.std)
        weight_map.update({t.hf: name for t in shard})
    if len(shards) > 1:
        total = sum(_tensor_nbytes(t, qt) for s in shards for t in s)
        _write_text(folder / "model.safetensors.index.json",
                    _dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    _write_text(folder / "config.json", _dumps(hf_config(spec, dtype)))
    _write_text(folder / "tokenizer.json", hf_tokenizer_json(spec.vocab))
    _write_text(folder / "tokenizer_config.json", _dumps(_tokenizer_config(spec)))
    return folder


def hf_config(spec: Spec, dtype: str) -> dict:
    """config.json contents for `spec` (transformers' names and defaults per arch)."""
    cfg = {
        "architectures": [ARCHS[spec.arch][0]], "model_type": spec.arch,
        "vocab_size": spec.vocab, "hidden_size": spec.hidden, "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "head_dim": spec.hd,
        "max_position_embeddings": spec.context, "rms_norm_eps": spec.eps,
        "rope_theta": spec.theta, "rope_scaling": None, "hidden_act": "silu",
        "initializer_range": spec.std, "tie_word_embeddings": spec.tied,
        "torch_dtype": HF_DTYPES[dtype], "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID, "use_cache": True, "attention_dropout": 0.0,
    }
    if spec.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.layers)
    if spec.arch == "qwen3":
        cfg.update(attention_bias=False)
    return cfg


def _tokenizer_config(spec: Spec) -> dict:
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, s in enumerate(SPECIALS)}
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added, "bos_token": SPECIALS[BOS_ID], "eos_token": SPECIALS[EOS_ID],
        "pad_token": SPECIALS[PAD_ID], "unk_token": SPECIALS[PAD_ID], "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": spec.context,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _plan_shards(tensors: list[TensorDef], qt: gguf.GGMLQuantizationType,
                 shard_mb: float | None) -> list[list[TensorDef]]:
    """Greedy split into shards of at most shard_mb MB; a larger tensor gets a shard of its own."""
    if not shard_mb:
        return [tensors]
    limit, shards, size = shard_mb * 1e6, [[]], 0
    for t in tensors:
        n = _tensor_nbytes(t, qt)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _write_safetensors(path: Path, tensors: list[TensorDef], qt: gguf.GGMLQuantizationType,
                       seed: int, std: float) -> None:
    """Stream one safetensors file: u64 header length, JSON header padded to 8, raw data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in tensors:
        n = _tensor_nbytes(t, qt)
        header[t.hf] = {"dtype": qt.name, "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in tensors:
                f.writelines(_encode(block, qt).tobytes() for block in _blocks(t, seed, std))
            assert f.tell() == 8 + len(raw) + off, path
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- CLI ----

PRESETS = {"tiny": Spec.tiny, "llama_1b": Spec.llama_1b, "llama_8b": Spec.llama_8b,
           "moe_tiny": Spec.moe_tiny, "qwen3_30b_a3b": Spec.qwen3_30b_a3b}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), help="default: the preset's (llama; qwen3moe for MoE presets)")
    p.add_argument("--format", choices=("gguf", "hf"), default="gguf")
    p.add_argument("--dtype", choices=DTYPES, default="F16",
                   help="F32/F16/BF16 for hf; all for gguf (Q4_K_M: llama.cpp's mix)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="starting shape; the flags below override it")
    for flag in ("layers", "hidden", "heads", "kv-heads", "ffn", "vocab", "head-dim", "context",
                 "experts", "experts-used", "expert-ffn"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None,
                   help="tie lm_head to the embeddings")
    p.add_argument("--std", type=float, help="weight init std (default 0.02)")
    p.add_argument("--embed-std", type=float,
                   help="the token embedding's std (default --std); 1.0 makes a MoE route near-uniformly (module doc)")
    p.add_argument("--target-gb", type=float, help="pick --layers to reach about this many GB")
    p.add_argument("--shard-mb", type=float, help="HF only: shard safetensors at this many MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, required=True, help=".gguf file or HF folder")
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> Spec:
    base = PRESETS[args.preset](args.arch) if args.arch else PRESETS[args.preset]()
    over = {f: getattr(args, f) for f in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab",
                                          "head_dim", "context", "tied", "std", "embed_std", "experts",
                                          "experts_used", "expert_ffn")
            if getattr(args, f) is not None}
    spec = dataclasses.replace(base, **over)
    if args.target_gb:
        spec = spec.with_target_gb(args.target_gb, args.dtype)
    return spec


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file plan at INFO
    args = parse_args(argv)
    if args.format == "hf" and args.dtype not in HF_DTYPES:
        log.error("--dtype %s is only supported with --format gguf", args.dtype)
        return 2
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    log.info("%s: %.2fM params, %d layers", spec.arch, spec.n_params() / 1e6, spec.layers)
    if args.format == "gguf":
        out = write_gguf(args.output, spec, args.dtype, args.seed)
    else:
        out = write_hf(args.output, spec, args.dtype, args.seed, args.shard_mb)
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
