"""Every Vulkan kernel against a numpy reference, on awkward sizes (ggml test-backend-ops style).

Error measure: normalized MSE sum((a-b)^2)/sum(b^2) against a float64 reference, limit 1e-7 unless a
comment says why. Quantized weights are compared with gguf.quants.dequantize of the same bytes.
"""

from __future__ import annotations


import numpy as np
import pytest
from vk_helpers import attention_ref, from_dev, nmse, random_weight, rope_ref, run, to_dev, upload_weight
from vkpack.runtime import vk as gpu

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")

BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q6_K": 256}


# ---- linear ----

LINEAR_CASES = [  # (rows, cols in blocks of the type, T)
    (1, 1, 1), (7, 2, 3), (33, 3, 17), (577, 1, 1), (65, 4, 5),
]


@pytest.mark.parametrize("dtype", list(BLOCK))
@pytest.mark.parametrize("rows,nblk,T", LINEAR_CASES)
def test_linear(dev, ops, dtype, rows, nblk, T):
    rng = np.random.default_rng(rows * 1000 + nblk * 10 + T)
    cols = nblk * max(BLOCK[dtype], 32) if BLOCK[dtype] == 1 else nblk * BLOCK[dtype]
    if dtype in ("F32", "F16", "BF16") and (rows, nblk, T) == (65, 4, 5):
        cols = 4096
    raw, wd = random_weight(rng, dtype, rows, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    wb, xb, yb = upload_weight(dev, raw), to_dev(dev, x), dev.alloc(T * rows * 4)
    w = gpu.Weight(wb, 48, dtype, rows, cols)
    run(dev, lambda rec: ops.linear(rec, w, xb, yb, T))
    ref = x.astype(np.float64) @ wd.astype(np.float64).T
    assert nmse(from_dev(dev, yb, np.float32, (T, rows)), ref) < 1e-7
    for b in (wb, xb, yb):
        b.destroy()


@pytest.mark.parametrize("dtype,T", [("Q8_0", 3), ("Q4_K", 1), ("Q6_K", 1)])
def test_linear_bias_accumulate_and_row_parts(dev, dtype, T):
    """A weight split in two row-parts writing one output, with bias and accumulate (the K-quants at
    T = 1 on shaders/matvec_k.comp)."""
    ops = gpu.Ops(dev)
    sg = max(1, dev.info.subgroup_size)
    ops.mv_kquant = {"Q4_K": (sg, 1, 3, 1), "Q6_K": (2 * sg, 2, 4, 2)}
    assert ops._linear_kernel(T, dtype) == ("matmul" if dtype == "Q8_0" else "matvec_k")
    rng = np.random.default_rng(5)
    rows, cols = 37, 512
    raw, wd = random_weight(rng, dtype, rows, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    y0 = rng.standard_normal((T, rows)).astype(np.float32)
    split = 20
    wa, wb_ = upload_weight(dev, raw[:split]), upload_weight(dev, raw[split:], offset=16)
    xb, bb, yb = to_dev(dev, x), to_dev(dev, bias), to_dev(dev, y0)
    pa = gpu.Weight(wa, 48, dtype, split, cols)
    pb = gpu.Weight(wb_, 16, dtype, rows - split, cols)

    def rec_fn(rec):
        ops.linear(rec, pa, xb, yb, T, y_stride=rows, y_col=0, bias=bb, bias_off=0, accumulate=True)
        ops.linear(rec, pb, xb, yb, T, y_stride=rows, y_col=split, bias=bb, bias_off=split, accumulate=True)

    run(dev, rec_fn)
    ref = y0 + x.astype(np.float64) @ wd.astype(np.float64).T + bias
    assert nmse(from_dev(dev, yb, np.float32, (T, rows)), ref) < 1e-7
    for b in (wa, wb_, xb, bb, yb):
        b.destroy()


def test_linear_splits_over_binding_limit(dev, ops, monkeypatch):
    """Weights larger than maxStorageBufferRange are split into several dispatches."""
    rng = np.random.default_rng(6)
    rows, cols, T = 50, 64, 2
    raw, wd = random_weight(rng, "Q4_0", rows, cols)
    wb, xb, yb = upload_weight(dev, raw), to_dev(dev, rng.standard_normal((T, cols)).astype(np.float32)), \
        dev.alloc(T * rows * 4)
    info = dev.info
    small = type(info)(**{**info.__dict__, "max_storage_buffer_range": 16 * 36 + 64})
    monkeypatch.setattr(dev, "info", small)
    rec = gpu.Recorder(dev)
    ops.linear(rec, gpu.Weight(wb, 48, "Q4_0", rows, cols), xb, yb, T)
    assert rec.n_dispatches > 1
    rec.run()
    rec.destroy()
    monkeypatch.undo()
    x = from_dev(dev, xb, np.float32, (T, cols))
    assert nmse(from_dev(dev, yb, np.float32, (T, rows)), x.astype(np.float64) @ wd.T) < 1e-7
    for b in (wb, xb, yb):
        b.destroy()


@pytest.mark.parametrize("dtype", ["F16", "Q4_K", "Q6_K", "Q4_0", "Q8_0"])
@pytest.mark.parametrize("rows,nblk,T,parts", [(37, 9, 5, 1), (70, 13, 3, 2), (5, 16, 9, 1)])
def test_linear_split_k(dev, dtype, rows, nblk, T, parts, monkeypatch):
    """The tiled matmul with K cut into slices (partials in the `split` room, summed in order by
    splitk_sum.comp): with bias, accumulate and row-parts, equal to numpy, and the same bits on every
    run. Slices of uneven length: 9, 13 and 16 K steps over 2-4 slices."""
    ops = gpu.Ops(dev)
    ops.mm_tiled_min_tokens, ops.mm_tile = 2, (32, 16, 4, 2)
    ops.mm_split_groups, ops.mm_split_min_steps = 64, 3
    rng = np.random.default_rng(rows * 7 + T)
    bk = max(32, BLOCK[dtype])
    cols = nblk * bk
    raw, wd = random_weight(rng, dtype, rows, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    y0 = rng.standard_normal((T, rows)).astype(np.float32)
    wb, xb, bb = upload_weight(dev, raw), to_dev(dev, x), to_dev(dev, bias)
    room = ops.split_scratch_bytes(T)
    assert room == ops.mm_split_bytes
    sb = dev.alloc(room)
    w = gpu.Weight(wb, 48, dtype, rows, cols)
    outs = []
    for _ in range(2):
        yb = to_dev(dev, y0)
        rec = gpu.Recorder(dev)
        if parts > 1:   # a binding holds half the rows: two row-parts, each split
            info = dev.info
            walign = max(16, info.min_storage_buffer_offset_alignment)
            monkeypatch.setattr(dev, "info", type(info)(**{**info.__dict__, "max_storage_buffer_range":
                                                             2 * walign + (rows // 2) * (raw.size // rows)}))
        ops.linear(rec, w, xb, yb, T, bias=bb, accumulate=True, split=sb)
        monkeypatch.undo()
        assert rec.n_dispatches == 2 * parts   # per row-part: the slices, then their sum
        rec.run()
        rec.destroy()
        outs.append(from_dev(dev, yb, np.float32, (T, rows)))
        yb.destroy()
    ref = y0 + x.astype(np.float64) @ wd.astype(np.float64).T + bias
    assert nmse(outs[0], ref) < 1e-7
    assert np.array_equal(outs[0], outs[1])
    for b in (wb, xb, bb, sb):
        b.destroy()


# ---- embed ----

@pytest.mark.parametrize("dtype", list(BLOCK))
def test_embed(dev, ops, dtype):
    rng = np.random.default_rng(11)
    rows, T = 33, 5
    cols = 2 * max(BLOCK[dtype], 32)
    raw, wd = random_weight(rng, dtype, rows, cols)
    ids = np.array([0, 32, 7, 7, 1000], np.uint32)   # 1000 is outside the table: zeros
    wb, ib, ob = upload_weight(dev, raw), to_dev(dev, ids), dev.alloc(T * cols * 4)
    run(dev, lambda rec: ops.embed(rec, gpu.Weight(wb, 48, dtype, rows, cols), ib, ob, T))
    ref = np.zeros((T, cols))
    ref[:4] = wd[ids[:4]]
    out = from_dev(dev, ob, np.float32, (T, cols))
    assert np.array_equal(out, ref.astype(np.float32)), "embedding rows must be bit-exact dequantized rows"
    for b in (wb, ib, ob):
        b.destroy()


# ---- norms, rope, elementwise ----

@pytest.mark.parametrize("groups,n", [(1, 7), (3, 64), (17, 577), (40, 128)])
def test_rms_norm(dev, ops, groups, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((groups, n)).astype(np.float32) * 3
    w = rng.standard_normal(n).astype(np.float32)
    xb, wb, yb = to_dev(dev, x), to_dev(dev, w), dev.alloc(x.nbytes)
    run(dev, lambda rec: ops.rms_norm(rec, xb, wb, yb, groups, n, 1e-6))
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    assert nmse(from_dev(dev, yb, np.float32, x.shape), ref) < 1e-7
    run(dev, lambda rec: ops.rms_norm(rec, xb, wb, xb, groups, n, 1e-6))   # in place
    assert nmse(from_dev(dev, xb, np.float32, x.shape), ref) < 1e-7
    run(dev, lambda rec: ops.rms_norm(rec, yb, wb, yb, groups, n, 1e-6, offset=1.0))   # gemma's (1 + w)
    y = ref.astype(np.float32).astype(np.float64)
    ref1 = y / np.sqrt((y ** 2).mean(-1, keepdims=True) + 1e-6) * (w.astype(np.float64) + 1.0)
    assert nmse(from_dev(dev, yb, np.float32, x.shape), ref1) < 1e-7
    for b in (xb, wb, yb):
        b.destroy()


@pytest.mark.parametrize("mode", ["norm", "neox"])
@pytest.mark.parametrize("T,n_heads,hd,n_rot,use_ff", [(1, 3, 64, 64, False), (17, 5, 128, 128, True),
                                                       (3, 2, 96, 64, False)])
def test_rope(dev, ops, mode, T, n_heads, hd, n_rot, use_ff):
    rng = np.random.default_rng(T + hd)
    x = rng.standard_normal((T, n_heads * hd)).astype(np.float32)
    pos = rng.integers(0, 300, T).astype(np.uint32)
    ff = rng.uniform(1.0, 8.0, n_rot // 2).astype(np.float32) if use_ff else None
    xb, pb = to_dev(dev, x), to_dev(dev, pos)
    fb = to_dev(dev, ff) if use_ff else None
    run(dev, lambda rec: ops.rope(rec, xb, pb, T, n_heads, hd, n_rot=n_rot, mode=mode, base=10000.0,
                                  freq_factors=fb))
    ref = rope_ref(x, pos, n_heads, hd, n_rot, mode, 10000.0, ff)
    # 1e-6: angles up to 300 rad are formed in f32 (as llama.cpp does); the phase error grows with pos
    assert nmse(from_dev(dev, xb, np.float32, x.shape), ref) < 1e-6
    for b in (xb, pb, fb):
        if b is not None:
            b.destroy()


@pytest.mark.parametrize("n", [1, 7, 577, 70001])
def test_add_swiglu(dev, ops, n):
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 4).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    ab, bb, ob = to_dev(dev, a), to_dev(dev, b), dev.alloc(4 * n)
    run(dev, lambda rec: ops.add(rec, ab, bb, ob, n))
    assert nmse(from_dev(dev, ob, np.float32, (n,)), a.astype(np.float64) + b) < 1e-7
    run(dev, lambda rec: ops.swiglu(rec, ab, bb, ob, n))
    a64 = a.astype(np.float64)
    assert nmse(from_dev(dev, ob, np.float32, (n,)), a64 / (1 + np.exp(-a64)) * b) < 1e-7
    run(dev, lambda rec: ops.geglu(rec, ab, bb, ob, n))
    gelu = 0.5 * a64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (a64 + 0.044715 * a64 ** 3)))
    assert nmse(from_dev(dev, ob, np.float32, (n,)), gelu * b) < 1e-7
    run(dev, lambda rec: ops.scale(rec, ab, ob, n, 2.5))
    assert nmse(from_dev(dev, ob, np.float32, (n,)), 2.5 * a64) < 1e-7
    run(dev, lambda rec: ops.softcap(rec, ab, ab, n, 3.0))   # in place
    assert nmse(from_dev(dev, ab, np.float32, (n,)), 3.0 * np.tanh(a64 / 3.0)) < 1e-7
    for x in (ab, bb, ob):
        x.destroy()


@pytest.mark.parametrize("rows,n", [(1, 1), (1, 577), (3, 32000), (2, 151936)])
def test_argmax(dev, ops, rows, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[0, n // 3] = x[0, (2 * n) // 3] = 100.0    # a tie: the first index wins, as numpy
    xb, ob = to_dev(dev, x), dev.alloc(4 * rows)
    run(dev, lambda rec: ops.argmax(rec, xb, ob, rows, n))
    assert from_dev(dev, ob, np.uint32, (rows,)).tolist() == x.argmax(-1).tolist()
    for b in (xb, ob):
        b.destroy()


def test_last_token(dev, ops):
    x = np.arange(5 * 12, dtype=np.float32).reshape(5, 12)
    xb, ob = to_dev(dev, x), dev.alloc(12 * 4)
    run(dev, lambda rec: ops.last_token(rec, xb, ob, 5, 12))
    assert np.array_equal(from_dev(dev, ob, np.float32, (12,)), x[-1])
    for b in (xb, ob):
        b.destroy()


# ---- kv cache + attention ----

@pytest.mark.parametrize("dtype", ["F16", "Q4_K"])
def test_one_barrier_sums_are_wg_sums_bits(dev, dtype):
    """matmul.comp's sums of several subgroups in one barrier add the parts in wg_sum's order: the same bits,
    fused norm included."""
    rng = np.random.default_rng(5)
    rows, cols, T = 37, 512, 5
    raw, _ = random_weight(rng, dtype, rows, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    nw = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    wb, xb, nb = upload_weight(dev, raw), to_dev(dev, x), to_dev(dev, nw)
    w = gpu.Weight(wb, 48, dtype, rows, cols)
    got = []
    for one in (True, False):
        ops = make_ops(dev, "wide")
        ops.mv_unfused, ops.mm_one_barrier = {}, one
        y = dev.alloc(T * rows * 4)
        run(dev, lambda rec, ops=ops, y=y: ops.linear(rec, w, xb, y, T, norm=(nb, 1e-5)))
        got.append(from_dev(dev, y, np.float32, (T, rows)))
        y.destroy()
    assert dev.info.subgroup_size < 64   # several subgroups per workgroup: the one-barrier path ran
    assert np.array_equal(got[0], got[1])
    for b in (wb, xb, nb):
        b.destroy()


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("T,pos0,n_heads,n_kv,hd", [(1, 0, 2, 1, 64), (1, 40, 4, 2, 128), (17, 5, 6, 2, 64),
                                                     (3, 9, 3, 3, 80)])
def test_kv_store_attention(dev, ops, f16, T, pos0, n_heads, n_kv, hd):
    rng = np.random.default_rng(T * 100 + pos0 + hd)
    n_ctx, kv_dim = 64, n_kv * hd
    cdt = np.float16 if f16 else np.float32
    kc = rng.standard_normal((n_ctx, kv_dim)).astype(cdt)    # rows >= pos0 are overwritten or unused
    vc = rng.standard_normal((n_ctx, kv_dim)).astype(cdt)
    q = rng.standard_normal((T, n_heads * hd)).astype(np.float32) * 2
    k = rng.standard_normal((T, kv_dim)).astype(np.float32)
    v = rng.standard_normal((T, kv_dim)).astype(np.float32)
    pos = np.arange(pos0, pos0 + T, dtype=np.uint32)
    bufs = [to_dev(dev, a) for a in (kc, vc, q, k, v, pos)]
    kcb, vcb, qb, kb, vb, pb = bufs
    ob = dev.alloc(T * n_heads * hd * 4)

    def rec_fn(rec):
        ops.kv_store(rec, kb, vb, kcb, vcb, pb, T, kv_dim, n_ctx, f16=f16)
        ops.attention(rec, qb, kcb, vcb, pb, ob, T, n_heads, n_kv, hd, n_ctx, f16=f16)

    run(dev, rec_fn)
    kc_ref, vc_ref = kc.copy(), vc.copy()
    kc_ref[pos] = k.astype(cdt)
    vc_ref[pos] = v.astype(cdt)
    assert np.array_equal(from_dev(dev, kcb, cdt, kc.shape), kc_ref)
    assert np.array_equal(from_dev(dev, vcb, cdt, vc.shape), vc_ref)
    ref = attention_ref(q, kc_ref, vc_ref, pos, n_heads, n_kv, hd)
    assert nmse(from_dev(dev, ob, np.float32, ref.shape), ref) < 1e-7
    for b in bufs + [ob]:
        b.destroy()


# ---- other kernel configurations: tiled matmul, several subgroups per workgroup, no subgroup ops ----

def make_ops(dev, cfg):
    o = gpu.Ops(dev)
    if cfg == "tiled":       # the prefill matmul GPUs use from T >= 16
        o.mm_tiled_min_tokens = 2
        o.mm_tile = (32, 16, 4, 2)
    elif cfg == "wide":      # several subgroups per workgroup: the shared-memory half of the reductions
        o.mm_wg, o.red_wg, o.attn_wg, o.mm_rows, o.mm_units = 64, 64, 32, 2, 3
    elif cfg == "gpu":       # the GPU defaults for T > 1 (64 invocations x 4 rows, sums after one barrier)
        o.mm_wg, o.mm_rows, o.mm_units = 64, 4, 1
    elif cfg == "matvec":    # T = 1 on shaders/matvec.comp: two subgroups per workgroup taking turns
        o.mv_subgroup = True
        sg = max(1, dev.info.subgroup_size)
        o.mv_wg, o.mv_rows, o.mv_units = 2 * sg, 2, 3
    elif cfg == "matvec_k":  # T = 1 K-quants on shaders/matvec_k.comp: 2 subgroups of 2 rows, 6 rows a workgroup
        sg = max(1, dev.info.subgroup_size)
        o.mv_kquant = {"Q4_K": (2 * sg, 2, 6, 2), "Q6_K": (2 * sg, 2, 6, 3)}
    elif cfg == "nosg":      # devices without subgroup arithmetic
        o.suffix = "_nosg"
        o.mm_wg, o.red_wg, o.attn_wg, o.mm_rows = 32, 16, 16, 1
    return o


CONFIGS = ["tiled", "wide", "gpu", "nosg", "matvec", "matvec_k"]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", ["F16", "Q4_K", "Q6_K", "Q4_0"])
@pytest.mark.parametrize("rows,nblk,T", [(33, 3, 17), (7, 1, 3), (1, 2, 1), (37, 3, 1), (301, 2, 1)])
def test_linear_configs(dev, cfg, dtype, rows, nblk, T):
    ops = make_ops(dev, cfg)
    if cfg == "matvec_k" and T == 1 and dtype in ("Q4_K", "Q6_K"):
        assert ops._linear_kernel(T, dtype) == "matvec_k"
    rng = np.random.default_rng(rows + T)
    cols = nblk * max(BLOCK[dtype], 32)
    raw, wd = random_weight(rng, dtype, rows, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    wb, xb, bb, yb = upload_weight(dev, raw), to_dev(dev, x), to_dev(dev, bias), dev.alloc(T * rows * 4)
    run(dev, lambda rec: ops.linear(rec, gpu.Weight(wb, 48, dtype, rows, cols), xb, yb, T, bias=bb))
    ref = x.astype(np.float64) @ wd.astype(np.float64).T + bias
    assert nmse(from_dev(dev, yb, np.float32, (T, rows)), ref) < 1e-7
    for b in (wb, xb, bb, yb):
        b.destroy()


@pytest.mark.parametrize("cfg", ["wide", "nosg"])
def test_reductions_configs(dev, cfg):
    ops = make_ops(dev, cfg)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 577)).astype(np.float32)
    w = rng.standard_normal(577).astype(np.float32)
    xb, wb, yb, ob = to_dev(dev, x), to_dev(dev, w), dev.alloc(x.nbytes), dev.alloc(20)
    run(dev, lambda rec: (ops.rms_norm(rec, xb, wb, yb, 5, 577, 1e-5), ops.argmax(rec, xb, ob, 5, 577)))
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert nmse(from_dev(dev, yb, np.float32, x.shape), ref) < 1e-7
    assert from_dev(dev, ob, np.uint32, (5,)).tolist() == x.argmax(-1).tolist()
    for b in (xb, wb, yb, ob):
        b.destroy()


@pytest.mark.parametrize("cfg", ["wide", "nosg"])
@pytest.mark.parametrize("f16", [False, True])
def test_attention_configs(dev, cfg, f16):
    ops = make_ops(dev, cfg)
    rng = np.random.default_rng(13)
    T, n_heads, n_kv, hd, n_ctx = 5, 4, 1, 64, 48
    cdt = np.float16 if f16 else np.float32
    kc = rng.standard_normal((n_ctx, n_kv * hd)).astype(cdt)
    vc = rng.standard_normal((n_ctx, n_kv * hd)).astype(cdt)
    q = rng.standard_normal((T, n_heads * hd)).astype(np.float32)
    pos = np.array([0, 3, 17, 40, 47], np.uint32)
    kcb, vcb, qb, pb = (to_dev(dev, a) for a in (kc, vc, q, pos))
    ob = dev.alloc(q.nbytes)
    run(dev, lambda rec: ops.attention(rec, qb, kcb, vcb, pb, ob, T, n_heads, n_kv, hd, n_ctx, f16=f16))
    ref = attention_ref(q, kc, vc, pos, n_heads, n_kv, hd)
    assert nmse(from_dev(dev, ob, np.float32, ref.shape), ref) < 1e-7
    for b in (kcb, vcb, qb, pb, ob):
        b.destroy()


def test_batch_of_two_sequences(dev, ops):
    """Rows of one batch buffer belong to two sequences with their own caches (t0), and the last row of
    each is gathered for the logits (copy_rows)."""
    rng = np.random.default_rng(21)
    n_heads, n_kv, hd, n_ctx = 2, 1, 64, 16
    seqs = [(0, 3, 4), (3, 5, 0)]                 # (row0, row1, pos0): a 3-token continuation + a new prompt
    T = 5
    q = rng.standard_normal((T, n_heads * hd)).astype(np.float32)
    k = rng.standard_normal((T, n_kv * hd)).astype(np.float32)
    v = rng.standard_normal((T, n_kv * hd)).astype(np.float32)
    pos = np.array([4, 5, 6, 0, 1], np.uint32)
    caches = [(rng.standard_normal((n_ctx, n_kv * hd)).astype(np.float32),
               rng.standard_normal((n_ctx, n_kv * hd)).astype(np.float32)) for _ in seqs]
    qb, kb, vb, pb = (to_dev(dev, a) for a in (q, k, v, pos))
    cbs = [(to_dev(dev, a), to_dev(dev, b)) for a, b in caches]
    ob, lastb = dev.alloc(q.nbytes), dev.alloc(2 * q.shape[1] * 4)

    def rec_fn(rec):
        for (r0, r1, _), (kc, vc) in zip(seqs, cbs):
            ops.kv_store(rec, kb, vb, kc, vc, pb, r1 - r0, n_kv * hd, n_ctx, t0=r0)
            ops.attention(rec, qb, kc, vc, pb, ob, r1 - r0, n_heads, n_kv, hd, n_ctx, t0=r0)
        ops.copy_rows(rec, ob, lastb, [r1 - 1 for _, r1, _ in seqs], q.shape[1])

    run(dev, rec_fn)
    out = from_dev(dev, ob, np.float32, q.shape)
    for (r0, r1, _), (kc, vc) in zip(seqs, caches):
        kc, vc = kc.copy(), vc.copy()
        kc[pos[r0:r1]], vc[pos[r0:r1]] = k[r0:r1], v[r0:r1]
        ref = attention_ref(q[r0:r1], kc, vc, pos[r0:r1], n_heads, n_kv, hd)
        assert nmse(out[r0:r1], ref) < 1e-7
    assert np.array_equal(from_dev(dev, lastb, np.float32, (2, q.shape[1])), out[[2, 4]])
    for b in (qb, kb, vb, pb, ob, lastb, *[x for pair in cbs for x in pair]):
        b.destroy()


@pytest.mark.parametrize("cfg", ["default", "wide", "gpu", "nosg"])
@pytest.mark.parametrize("dtype", ["F16", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("T", [1, 3])
def test_linear_fused_norm_and_glu(dev, cfg, dtype, T):
    """The decode fusions of matmul.comp: rms_norm folded into the x loads, and SwiGLU."""
    ops = gpu.Ops(dev) if cfg == "default" else make_ops(dev, cfg)
    ops.mv_unfused, ops.mv_kquant = {}, {}   # a GPU's defaults run these types unfused at small T
    rng = np.random.default_rng(T * 7 + len(dtype))
    rows, cols, eps = 37, 512, 1e-5
    raw, wd = random_weight(rng, dtype, rows, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32) * 3
    u = rng.standard_normal((T, cols)).astype(np.float32)
    nw = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    wb, xb, ub, nb = upload_weight(dev, raw), to_dev(dev, x), to_dev(dev, u), to_dev(dev, nw)
    y1, y2 = dev.alloc(T * rows * 4), dev.alloc(T * rows * 4)
    w = gpu.Weight(wb, 48, dtype, rows, cols)
    assert ops.fuses(T, dtype)
    run(dev, lambda rec: (ops.linear(rec, w, xb, y1, T, norm=(nb, eps)), ops.linear(rec, w, xb, y2, T, glu_up=ub)))
    x64 = x.astype(np.float64)
    normed = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + eps) * nw
    glu = x64 / (1 + np.exp(-x64)) * u
    assert nmse(from_dev(dev, y1, np.float32, (T, rows)), normed @ wd.T) < 1e-7
    assert nmse(from_dev(dev, y2, np.float32, (T, rows)), glu @ wd.T) < 1e-7
    for b in (wb, xb, ub, nb, y1, y2):
        b.destroy()


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("mode,hd,n_rot,use_ff", [("norm", 64, 64, False), ("neox", 128, 128, True),
                                                  ("neox", 64, 32, False), ("norm", 80, 48, True)])
@pytest.mark.parametrize("T,t0", [(1, 0), (3, 2)])
def test_kv_store_with_rope_equals_rope_then_store(dev, ops, f16, mode, hd, n_rot, use_ff, T, t0):
    """The decode fusion: keys rotated on their way into the cache, as rope() + kv_store() do it."""
    rng = np.random.default_rng(hd + n_rot + T)
    n_kv, n_ctx, rows = 2, 32, t0 + T
    kv_dim = n_kv * hd
    cdt = np.float16 if f16 else np.float32
    k = rng.standard_normal((rows, kv_dim)).astype(np.float32)
    v = rng.standard_normal((rows, kv_dim)).astype(np.float32)
    pos = np.array([7, 3, 20, 11, 9][:rows], dtype=np.uint32)
    ff = rng.uniform(1.0, 4.0, n_rot // 2).astype(np.float32)
    fb = to_dev(dev, ff)
    rope = {"head_dim": hd, "n_rot": n_rot, "mode": mode, "base": 10000.0, "freq_factors": fb if use_ff else None}
    kb, vb, pb = to_dev(dev, k), to_dev(dev, v), to_dev(dev, pos)
    caches = [dev.alloc(n_ctx * kv_dim * np.dtype(cdt).itemsize) for _ in range(4)]
    run(dev, lambda rec: [rec.fill(c) for c in caches])
    run(dev, lambda rec: ops.kv_store(rec, kb, vb, caches[0], caches[1], pb, T, kv_dim, n_ctx, f16=f16, t0=t0,
                                      rope=rope))
    run(dev, lambda rec: (ops.rope(rec, kb, pb, rows, n_kv, hd, n_rot=n_rot, mode=mode, base=10000.0,
                                   freq_factors=fb if use_ff else None),
                          ops.kv_store(rec, kb, vb, caches[2], caches[3], pb, T, kv_dim, n_ctx, f16=f16, t0=t0)))
    fused_k, fused_v, ref_k, ref_v = (from_dev(dev, c, cdt, (n_ctx, kv_dim)) for c in caches)
    assert np.array_equal(fused_v, ref_v)
    # the same float expressions as rope.comp; a GPU compiler may still contract them differently
    assert np.allclose(fused_k.astype(np.float32), ref_k.astype(np.float32), rtol=1e-6, atol=1e-6 if not f16 else 1e-3)
    expect = rope_ref(k, pos, n_kv, hd, n_rot, mode, 10000.0, ff if use_ff else None)
    got = fused_k[pos[t0:t0 + T]].astype(np.float32)
    assert np.allclose(got, expect[t0:t0 + T], atol=2e-3 if f16 else 1e-5)
    for b in [kb, vb, pb, fb] + caches:
        b.destroy()


@pytest.mark.slow
def test_sweep_tool_smoke(capsys):
    """tools/sweep_matvec.py end to end on a tiny setting, both modes (a few seconds on lavapipe)."""
    import sweep_matvec

    assert sweep_matvec.main(["--shape", "1b", "--layers", "1", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "plain  default" in out and "matmul wg=" in out and "best per shape and fusion" in out
    assert sweep_matvec.main(["--by-role", "--shape", "1b", "--layers", "1", "--quick"]) == 0
    assert "mv_config={0:" in capsys.readouterr().out
