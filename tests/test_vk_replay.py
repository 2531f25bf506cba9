"""Record once, submit many times: the command-buffer replay the engine's speed depends on."""

from __future__ import annotations

import math

import numpy as np
import pytest
from vkpack.runtime import vk as gpu

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")


def put(dev, a, kind="device"):
    a = np.ascontiguousarray(a)
    b = dev.alloc(a.nbytes, kind)
    dev.upload(b, a)
    return b


def get(dev, b, dtype, shape):
    return np.frombuffer(dev.download(b, int(np.prod(shape)) * np.dtype(dtype).itemsize), dtype).reshape(shape)


def test_replay_100_submits_same_result(dev, ops):
    rng = np.random.default_rng(0)
    rows, cols = 33, 256
    W = rng.standard_normal((rows, cols)).astype(np.float16)
    x = rng.standard_normal(cols).astype(np.float32)
    nw = rng.standard_normal(rows).astype(np.float32)
    wb, xb, nb = put(dev, W), put(dev, x), put(dev, nw)
    yb, zb = dev.alloc(rows * 4), dev.alloc(rows * 4)
    rec = gpu.Recorder(dev, "replay")
    ops.linear(rec, gpu.Weight(wb, 0, "F16", rows, cols), xb, yb, 1)
    ops.rms_norm(rec, yb, nb, zb, 1, rows, 1e-5)
    ops.add(rec, zb, yb, zb, rows)
    rec.finish()
    assert rec.n_barriers == 2          # each op reads what the one before wrote
    first = None
    for i in range(100):
        rec.submit()
        rec.wait()
        z = get(dev, zb, np.float32, (rows,))
        first = z.copy() if first is None else first
        assert np.array_equal(z, first), f"submit {i} differs"
    y = W.astype(np.float64) @ x
    ref = y / np.sqrt((y ** 2).mean() + 1e-5) * nw + y
    assert ((first - ref) ** 2).sum() / (ref ** 2).sum() < 1e-7
    rec.destroy()
    for b in (wb, xb, nb, yb, zb):
        b.destroy()


def test_independent_dispatches_need_no_barrier(dev, ops):
    a, b, c, d = (dev.alloc(256) for _ in range(4))
    rec = gpu.Recorder(dev)
    ops.add(rec, a, a, b, 64)
    ops.add(rec, a, a, c, 64)      # reads a, writes c: independent of the first
    assert rec.n_barriers == 0
    ops.add(rec, b, c, d, 64)      # reads b and c: needs a barrier
    assert rec.n_barriers == 1
    rec.run()
    rec.destroy()
    for x in (a, b, c, d):
        x.destroy()


def test_decode_loop_replays_with_new_positions(dev, ops):
    """One recorded decode step (kv store + rope + attention), replayed per token with a new position
    written into a host-visible buffer: the host-write -> shader-read path of the engine."""
    rng = np.random.default_rng(3)
    n_heads, n_kv, hd, n_ctx, steps = 4, 2, 64, 32, 12
    kv_dim = n_kv * hd
    qs = rng.standard_normal((steps, n_heads * hd)).astype(np.float32)
    ks = rng.standard_normal((steps, kv_dim)).astype(np.float32)
    vs = rng.standard_normal((steps, kv_dim)).astype(np.float32)
    qb, kb, vb = dev.alloc(qs[0].nbytes), dev.alloc(ks[0].nbytes), dev.alloc(vs[0].nbytes)
    kc, vc = dev.alloc(n_ctx * kv_dim * 4), dev.alloc(n_ctx * kv_dim * 4)
    ob = dev.alloc(qs[0].nbytes)
    pos = dev.alloc(16, "upload")            # host-visible: rewritten before every submit
    rec = gpu.Recorder(dev, "decode")
    rec.fill(kc)
    rec.fill(vc)
    rec.finish()
    rec.run()
    rec.destroy()
    rec = gpu.Recorder(dev, "decode")
    ops.rope(rec, qb, pos, 1, n_heads, hd, mode="neox", base=10000.0)
    ops.rope(rec, kb, pos, 1, n_kv, hd, mode="neox", base=10000.0)
    ops.kv_store(rec, kb, vb, kc, vc, pos, 1, kv_dim, n_ctx)
    ops.attention(rec, qb, kc, vc, pos, ob, 1, n_heads, n_kv, hd, n_ctx)
    rec.finish()
    outs = []
    for p in range(steps):
        dev.upload(pos, np.array([p], np.uint32))
        dev.upload(qb, qs[p])
        dev.upload(kb, ks[p])
        dev.upload(vb, vs[p])
        rec.run()
        outs.append(get(dev, ob, np.float32, (n_heads * hd,)))

    def rope_neox(x, p, nh):
        x = x.astype(np.float64).reshape(nh, hd).copy()
        inv = 10000.0 ** (-2.0 * np.arange(hd // 2) / hd)
        c, s = np.cos(p * inv), np.sin(p * inv)
        a, b = x[:, :hd // 2].copy(), x[:, hd // 2:].copy()
        x[:, :hd // 2], x[:, hd // 2:] = a * c - b * s, a * s + b * c
        return x.reshape(-1)

    K = np.stack([rope_neox(ks[p], p, n_kv) for p in range(steps)])
    for p in range(steps):
        q = rope_neox(qs[p], p, n_heads)
        ref = np.zeros(n_heads * hd)
        for h in range(n_heads):
            kh = h // (n_heads // n_kv)
            sc = K[:p + 1, kh * hd:(kh + 1) * hd] @ q[h * hd:(h + 1) * hd] / math.sqrt(hd)
            w = np.exp(sc - sc.max())
            ref[h * hd:(h + 1) * hd] = (w / w.sum()) @ vs[:p + 1, kh * hd:(kh + 1) * hd]
        assert ((outs[p] - ref) ** 2).sum() / (ref ** 2).sum() < 1e-7, f"step {p}"
    rec.destroy()
    for b in (qb, kb, vb, kc, vc, ob, pos):
        b.destroy()


def test_submit_all_one_queue_submission(dev, ops):
    a = dev.alloc(64 * 4)
    dev.upload(a, np.ones(64, np.float32))
    recs = []
    for _ in range(3):             # each doubles a; run in order in one vkQueueSubmit
        r = gpu.Recorder(dev)
        ops.add(r, a, a, a, 64)
        recs.append(r.finish())
    for _ in range(2):
        gpu.submit_all(recs, wait=False)
        assert recs[0].wait()      # waits on the batch's shared fence
    assert np.array_equal(get(dev, a, np.float32, (64,)), np.full(64, 64.0, np.float32))
    for r in recs:
        r.destroy()
    a.destroy()


def test_recorder_misuse_is_reported(dev, ops):
    a, b = dev.alloc(64), dev.alloc(64)
    rec = gpu.Recorder(dev)
    ops.add(rec, a, a, b, 16)
    rec.finish()
    with pytest.raises(gpu.VulkanError, match="ready"):
        ops.add(rec, a, a, b, 16)
    b.destroy()
    with pytest.raises(gpu.VulkanError, match="destroyed buffer"):
        rec.submit()
    rec.reset()                    # re-record with live buffers
    c = dev.alloc(64)
    ops.add(rec, a, a, c, 16)
    rec.run()
    with pytest.raises(gpu.VulkanError, match="bindings given"):
        rec.reset()
        rec.dispatch(gpu.get_kernel(dev, "add", 3, 4, (2,), {0: 64}), [a], (1, 1, 1), b"\0" * 4)
    rec.destroy()
    a.destroy()
    c.destroy()
