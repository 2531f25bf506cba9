"""Split-K decode attention (attention_split + attention_merge) against a float64 numpy reference.

Awkward sizes: contexts of 1, 7, 300, 1000+ rows, head_dim 64/80/128, GQA groups 1/3/4, several
tokens at different positions, f32 and f16 caches, splits past the end, n_ctx capped splits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from vkpack.runtime import vk as gpu

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")


def ref_attention(q, kc, vc, pos, n_heads, n_kv, hd, scale):
    out = np.zeros((len(pos), n_heads * hd))
    g = n_heads // n_kv
    for t, p in enumerate(pos):
        L = min(int(p) + 1, len(kc))
        for h in range(n_heads):
            sl = slice(h // g * hd, (h // g + 1) * hd)
            s = kc[:L, sl].astype(np.float64) @ q[t, h * hd:(h + 1) * hd].astype(np.float64) * scale
            e = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = e / e.sum() @ vc[:L, sl].astype(np.float64)
    return out


def nmse(a, ref):
    return float(((a - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-30))


def run_case(dev, ops, pos, n_heads, n_kv, hd, n_ctx, f16, *, t0=0, q_pad=0, o_pad=0, split=True, seed=0):
    """Attention of tokens t0.. (positions `pos`) through Ops.attention; returns (device out, reference)."""
    rng = np.random.default_rng(seed)
    T = len(pos)
    cdt = np.float16 if f16 else np.float32
    kc = rng.standard_normal((n_ctx, n_kv * hd)).astype(cdt)
    vc = rng.standard_normal((n_ctx, n_kv * hd)).astype(cdt)
    qs, os_ = n_heads * hd + q_pad, n_heads * hd + o_pad
    q = (rng.standard_normal((t0 + T, qs)) * 1.5).astype(np.float32)
    posa = np.concatenate([np.zeros(t0, np.uint32), np.asarray(pos, np.uint32)])
    bufs = [dev.alloc(max(a.nbytes, 16)) for a in (kc, vc, q, posa)]
    for b, a in zip(bufs, (kc, vc, q, posa)):
        dev.upload(b, np.ascontiguousarray(a))
    kcb, vcb, qb, pb = bufs
    ob = dev.alloc((t0 + T) * os_ * 4)
    dev.upload(ob, np.full((t0 + T) * os_, 7.0, np.float32))
    need = ops.attention_scratch_bytes(T, n_heads, hd, n_ctx)
    assert (need > 0) == split
    sb = dev.alloc(need + 16) if need else None
    scale = 0.7 / math.sqrt(hd)
    rec = gpu.Recorder(dev)
    try:
        ops.attention(rec, qb, kcb, vcb, pb, ob, T, n_heads, n_kv, hd, n_ctx, f16=f16, scale=scale,
                      q_stride=qs, o_stride=os_, t0=t0, scratch=sb)
        rec.run()
    finally:
        rec.destroy()
    out = np.frombuffer(dev.download(ob, ob.size), np.float32).reshape(t0 + T, os_)
    assert np.all(out[:t0] == 7.0) and np.all(out[:, n_heads * hd:] == 7.0)   # nothing else written
    ref = ref_attention(q[t0:, :n_heads * hd], kc, vc, pos, n_heads, n_kv, hd, scale)
    for b in bufs + [ob] + ([sb] if sb else []):
        b.destroy()
    return out[t0:, :n_heads * hd].astype(np.float64), ref


CASES = [  # (positions, n_heads, n_kv, head_dim, n_ctx)
    ([0], 2, 1, 64, 1),
    ([6], 4, 4, 64, 7),
    ([299], 12, 4, 80, 300),
    ([1000], 8, 2, 128, 1100),
    ([1234, 5, 700], 6, 2, 128, 1300),
    ([3, 0, 257], 3, 1, 64, 300),            # GQA 3, splits past the end for all of them
    ([2047], 32, 8, 128, 2048),              # Llama-3-8B shape
    ([4000], 8, 1, 256, 4096),               # 8 heads share one kv head; head_dim 256
]


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("pos,n_heads,n_kv,hd,n_ctx", CASES)
def test_split_attention(dev, ops, f16, pos, n_heads, n_kv, hd, n_ctx):
    out, ref = run_case(dev, ops, pos, n_heads, n_kv, hd, n_ctx, f16, seed=len(pos) * 7 + hd + n_ctx)
    assert nmse(out, ref) < 1e-7


@pytest.mark.parametrize("wg,merge_wg,rows,max_splits", [(8, 8, 16, 4), (32, 16, 64, 128), (64, 128, 32, 1000),
                                                         (128, 64, 100, 3), (256, 256, 64, 128)])
@pytest.mark.parametrize("fused_merge", [True, False], ids=["last-workgroup-merges", "merge-pass"])
def test_split_configs(dev, wg, merge_wg, rows, max_splits, fused_merge):
    """Workgroup sizes (several subgroups, fewer invocations than head_dim units), split rows not a
    power of 2, splits capped so each walks several chunks; t0 and padded strides; the merge done by
    the split kernel's last workgroup or by the second pass. Run twice: the counters reset themselves."""
    ops = gpu.Ops(dev)
    ops.attn_split_wg, ops.attn_merge_wg, ops.attn_split_rows, ops.attn_max_splits = wg, merge_wg, rows, max_splits
    ops.attn_fused_merge = fused_merge
    for f16, (pos, n_heads, n_kv, hd) in 2 * [(False, ([700, 0, 350], 8, 2, 128)), (True, ([513, 64], 6, 3, 80))]:
        out, ref = run_case(dev, ops, pos, n_heads, n_kv, hd, 720, f16, t0=2, q_pad=8, o_pad=4, seed=wg + rows)
        assert nmse(out, ref) < 1e-7


