"""The decode matvec with x staged in shared memory (shaders/matvec_xs.comp, Ops.mv_xs) against numpy.

Awkward sizes (rows and cols not multiples of the workgroup's rows or lanes, grids that make the row loop
wrap and grids bigger than the rows), both fusions, f32 and f16 staged x, bias/accumulate/y_col/row-parts,
and a whole model against the numpy backend. Error: normalized MSE against a float64 reference < 1e-7;
with f16 staged x the reference rounds the fused x to f16 too, so the limit stays that tight.
"""

from __future__ import annotations

import numpy as np
import pytest
from vkpack.runtime import vk as gpu

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
BLOCK = {"F32": 4, "F16": 8, "BF16": 8, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q6_K": 256}  # cols step
F16_FIELDS = {"Q4_K": (0, 2), "Q6_K": (208,)}   # f16 scales of random K-quant blocks, kept sane


def nmse(a, ref):
    ref = np.asarray(ref, np.float64)
    return float(((np.asarray(a, np.float64) - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-30))


def random_weight(rng, dtype, rows, cols):
    """(raw bytes (rows, row_bytes) uint8, dequantized f32 (rows, cols))."""
    if dtype in ("F32", "F16"):
        w = rng.standard_normal((rows, cols)).astype({"F32": np.float32, "F16": np.float16}[dtype])
        return w.view(np.uint8), w.astype(np.float32)
    qt = getattr(Q, dtype)
    if dtype in F16_FIELDS:  # gguf-py has no K-quant quantizer: random bytes with finite scales
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(rows * (cols // bs), ts), dtype=np.uint8)
        for off in F16_FIELDS[dtype]:
            raw[:, off:off + 2] = rng.uniform(0.001, 0.05, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
    return raw, gguf.quants.dequantize(raw, qt).reshape(rows, cols).astype(np.float32)


def to_dev(dev, arr, offset=0):
    a = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    b = dev.alloc(max(offset + a.nbytes + 32, 16))
    dev.upload(b, a, offset)
    return b


def record(dev, fn):
    """Run fn(rec); returns the names of the kernels it dispatched."""
    rec = gpu.Recorder(dev)
    try:
        fn(rec)
        names = [k.name for k in rec._keep]
        rec.run()
    finally:
        rec.destroy()
    return names


def xs_ops(dev, wg_subgroups, rows, units, min_rows=0, max_groups=16):
    o = gpu.Ops(dev)
    o.mv_xs = True
    o.mv_xs_wg = wg_subgroups * dev.info.subgroup_size
    o.mv_xs_rows, o.mv_xs_units, o.mv_xs_min_rows, o.mv_xs_max_groups = rows, units, min_rows, max_groups
    return o


# (rows, cols in steps, subgroups a workgroup, rows a subgroup, units in flight, min rows, max groups)
CASES = [
    (37, 5, 2, 2, 3, 0, 3),     # 3 groups x 2 subgroups x 2 rows: the row loop wraps 4 times, last one partial
    (3, 2, 1, 4, 1, 0, 16),     # fewer rows than one workgroup-iteration: one workgroup, rows clamped
    (301, 3, 4, 1, 2, 64, 16),  # at least 64 rows a workgroup: 5 workgroups of 4 subgroups
]


@pytest.mark.parametrize("dtype", list(BLOCK))
def test_every_dtype(dev, dtype):
    rng = np.random.default_rng(sum(map(ord, dtype)))
    bufs, checks = [], []

    def rec_fn(rec):
        for i, (rows, steps, sgs, nr, nu, mr, mg) in enumerate(CASES):
            cols = steps * BLOCK[dtype]
            raw, wd = random_weight(rng, dtype, rows, cols)
            x = rng.standard_normal(cols).astype(np.float32)
            wb, xb, yb = to_dev(dev, raw, 48), to_dev(dev, x), dev.alloc(rows * 4)
            bufs.extend((wb, xb, yb))
            xs_ops(dev, sgs, nr, nu, mr, mg).linear(rec, gpu.Weight(wb, 48, dtype, rows, cols), xb, yb, 1)
            checks.append((i, yb, rows, x.astype(np.float64) @ wd.astype(np.float64).T))

    names = record(dev, rec_fn)
    assert names == [f"matvec_xs_{dtype.lower()}"] * len(CASES)
    for i, yb, rows, ref in checks:
        got = np.frombuffer(dev.download(yb, rows * 4), np.float32)
        assert nmse(got, ref) < 1e-7, f"case {CASES[i]}"
    for b in bufs:
        b.destroy()


def silu(v):
    return v / (1.0 + np.exp(-v))


@pytest.mark.parametrize("x_f16", [False, True], ids=["x-f32", "x-f16"])
@pytest.mark.parametrize("fusion", ["none", "norm", "glu"])
def test_fusions_bias_accumulate_row_parts(dev, monkeypatch, fusion, x_f16):
    """A Q4_K weight split in row-parts (a small binding limit) writing columns y_col.. of a wider y, with
    bias and accumulate; x fused with rms_norm or SwiGLU while it is staged; f16 x forced by a small
    shared-memory budget."""
    rng = np.random.default_rng(7)
    dtype, rows, cols, y_col, ys, eps = "Q4_K", 45, 768, 5, 56, 1e-5
    raw, wd = random_weight(rng, dtype, rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    u = rng.standard_normal(cols).astype(np.float32)
    nw = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    bias = rng.standard_normal(rows + 3).astype(np.float32)
    y0 = rng.standard_normal(ys).astype(np.float32)
    wb, xb, ub, nb, bb, yb = (to_dev(dev, a, off) for a, off in ((raw, 16), (x, 0), (u, 0), (nw, 0), (bias, 0),
                                                                     (y0, 0)))
    ops = xs_ops(dev, 2, 2, 2, max_groups=2)
    if x_f16:
        ops.mv_xs_shared = cols * 2 + 4 * ops.mv_xs_wg      # f16 x fits exactly, f32 x does not
    monkeypatch.setattr(dev, "info", type(dev.info)(**{**dev.info.__dict__,
                                                         "max_storage_buffer_range": 16 * 432 + 64}))
    w = gpu.Weight(wb, 16, dtype, rows, cols)
    assert len(ops._row_parts(w)) == 3
    kw = {"norm": {"norm": (nb, eps)}, "glu": {"glu_up": ub}, "none": {}}[fusion]
    names = record(dev, lambda rec: ops.linear(rec, w, xb, yb, 1, y_stride=ys, y_col=y_col, bias=bb, bias_off=3,
                                               accumulate=True, **kw))
    assert names == ["matvec_xs_q4_k"] * 3
    x64 = x.astype(np.float64)
    xe = {"norm": x64 * nw, "glu": silu(x64) * u, "none": x64}[fusion]
    if x_f16:
        xe = xe.astype(np.float16).astype(np.float64)
    prod = wd.astype(np.float64) @ xe
    if fusion == "norm":
        prod /= np.sqrt((x64 ** 2).mean() + eps)
    ref = y0.astype(np.float64)
    ref[y_col:y_col + rows] += prod + bias[3:]
    assert nmse(np.frombuffer(dev.download(yb, ys * 4), np.float32), ref) < 1e-7
    for b in (wb, xb, ub, nb, bb, yb):
        b.destroy()


def test_f16_x_with_an_odd_number_of_x_vectors(dev):
    """F32 weights allow cols % 8 == 4: the last f16 slot of x holds one vector and zeros."""
    rng = np.random.default_rng(3)
    rows, cols = 19, 36
    raw, wd = random_weight(rng, "F32", rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    wb, xb, yb = to_dev(dev, raw, 48), to_dev(dev, x), dev.alloc(rows * 4)
    ops = xs_ops(dev, 1, 2, 1, max_groups=2)
    ops.mv_xs_shared = 4 * ops.mv_xs_wg + 16 * 5
    assert ops._xs_layout(cols) == (1, 5)
    record(dev, lambda rec: ops.linear(rec, gpu.Weight(wb, 48, "F32", rows, cols), xb, yb, 1))
    ref = wd.astype(np.float64) @ x.astype(np.float16).astype(np.float64)
    assert nmse(np.frombuffer(dev.download(yb, rows * 4), np.float32), ref) < 1e-7
    for b in (wb, xb, yb):
        b.destroy()


def test_kernel_choice(dev):
    """mv_xs switches T = 1 to matvec_xs (which fuses); x too big even as f16, T > 1 or no subgroups:
    matmul.comp."""
    ops = gpu.Ops(dev)
    assert ops._linear_kernel(1, "F16", 4096) == "matmul" and ops.fuses(1, "F16")
    ops.mv_xs = True
    assert ops._linear_kernel(1, "F16", 4096) == "matvec_xs" and ops.fuses(1, "F16")
    assert ops._linear_kernel(2, "F16", 4096) == "matmul"
    ops.mv_xs_shared = 4 * ops.mv_xs_wg + 4096
    assert ops._xs_layout(1024) == (0, 256) and ops._xs_layout(2048) == (1, 256) and ops._xs_layout(4096) is None
    assert ops._linear_kernel(1, "F16", 4096) == "matmul"
    ops.suffix = "_nosg"
    assert ops._linear_kernel(1, "F16", 1024) == "matmul"


def test_whole_model_matches_numpy(tmp_path):
    """Decode steps (T = 1) of a synthetic llama with mv_xs on, norm fused into q/k/v/gate/up and SwiGLU into
    down, the down projection's x staged as f16 (as the 8B's on NVIDIA), against the numpy backend."""
    import make_synthetic as ms
    from vkpack.compiler.build import build
    from vkpack.runtime.engine import Engine

    spec = ms.Spec(arch="llama", layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=1024, std=0.1)
    build(ms.write_gguf(tmp_path / "m.gguf", spec, dtype="Q8_0", seed=5), tmp_path / "m.vkpack", progress=False)
    with Engine(tmp_path / "m.vkpack", device="cpu") as c, Engine(tmp_path / "m.vkpack", device="vulkan") as g:
        ops = g.backend.ops
        ops.mv_xs = True
        ops.mv_xs_shared = 4 * spec.hidden + 4 * ops.mv_xs_wg   # hidden x as f32, ffn x (2x wider) as f16
        ids = c.encode("staged x")
        with c.kv_session(16) as kc, g.kv_session(16) as kg:
            c.executor.forward(np.asarray(ids), 0, kc)
            g.executor.forward(np.asarray(ids), 0, kg)
            tok = ids[-1]
            for pos in range(len(ids), len(ids) + 4):
                ref = c.executor.forward(np.asarray([tok]), pos, kc)[-1]
                got = g.executor.forward(np.asarray([tok]), pos, kg)[-1]
                assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-3, pos
                tok = int(ref.argmax())
        specs = [(k.name, k.spec) for k in g.backend.last_fast[2]._keep if k.name.startswith("matvec_xs")]
        fused = {(s[3], s[4]) for _, s in specs}    # (FUSE, XF16) of the linears of the decode pass
        assert {(1, 0), (2, 1)} <= fused, fused


@pytest.mark.slow
def test_sweep_tool_smoke(capsys):
    """tools/sweep_matvec.py end to end on a tiny setting (~4 s on lavapipe)."""
    import sweep_matvec

    assert sweep_matvec.main(["--shape", "1b", "--layers", "1", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "matmul (default)" in out and "xs wg=" in out and "best per shape and fusion" in out
