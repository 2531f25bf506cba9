"""Lossless pack codecs: encode at build time, decode at load time, both bit-exact.

A codec is named in the pack table together with its parameters, so a reader needs nothing
but the pack record to decode. blosc2 and zfpy release the GIL, so packs decode in parallel
threads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .constants import CODEC_BLOSC2_LZ4, CODEC_BLOSC2_ZSTD, CODEC_NONE, CODEC_ZFP, CODECS
from .errors import FormatError

_SHUFFLES = ("none", "byte", "bit")


def _blosc2():
    """blosc2, told to release the GIL: python-blosc2 holds it by default, which serialised the
    compiler's compression threads and the runtime's prefetch workers (measured: docs/benchmarks.md)."""
    import blosc2

    if not getattr(blosc2, "_vkpack_gil_released", False):
        blosc2.set_releasegil(True)
        blosc2._vkpack_gil_released = True
    return blosc2


def encode(codec: str, raw: bytes | memoryview, params: dict[str, Any]) -> bytes:
    """Compress `raw` with `codec`; params: blosc2 {"typesize", "shuffle", "clevel"}, zfp {"shape"}."""
    if codec == CODEC_NONE:
        return bytes(raw)
    if codec in (CODEC_BLOSC2_ZSTD, CODEC_BLOSC2_LZ4):
        blosc2 = _blosc2()
        return blosc2.compress2(
            raw,
            codec=blosc2.Codec.ZSTD if codec == CODEC_BLOSC2_ZSTD else blosc2.Codec.LZ4,
            clevel=int(params.get("clevel", 1)),
            filters=[_blosc2_filter(params.get("shuffle", "byte"))],
            typesize=int(params.get("typesize", 1)),
            nthreads=1,  # packs are compressed in parallel; one thread each keeps output deterministic
        )
    if codec == CODEC_ZFP:
        import zfpy

        if len(raw) == 0 or len(raw) % 4:
            raise ValueError(f"zfp needs whole float32 values, got {len(raw)} bytes")  # zfpy crashes on empty input
        arr = np.frombuffer(raw, dtype="<f4")
        return zfpy.compress_numpy(arr)  # no tolerance/rate/precision: zfp's reversible (lossless) mode
    raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def decode(codec: str, stored: bytes | memoryview, raw_size: int, params: dict[str, Any]) -> bytes | memoryview:
    """Decompress one pack; raises FormatError if the result is not exactly `raw_size` bytes."""
    if codec == CODEC_NONE:
        out: bytes | memoryview = stored
    elif codec in (CODEC_BLOSC2_ZSTD, CODEC_BLOSC2_LZ4):
        blosc2 = _blosc2()

        try:
            nbytes, _cbytes, _blocksize = blosc2.get_cbuffer_sizes(stored)
        except Exception as e:  # blosc2 raises plain errors for garbage headers
            raise FormatError(f"blosc2 header unreadable: {e}") from None
        if nbytes != raw_size:
            raise FormatError(f"blosc2 chunk holds {nbytes} bytes, pack table says {raw_size}")
        if _cbytes != len(stored):
            raise FormatError(f"blosc2 chunk is {_cbytes} bytes long, but the pack stores {len(stored)}")
        try:
            out = blosc2.decompress2(stored)
        except Exception as e:
            raise FormatError(f"blosc2 payload corrupt: {e}") from None
    elif codec == CODEC_ZFP:
        out = _zfp_decode(stored, raw_size)
    else:
        raise FormatError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    if len(out) != raw_size:
        raise FormatError(f"{codec} decoded {len(out)} bytes, pack table says {raw_size}")
    return out


def _blosc2_filter(shuffle: str):
    import blosc2

    if shuffle not in _SHUFFLES:
        raise ValueError(f"unknown shuffle {shuffle!r}; known: {_SHUFFLES}")
    return {"none": blosc2.Filter.NOFILTER, "byte": blosc2.Filter.SHUFFLE, "bit": blosc2.Filter.BITSHUFFLE}[shuffle]


# zfp's bit reader never checks the end of its buffer: a truncated or forged stream makes it read
# past the end (a crash, seen with a cut stream). A reversible 1-D float32 block of 4 values consumes
# at most ~180 bits (1 + 8 exponent + 5 precision bits, 32 bit planes of <= 4 value bits plus one
# stop bit each), so decoding from a zero-padded copy of ZFP_BLOCK_BOUND bytes per block can never
# leave the buffer. np.zeros maps untouched padding lazily, so the bound costs address space only.
ZFP_BLOCK_BOUND = 32
_ZFP_SLACK = 64  # the 148-bit header plus the reader's 64-bit word look-ahead


def _zfp_decode(stored: bytes | memoryview, raw_size: int) -> bytes:
    import zfpy

    if raw_size <= 0 or raw_size % 4:
        raise FormatError(f"zfp pack: raw_size {raw_size} is not a positive number of float32 values")
    n = raw_size // 4
    bound = _ZFP_SLACK + -(-n // 4) * ZFP_BLOCK_BOUND
    buf = np.zeros(max(len(stored), bound) + _ZFP_SLACK, dtype=np.uint8)
    buf[:len(stored)] = np.frombuffer(stored, dtype=np.uint8)
    try:
        h = zfpy.header(buf)
    except Exception as e:
        raise FormatError(f"zfp header unreadable: {e}") from None
    dims = (h.get("nx"), h.get("ny"), h.get("nz"), h.get("nw"))
    if h.get("type") is not np.float32 or h.get("mode") != "reversible" or dims != (n, 0, 0, 0):
        raise FormatError(f"zfp header describes {h.get('mode')} {getattr(h.get('type'), '__name__', h.get('type'))} "
                          f"{list(dims)}; the pack table needs reversible float32 [{n}, 0, 0, 0]")
    try:
        return zfpy.decompress_numpy(buf).tobytes()
    except Exception as e:
        raise FormatError(f"zfp payload corrupt: {e}") from None
