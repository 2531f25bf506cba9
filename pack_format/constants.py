"""The format in code: magic numbers, layout sizes, data types and codec names.

Keep in lockstep with docs/FORMAT.md (tests/test_format_doc.py compares the tables).
"""

from __future__ import annotations

import struct

# ---- layout ----
MAGIC = b"VKPACK\x00\x01"          # first 8 bytes of every archive
FOOTER_MAGIC = b"VKPKEND\x00"      # last 8 bytes of every archive
FORMAT_MAJOR = 1                   # bumped for structural changes; readers reject other majors
FORMAT_MINOR = 3                   # bumped for additions that old readers may ignore
HEADER_SIZE = 64
FOOTER_SIZE = 32
ALIGN = 4096                       # every pack payload starts at a multiple of this
TENSOR_ALIGN = 256                 # tensor offsets inside a decoded pack (GPU binding offsets)
MAX_PACK_SIZE = 1 << 31            # no pack, stored or decoded, may be larger (blosc2 chunk limit)
MAX_INDEX_SIZE = 256 << 20         # a reader refuses larger indexes before allocating

# Header: magic, u16 major, u16 minor, u32 flags, u32 header_size, u32 alignment, 40 reserved zero bytes.
HEADER_STRUCT = struct.Struct("<8sHHIII40x")
# Footer: u64 index_offset, u64 index_size, u32 crc32(index), u32 reserved, magic.
FOOTER_STRUCT = struct.Struct("<QQII8s")
assert HEADER_STRUCT.size == HEADER_SIZE and FOOTER_STRUCT.size == FOOTER_SIZE

# ---- data types: name -> (elements per block, bytes per block) ----
# Quantized blocks use GGML's layouts unchanged; a "row" is always a whole number of blocks.
DTYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "F64": (1, 8),
    "I8": (1, 1),
    "I16": (1, 2),
    "I32": (1, 4),
    "I64": (1, 8),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q8_1": (32, 40),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
    "Q8_K": (256, 292),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
}

# ---- data types: name -> GGML type id (ggml.h `enum ggml_type`, gguf-py's GGMLQuantizationType) ----
# The one table of these ids: GGUF tensor infos store them, and the shaders select a weight format by them.
GGML_TYPE_IDS: dict[str, int] = {
    "F32": 0, "F16": 1, "BF16": 30, "F64": 28, "I8": 24, "I16": 25, "I32": 26, "I64": 27,
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "IQ4_NL": 20, "IQ4_XS": 23,
}
assert GGML_TYPE_IDS.keys() == DTYPES.keys() and len(set(GGML_TYPE_IDS.values())) == len(GGML_TYPE_IDS)
# GGML types the format can describe but no ggml file stores as a model weight worth running (integer
# tensors, and Q8_1/Q8_K, ggml's activation-side formats): the compiler refuses them, as it refuses types
# outside DTYPES, because no backend computes with them. Every backend runs every other type.
NOT_WEIGHT_DTYPES = frozenset({"F64", "I8", "I16", "I32", "I64", "Q8_1", "Q8_K"})
WEIGHT_DTYPES = tuple(t for t in DTYPES if t not in NOT_WEIGHT_DTYPES)
# Names of GGML type ids outside GGML_TYPE_IDS, so that a refusal names the type (ggml's own names).
GGML_OTHER_TYPES = {16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S", 29: "IQ1_M",
                    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0"}

# ---- codecs ----
CODEC_NONE = "none"
CODEC_BLOSC2_ZSTD = "blosc2-zstd"
CODEC_BLOSC2_LZ4 = "blosc2-lz4"
CODEC_ZFP = "zfp"
CODECS = (CODEC_NONE, CODEC_BLOSC2_ZSTD, CODEC_BLOSC2_LZ4, CODEC_ZFP)

# ---- pack kinds ----
PACK_KINDS = ("embed", "attn", "mlp", "norm", "head", "expert")   # expert (1.3): one expert of one MoE layer

# ---- graph ops (the runtime implements each; see docs/FORMAT.md "Access graph") ----
OPS = ("embed", "rms_norm", "linear", "rope", "attention", "add", "swiglu", "last_token", "geglu", "scale", "softcap",
       "moe")

ROPE_MODES = ("norm", "neox")       # norm: rotate adjacent pairs (GGUF llama); neox: rotate halves
MOE_ROUTERS = ("softmax", "sigmoid")  # how a moe op turns router logits into expert scores (1.3)


def row_bytes(dtype: str, n_cols: int) -> int:
    """Bytes of one row of `n_cols` elements; raises ValueError if it is not whole blocks."""
    block, size = DTYPES[dtype]
    if n_cols % block:
        raise ValueError(f"{dtype}: row of {n_cols} elements is not a multiple of the block size {block}")
    return n_cols // block * size


def tensor_bytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor with `shape` (rows first, the last dim is contiguous)."""
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= int(d)
    return n_rows * row_bytes(dtype, int(shape[-1]) if shape else 1)


def align_up(n: int, a: int) -> int:
    """`n` rounded up to a multiple of `a` (a > 0). Example: `align_up(4097, ALIGN) == 8192`."""
    return -(-n // a) * a
