"""Split-K decode attention (attention_split + attention_merge) against a float64 numpy reference.

Awkward sizes: contexts of 1, 7, 300, 1000+ rows, head_dim 64/80/128, GQA groups 1/3/4, several
tokens at different positions, f32 and f16 caches, splits past the end, n_ctx capped splits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from vk_helpers import attention_ref, nmse, rope_ref, to_dev
from vkpack.runtime import vk as gpu

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")


def run_case(dev, ops, pos, n_heads, n_kv, hd, n_ctx, f16, *, t0=0, q_pad=0, o_pad=0, split=True, seed=0,
             use_scratch=True, window=0, softcap=0.0):
    """Attention of tokens t0.. (positions `pos`) through Ops.attention; returns (device out, reference).
    use_scratch=False: no scratch even where the split kernels could run (the one-pass kernel)."""
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
    sb = dev.alloc(need + 16) if need and use_scratch else None
    scale = 0.7 / math.sqrt(hd)
    rec = gpu.Recorder(dev)
    try:
        ops.attention(rec, qb, kcb, vcb, pb, ob, T, n_heads, n_kv, hd, n_ctx, f16=f16, scale=scale,
                      q_stride=qs, o_stride=os_, t0=t0, scratch=sb, window=window, softcap=softcap)
        rec.run()
    finally:
        rec.destroy()
    out = np.frombuffer(dev.download(ob, ob.size), np.float32).reshape(t0 + T, os_)
    assert np.all(out[:t0] == 7.0) and np.all(out[:, n_heads * hd:] == 7.0)   # nothing else written
    ref = attention_ref(q[t0:, :n_heads * hd], kc, vc, pos, n_heads, n_kv, hd, scale, window, softcap)
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


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("window,softcap", [(16, 0.0), (1, 0.0), (300, 0.0), (0, 1.5), (100, 2.0)])
@pytest.mark.parametrize("fused_merge", [True, False], ids=["last-workgroup-merges", "merge-pass"])
def test_window_and_softcap(dev, f16, window, softcap, fused_merge):
    """Sliding windows (shorter than, equal to, longer than the positions) and soft-capped scores, on the
    split kernels (with either merge) and on the one-pass kernel (no scratch, and a prefill of many tokens)."""
    ops = gpu.Ops(dev)
    ops.attn_fused_merge = fused_merge
    ops.attn_split_rows = 32  # several splits, so that a window drops whole ones
    for pos in ([700, 0, 350, 15, 16], [299]):
        out, ref = run_case(dev, ops, pos, 8, 2, 64, 720, f16, t0=1, window=window, softcap=softcap, seed=window)
        assert nmse(out, ref) < 1e-7, pos
        out, ref = run_case(dev, ops, pos, 8, 2, 64, 720, f16, use_scratch=False, window=window, softcap=softcap)
        assert nmse(out, ref) < 1e-7, pos
    T = ops.attn_split_max_tokens + 3
    out, ref = run_case(dev, ops, list(range(100, 100 + T)), 4, 2, 64, 200, f16, split=False, window=window,
                        softcap=softcap)
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
            ref = attention_ref(q, kc, vc, [p], n_heads, n_kv, hd, 1 / math.sqrt(hd))
            assert nmse(out, ref) < 1e-7, p
    finally:
        rec.destroy()
        for b in (kcb, vcb, qb, pb, ob, sb):
            b.destroy()


def test_one_pass_kernel_without_scratch_or_for_many_tokens(dev, ops):
    """No scratch, or more tokens than attn_split_max_tokens: the one-pass kernel, no scratch needed."""
    out, ref = run_case(dev, ops, [40, 41, 42], 4, 2, 64, 64, False, split=True, use_scratch=False)
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


# ---- the decode fusion: rope(q), rope(k) and the KV store inside the split kernel ----

def run_fused(dev, ops, seqs, n_heads, n_kv, hd, n_ctx, f16, mode, n_rot, use_ff, seed=0):
    """One batch: sequences (P0, T), rows stacked, each attending through its own caches (rows >= P0
    hold NaN: the new rows must come from k, v). Recorded fused (new_kv, rope; q, k, v slices of one
    buffer) and unfused (rope(q), kv_store(rope), attention). Returns [(fused out, unfused out,
    float64 reference, fused caches, unfused caches, caches before)] per sequence."""
    rng = np.random.default_rng(seed)
    kvd, qd = n_kv * hd, n_heads * hd
    cdt = np.float16 if f16 else np.float32
    rows = sum(T for _, T in seqs)
    q = (rng.standard_normal((rows, qd)) * 1.5).astype(np.float32)
    k, v = (rng.standard_normal((rows, kvd)).astype(np.float32) for _ in range(2))
    pos = np.concatenate([np.arange(p0, p0 + T) for p0, T in seqs]).astype(np.uint32)
    ff = rng.uniform(1.0, 8.0, n_rot // 2).astype(np.float32)
    rope = {"head_dim": hd, "n_rot": n_rot, "mode": mode, "base": 10000.0}
    caches = []
    for p0, _ in seqs:
        c = rng.standard_normal((2, n_ctx, kvd)).astype(cdt)
        c[:, p0:] = np.nan
        caches.append(c)
    keep = []

    def up(a):
        keep.append(to_dev(dev, a))
        return keep[-1]

    pb, fb = up(pos), up(ff)
    rope["freq_factors"] = fb if use_ff else None
    res = []
    for fused in (True, False):
        # q, k, v at 256-byte aligned offsets of one buffer, as the pass's activations are
        offs = np.cumsum([0] + [-(-a.nbytes // 256) * 256 for a in (q, k)])
        act = np.zeros(offs[-1] // 4 + v.size, np.float32)
        for o, a in zip(offs, (q, k, v)):
            act[o // 4:o // 4 + a.size] = a.reshape(-1)
        ab = up(act)
        qx, kx, vb = (gpu.BufferSlice(ab, int(o), a.nbytes) for o, a in zip(offs, (q, k, v)))
        bufs = [(up(c[0]), up(c[1])) for c in caches]
        ob = up(np.zeros((rows, qd), np.float32))
        rec = gpu.Recorder(dev)
        try:
            if not fused:
                ops.rope(rec, qx, pb, rows, n_heads, hd, n_rot=n_rot, mode=mode, base=10000.0,
                         freq_factors=rope["freq_factors"])
            r0 = 0
            for (p0, T), (kc, vc) in zip(seqs, bufs):
                sb = up(np.zeros(ops.attention_scratch_bytes(T, n_heads, hd, n_ctx) // 4 + 4, np.float32))
                if fused:
                    ops.attention(rec, qx, kc, vc, pb, ob, T, n_heads, n_kv, hd, n_ctx, f16=f16, t0=r0,
                                  scratch=sb, new_kv=(kx, vb), rope=rope)
                else:
                    ops.kv_store(rec, kx, vb, kc, vc, pb, T, kvd, n_ctx, f16=f16, t0=r0, rope=rope)
                    ops.attention(rec, qx, kc, vc, pb, ob, T, n_heads, n_kv, hd, n_ctx, f16=f16, t0=r0,
                                  scratch=sb)
                r0 += T
            rec.run()
        finally:
            rec.destroy()
        out = np.frombuffer(dev.download(ob, ob.size), np.float32).reshape(rows, qd)
        cs = [tuple(np.frombuffer(dev.download(b, b.size), cdt).reshape(n_ctx, kvd) for b in kv) for kv in bufs]
        res.append((out, cs))
    for b in keep:
        b.destroy()
    qr = rope_ref(q, pos, n_heads, hd, n_rot, mode, 10000.0, ff if use_ff else None)
    kr = rope_ref(k, pos, n_kv, hd, n_rot, mode, 10000.0, ff if use_ff else None)
    out, r0 = [], 0
    for i, ((p0, T), c) in enumerate(zip(seqs, caches)):
        kc, vc = c.astype(np.float64)
        kc[p0:p0 + T] = kr[r0:r0 + T].astype(cdt)
        vc[p0:p0 + T] = v[r0:r0 + T].astype(cdt)
        ref = attention_ref(qr[r0:r0 + T], kc, vc, pos[r0:r0 + T], n_heads, n_kv, hd, 1 / math.sqrt(hd))
        out.append((res[0][0][r0:r0 + T].astype(np.float64), res[1][0][r0:r0 + T].astype(np.float64), ref,
                    res[0][1][i], res[1][1][i], c))
        r0 += T
    return out


FUSED_CASES = [  # (sequences (first position, tokens), n_heads, n_kv, head_dim, n_ctx, mode, n_rot, freq factors)
    ([(0, 1)], 4, 4, 64, 40, "norm", 64, False),                   # the first token: no cache row read
    ([(37, 1), (5, 2), (30, 3)], 8, 2, 64, 80, "neox", 64, True),   # a batch; rows 30-32 straddle splits
    ([(70, 2), (12, 1)], 12, 1, 128, 100, "norm", 96, True),       # GQA 12: two head blocks per kv head
    ([(3, 4), (63, 1)], 6, 3, 80, 64, "neox", 32, False),          # n_rot < head_dim; the last cache row
]


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("wg", [8, 64])
@pytest.mark.parametrize("seqs,n_heads,n_kv,hd,n_ctx,mode,n_rot,use_ff", FUSED_CASES)
def test_fused_rope_and_store(dev, f16, wg, seqs, n_heads, n_kv, hd, n_ctx, mode, n_rot, use_ff):
    """The fused kernel (new rows from k, v; q and keys rotated inside) against the float64 reference and
    the unfused recording: the same outputs, and the caches hold what kv_store writes (NaN rows at and
    past each P0 in the caches prove that the new rows are not read from there). Splits of 16 rows."""
    ops = gpu.Ops(dev)
    ops.attn_split_wg, ops.attn_split_rows = wg, 16
    got = run_fused(dev, ops, seqs, n_heads, n_kv, hd, n_ctx, f16, mode, n_rot, use_ff, seed=wg + hd + n_ctx)
    # f16 caches: a rotated key that rounds to the other f16 neighbour (sin/cos differ in the last f32 bits
    # between drivers and between the two kernels on the H100) moves the output by ~2^-11 relative:
    # measured on the H100, nmse 2-5e-8 against float64 and up to 2.2e-8 fused against unfused (f32
    # caches: below 1e-8 and 1e-10 there)
    tol_ref, tol_unfused = (1e-6, 1e-6) if f16 else (1e-8, 1e-10)
    for (p0, T), (fo, uo, ref, (fk, fv), (uk, uv), (ck, cv)) in zip(seqs, got):
        assert nmse(fo, ref) < tol_ref   # ~1e-12 on lavapipe; angles up to 100 rad are formed in f32
        assert nmse(fo, uo) < tol_unfused   # bit-identical on lavapipe
        new = np.zeros(n_ctx, bool)
        new[p0:p0 + T] = True
        assert np.array_equal(fk[~new], ck[~new], equal_nan=True) and np.array_equal(fv[~new], cv[~new], equal_nan=True)
        assert np.array_equal(fv, uv, equal_nan=True) and not np.isnan(fk[new]).any()
        # the same float expressions as kv_store_rope.comp; a compiler may still contract them differently
        assert np.allclose(fk[new].astype(np.float32), uk[new].astype(np.float32), rtol=1e-6,
                           atol=1e-3 if f16 else 1e-6)


def test_fused_needs_the_split_kernel(dev, ops):
    b = dev.alloc(64)
    rec = gpu.Recorder(dev)
    try:
        with pytest.raises(gpu.VulkanError, match="new_kv"):
            ops.attention(rec, b, b, b, b, b, 1, 4, 1, 64, 1000, new_kv=(b, b))
        T = ops.attn_split_max_tokens + 1
        assert ops.attention_splits(T, 1000) is None and ops.attention_splits(1, 1000) is not None
    finally:
        rec.destroy()
        b.destroy()


@pytest.mark.parametrize("f16", [False, True])
def test_fused_decode_replay(dev, f16):
    """One fused recording replayed per token with the position in a device buffer (as the engine
    replays its decode pass): each step's row lands in the cache and later steps attend to it."""
    rng = np.random.default_rng(11)
    ops = gpu.Ops(dev)
    ops.attn_split_rows = 8
    n_heads, n_kv, hd, n_ctx, steps = 4, 2, 64, 40, 20
    kvd, cdt = n_kv * hd, np.float16 if f16 else np.float32
    qs = rng.standard_normal((steps, n_heads * hd)).astype(np.float32)
    ks, vs = (rng.standard_normal((steps, kvd)).astype(np.float32) for _ in range(2))
    ab, ob = dev.alloc(3 * 256 * 4), dev.alloc(qs[0].nbytes)
    qb, kb, vb = (gpu.BufferSlice(ab, 1024 * i, a[0].nbytes) for i, a in enumerate((qs, ks, vs)))
    kc, vc = (dev.alloc(n_ctx * kvd * np.dtype(cdt).itemsize) for _ in range(2))
    pb, sb = dev.alloc(16, "upload"), dev.alloc(ops.attention_scratch_bytes(1, n_heads, hd, n_ctx))
    rope = {"head_dim": hd, "mode": "neox", "base": 10000.0}
    rec = gpu.Recorder(dev)
    ops.attention(rec, qb, kc, vc, pb, ob, 1, n_heads, n_kv, hd, n_ctx, f16=f16, scratch=sb, new_kv=(kb, vb),
                  rope=rope)
    rec.finish()
    try:
        K = rope_ref(ks, np.arange(steps), n_kv, hd, hd, "neox", 10000.0).astype(cdt)
        for p in range(steps):
            dev.upload(pb, np.array([p], np.uint32))
            for b, a in ((qb, qs[p]), (kb, ks[p]), (vb, vs[p])):
                dev.upload(ab, a, b.offset)
            rec.run()
            out = np.frombuffer(dev.download(ob, ob.size), np.float32).reshape(1, -1)
            q = rope_ref(qs[p:p + 1], [p], n_heads, hd, hd, "neox", 10000.0)
            ref = attention_ref(q, K[:p + 1], vs[:p + 1].astype(cdt), [p], n_heads, n_kv, hd, 1 / math.sqrt(hd))
            assert nmse(out, ref) < 1e-6, p
        got_k = np.frombuffer(dev.download(kc, kc.size), cdt).reshape(n_ctx, kvd)[:steps]
        got_v = np.frombuffer(dev.download(vc, vc.size), cdt).reshape(n_ctx, kvd)[:steps]
        assert np.allclose(got_k.astype(np.float32), K.astype(np.float32), atol=2e-3 if f16 else 1e-5)
        assert np.array_equal(got_v, vs.astype(cdt))
    finally:
        rec.destroy()
        for b in (ab, ob, kc, vc, pb, sb):
            b.destroy()
