"""Per-pack codec choice: the smallest fast-decoding encoding, or raw when it saves little.

Facts measured on this project's machines (docs/benchmarks.md): blosc2 zstd level 1 with
shuffle gains ~15-30 % on random f16/bf16/f32 and decodes at 1-2 GB/s per core; quantized GGUF
blocks gain 1-6 % (SmolLM2: Q4_1 3.7 %, Q8_0 6.3 %); zfp's reversible mode decodes at 55-250 MB/s and rarely
wins, so `auto` never picks it (it stays available explicitly for all-F32 packs).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from ..pack_format import codecs
from ..pack_format.constants import CODEC_BLOSC2_LZ4, CODEC_BLOSC2_ZSTD, CODEC_NONE, CODEC_ZFP, DTYPES

MIN_SAVING = 0.05          # store raw unless compression saves at least 5 %: a raw pack loads zero-copy
                           # at ~19 GB/s, a blosc2 one decodes at 1-2 GB/s (docs/benchmarks.md)
SAMPLE_BYTES = 1 << 20     # auto first tries a sample this big before compressing a whole pack
CHOICES = ("auto", CODEC_NONE, CODEC_BLOSC2_ZSTD, CODEC_BLOSC2_LZ4, CODEC_ZFP)


@dataclass(frozen=True)
class Encoded:
    codec: str
    params: dict[str, Any]
    stored: bytes | memoryview
    crc32: int
    raw_crc32: int


def blosc2_params(dtypes: dict[str, int]) -> dict[str, Any]:
    """Shuffle at the item size of the dtype that holds most of the pack's bytes."""
    main = max(dtypes, key=lambda d: (dtypes[d], d))
    block, size = DTYPES[main]
    itemsize = size if block == 1 else 1
    return {"typesize": itemsize, "shuffle": "byte" if itemsize > 1 else "none", "clevel": 1}


def encode_pack(raw: bytes | bytearray | memoryview, dtypes: dict[str, int], choice: str) -> Encoded:
    """Encode one pack's raw bytes with `choice` (a codec name or "auto").

    zfp applies only to packs made of F32 tensors; other packs are stored raw under `--codec zfp`.
    """
    raw_crc = zlib.crc32(raw)
    only_f32 = set(dtypes) == {"F32"} and len(raw) % 4 == 0
    if choice == "auto":
        candidates = [(CODEC_BLOSC2_ZSTD, blosc2_params(dtypes))]
    elif choice == CODEC_ZFP:
        candidates = [(CODEC_ZFP, {})] if only_f32 else []
    elif choice == CODEC_NONE:
        candidates = []
    else:
        candidates = [(choice, blosc2_params(dtypes))]
    best: tuple[str, dict[str, Any], bytes | memoryview] = (CODEC_NONE, {}, memoryview(raw))
    for codec, params in candidates:
        if choice == "auto" and len(raw) > 2 * SAMPLE_BYTES:
            sample = memoryview(raw)[:SAMPLE_BYTES]
            if len(codecs.encode(codec, sample, params)) > (1 - MIN_SAVING) * len(sample):
                continue
        stored = codecs.encode(codec, raw, params)
        # an explicit codec is honoured even when it does not pay; auto keeps only real savings
        if choice != "auto" or len(stored) <= (1 - MIN_SAVING) * len(raw):
            best = (codec, params, stored)
    codec, params, stored = best
    # a raw pack's stored bytes are its raw bytes: one crc32 pass, not two
    return Encoded(codec, params, stored, raw_crc if codec == CODEC_NONE else zlib.crc32(stored), raw_crc)