def test_same_recording_at_every_position(dev, ops):
    """A recording replayed while pos grows (as decode replays it): the splits follow pos[t]."""
    rng = np.random.default_rng(5)
    n_heads, n_kv, hd, n_ctx = 8, 2, 64, 500
    kc = rng.standard_normal((n_ctx, n_kv * hd)).astype(np.float32)
    vc = rng.standard_normal((n_ctx, n_kv * hd)).astype(np.float32)
    q = rng.standard_normal((1, n_heads * hd)).astype(np.float32)
    kcb, vcb, qb, pb = (dev.alloc(a.nbytes) for a in (kc, vc, q, np.zeros(4, np.uint32)))
    for b, a in ((kcb, kc), (vcb, vc), (qb, q)):
        dev.upload(b, a)
    ob = dev.alloc(q.nbytes)
    sb = dev.alloc(ops.attention_scratch_bytes(1, n_heads, hd, n_ctx))
    rec = gpu.Recorder(dev)
    ops.attention(rec, qb, kcb, vcb, pb, ob, 1, n_heads, n_kv, hd, n_ctx, scratch=sb)
    rec.finish()
    try:
        for p in (0, 1, 63, 64, 65, 130, 499, 800):     # 800: past n_ctx, clamped like the one-pass kernel
            dev.upload(pb, np.array([p], np.uint32))
            rec.run()
            out = np.frombuffer(dev.download(ob, q.nbytes), np.float32).reshape(1, -1)
            ref = ref_attention(q, kc, vc, [p], n_heads, n_kv, hd, 1 / math.sqrt(hd))
            assert nmse(out, ref) < 1e-7, p
    finally:
        rec.destroy()
        for b in (kcb, vcb, qb, pb, ob, sb):
            b.destroy()


def test_one_pass_kernel_without_scratch_or_for_many_tokens(dev, ops):
    """No scratch, or more tokens than attn_split_max_tokens: the one-pass kernel, no scratch needed."""
    out, ref = run_case(dev, ops, [40, 41, 42], 4, 2, 64, 64, False, split=True)
    assert nmse(out, ref) < 1e-7
    T = ops.attn_split_max_tokens + 1
    assert ops.attention_scratch_bytes(T, 4, 64, 64) == 0
    out, ref = run_case(dev, ops, list(range(T)), 4, 2, 64, 64, True, split=False)
    assert nmse(out, ref) < 1e-7


def test_scratch_too_small(dev, ops):
    b = dev.alloc(64)
    rec = gpu.Recorder(dev)
    try:
        with pytest.raises(gpu.VulkanError, match="scratch"):
            ops.attention(rec, b, b, b, b, b, 1, 4, 1, 64, 1000, scratch=b)
    finally:
        rec.destroy()
        b.destroy()
