"""Helpers the Vulkan tests share: random weights of every stored type, device buffers (one block
cut by a bump `Arena`), float64 references (RoPE, attention) and the error measures the tests state
their tolerances in."""

from __future__ import annotations

import math

import gguf
import numpy as np
from vkpack.runtime import vk as gpu

Q = gguf.GGMLQuantizationType
GIB = 1 << 30
# f16 fields (byte offsets in a block) that must hold sane scales when blocks are random bytes
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,),
              "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,), "Q5_K": (0, 2), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def nmse(a, ref) -> float:
    """Normalized MSE sum((a-b)^2)/sum(b^2), in float64."""
    ref = np.asarray(ref, np.float64)
    return float(((np.asarray(a, np.float64) - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-30))


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference `b`."""
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def greedy(eng, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` (end of sequence ignored)."""
    eng.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)
    return list(eng.last_ids)


class Arena:
    """A bump allocator over one block: `alloc(n)` returns aligned Buffers; `destroy()` frees all."""

    def __init__(self, dev, size: int, kind: str = "device"):
        self.device, self.block = dev, dev.alloc_block(size, kind)
        self.top, self.buffers = 0, []

    def alloc(self, nbytes: int):
        a = self.device.buffer_alignment
        off = -(-self.top // a) * a
        buf = self.device.buffer(self.block, off, nbytes)
        self.top = off + nbytes
        self.buffers.append(buf)
        return buf

    def destroy(self) -> None:
        for b in self.buffers:
            b.destroy()
        self.buffers = []
        self.block.destroy()


def assert_device_peak_within(eng, vram_gb: float) -> int:
    """Assert that the device-local bytes the engine's Vulkan device really allocated (every
    vkAllocateMemory, not the tier's books) stayed within `vram_gb` at their peak; returns the peak.
    Where the driver reports heap usage (VK_EXT_memory_budget), its growth is printed beside it."""
    dev, budget = eng.backend.dev, int(vram_gb * GIB)
    peak = dev.peak_allocated_bytes(device_local=True)
    heap = dev.peak_heap_usage()
    if heap is not None:
        print(f"driver heap usage: peak {heap - dev.heap_usage_at_open} bytes over its value at open; "
              f"allocated {peak}; budget {budget}")
    assert peak <= budget, (f"device-local memory peaked at {peak} bytes, {peak - budget} over --vram-gb "
                            f"{vram_gb:g} ({budget} bytes); the tier's blocks are {eng.tier.budget} bytes")
    return peak


def to_dev(dev, arr, kind="device"):
    a = np.ascontiguousarray(arr)
    b = dev.alloc(max(a.nbytes, 16), kind)
    dev.upload(b, a)
    return b


def from_dev(dev, buf, dtype, shape):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(dev.download(buf, n), dtype).reshape(shape)


def random_weight(rng, dtype, rows, cols):
    """(raw bytes as uint8 (rows, row_bytes), dequantized float32 (rows, cols)) for any dtype."""
    if dtype == "F32":
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        return w.view(np.uint8), w
    if dtype == "F16":
        w = rng.standard_normal((rows, cols)).astype(np.float16)
        return w.view(np.uint8), w.astype(np.float32)
    qt = getattr(Q, dtype)
    if dtype in ("BF16", "Q8_0", "Q4_0", "Q4_1"):
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
    else:  # gguf-py has no K-quant or IQ4 quantizer (Q5_0/Q5_1 have one): random bytes with finite scales
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(rows * (cols // bs), ts), dtype=np.uint8)
        for off in F16_FIELDS[dtype]:
            raw[:, off:off + 2] = (rng.uniform(0.001, 0.05, len(raw)).astype(np.float16)
                                   .view(np.uint8).reshape(-1, 2))
        raw = raw.reshape(rows, -1)
    return raw, gguf.quants.dequantize(raw, qt).reshape(rows, cols).astype(np.float32)


def upload_weight(dev, raw, offset=48):
    """Weight bytes at a 16-aligned, non-zero offset inside a bigger buffer (as packs are laid out)."""
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    buf = dev.alloc(offset + data.nbytes + 32)
    dev.upload(buf, data, offset)
    return buf


def run(dev, fn):
    """Record `fn(rec)` into a fresh Recorder, run it once and destroy it."""
    rec = gpu.Recorder(dev)
    try:
        fn(rec)
        rec.run()
    finally:
        rec.destroy()


def rope_ref(x, pos, n_heads, hd, n_rot, mode, base, ff=None, freq_scale=1.0):
    """rope.comp in float64: x (T, n_heads * hd), positions (T)."""
    x = x.astype(np.float64).reshape(len(pos), n_heads, hd).copy()
    i = np.arange(n_rot // 2)
    inv = base ** (-2.0 * i / n_rot) * freq_scale
    if ff is not None:
        inv = inv / ff
    th = np.asarray(pos, np.float64)[:, None] * inv[None, :]        # (T, n_rot/2)
    c, s = np.cos(th)[:, None, :], np.sin(th)[:, None, :]
    if mode == "norm":
        a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2], x[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :n_rot // 2].copy(), x[..., n_rot // 2:n_rot].copy()
        x[..., :n_rot // 2], x[..., n_rot // 2:n_rot] = a * c - b * s, a * s + b * c
    return x.reshape(len(pos), -1)


def attention_ref(q, kc, vc, pos, n_heads, n_kv, hd, scale=None, window=0, softcap=0.0):
    """Causal grouped-query attention in float64 of tokens at `pos` over cache rows 0..pos (clamped to
    the cache; the last `window` of them with a window), scores scaled by `scale` (default 1/sqrt(hd)),
    then soft-capped (cap * tanh(s / cap)) where softcap > 0."""
    scale = 1 / math.sqrt(hd) if scale is None else scale
    out = np.zeros((len(pos), n_heads * hd))
    g = n_heads // n_kv
    for t, p in enumerate(pos):
        L = min(int(p) + 1, len(kc))
        lo = max(0, L - window) if window else 0
        for h in range(n_heads):
            sl = slice(h // g * hd, (h // g + 1) * hd)
            s = kc[lo:L, sl].astype(np.float64) @ q[t, h * hd:(h + 1) * hd].astype(np.float64) * scale
            if softcap:
                s = softcap * np.tanh(s / softcap)
            e = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = e / e.sum() @ vc[lo:L, sl].astype(np.float64)
    return out
