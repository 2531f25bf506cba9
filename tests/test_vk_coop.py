"""The tensor-core prefill matmul (matmul_coop.comp, VK_NV_cooperative_matrix) against numpy.

GPU tests (marked `gpu`, deselected by default; run with `-m gpu`) skip without cooperative matrices.
The unmarked tests check the fallback on devices without them (lavapipe) and the tile arithmetic.
Tolerance: max |y - ref| <= 1e-2 * max |ref| (x and the dequantized W are rounded to f16).
"""

from __future__ import annotations

import numpy as np
import pytest
from vk_helpers import random_weight, rel_err, run, to_dev, upload_weight
from vkpack.runtime import vk as gpu
from vkpack.shaders.variants import COOP_TYPES

OK, WHY = gpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")


def run_linear(dev, ops, dtype, rows, cols, T, seed, bias=True, accumulate=True, offset=48, split=0):
    """Run ops.linear on random data (with `split` bytes of split-K room); returns (result, float64 reference)."""
    rng = np.random.default_rng(seed)
    raw, wd = random_weight(rng, dtype, rows, cols)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    b = rng.standard_normal(rows).astype(np.float32) if bias else None
    y0 = rng.standard_normal((T, rows)).astype(np.float32) if accumulate else np.zeros((T, rows), np.float32)
    wb = upload_weight(dev, raw, offset)
    xb, yb = to_dev(dev, x), to_dev(dev, y0)
    bb = to_dev(dev, b) if bias else None
    sb = dev.alloc(split) if split else None
    run(dev, lambda rec: ops.linear(rec, gpu.Weight(wb, offset, dtype, rows, cols), xb, yb, T, bias=bb,
                                    accumulate=accumulate, split=sb))
    out = np.frombuffer(dev.download(yb, T * rows * 4), np.float32).reshape(T, rows)
    for buf in (wb, xb, yb, bb, sb):
        if buf is not None:
            buf.destroy()
    ref = x.astype(np.float64) @ wd.astype(np.float64).T
    if bias:
        ref += b
    if accumulate:
        ref += y0
    return out, ref


# ---- without cooperative matrices (lavapipe): the old kernels, unchanged ----

def test_no_coopmat_uses_old_kernels(dev):
    if dev.coopmat_f16:
        pytest.skip("this device has cooperative matrices")
    if "VK_NV_cooperative_matrix" not in dev.info.extensions:
        assert dev.info.coopmat_shapes == ()
    assert not dev.features["cooperativeMatrix"]
    ops = gpu.Ops(dev)
    assert ops.coop is False
    out, ref = run_linear(dev, ops, "Q8_0", 37, 64, 65, 1)
    assert rel_err(out, ref) < 1e-5
    assert not any(name.startswith("matmul_coop") for name, _ in dev._kernels)


def test_coop_tile_choice(dev, monkeypatch):
    """Tile arithmetic without building a pipeline: spec constants and the 48 KiB shrink for Q4_K."""
    ops = gpu.Ops(dev)
    info = dev.info
    monkeypatch.setattr(dev, "info", type(info)(**{**info.__dict__, "max_shared_memory": 49152,
                                                      "subgroup_size": 32}))
    seen = []
    monkeypatch.setattr(ops, "_k", lambda name, nb, push, writes, spec: seen.append((name, spec)) or name)
    assert ops._coop_kernel("F16", 512, 4096) == ("matmul_coop_f16", 128, 64)
    assert seen[-1][1] == {0: 256, 1: 128, 2: 64, 3: 32, 4: 4, 5: 2}
    assert ops._coop_kernel("F16", 512, 1024)[1:] == (128, 32)     # few workgroups: narrower tiles
    assert ops._coop_kernel("F16", 40, 1000)[1:] == (64, 32)
    assert ops._coop_kernel("Q4_K", 512, 4096)[1:] == (64, 64)     # BK 64: 128 rows would not fit
    assert seen[-1][1][3] == 64
    ops.mm_coop_tile = (128, 48, 32, 2, 2)                          # 48 tokens over 2 subgroups: invalid
    with pytest.raises(gpu.VulkanError):
        ops._coop_kernel("F16", 512, 4096)


# ---- with cooperative matrices (NVIDIA) ----

@pytest.fixture(scope="module")
def coop_ops(dev):
    if not dev.coopmat_f16:
        pytest.skip(f"{dev.info.name}: no 16x16x16 f16/f32 VK_NV_cooperative_matrix")
    ops = gpu.Ops(dev)
    assert ops.coop
    return ops


SHAPES = [(100, 33), (100, 512), (4112, 64), (4112, 200), (4112, 512), (16, 33)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", COOP_TYPES)
@pytest.mark.parametrize("rows,T", SHAPES)
def test_coop_linear(dev, coop_ops, dtype, rows, T):
    cols = 768 if dtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS") else 544   # 544: a partial last K step
    out, ref = run_linear(dev, coop_ops, dtype, rows, cols, T, rows + T)
    assert any(name.startswith("matmul_coop") for name, _ in dev._kernels)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(64, 64, 64, 2, 2), (128, 128, 32, 2, 2), (64, 32, 32, 2, 1),
                                  (128, 64, 32, 4, 2)])
@pytest.mark.parametrize("dtype", ["F16", "Q4_0", "Q4_K"])
def test_coop_tiles(dev, coop_ops, tile, dtype):
    coop_ops.mm_coop_tile = tile
    try:
        out, ref = run_linear(dev, coop_ops, dtype, 300, 1024, 100, 7, accumulate=False)
    finally:
        coop_ops.mm_coop_tile = None
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["F16", "Q4_0", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows,cols,T", [(4112, 4096, 32), (300, 2816, 40), (1000, 1280, 64)])
def test_coop_split_k(dev, coop_ops, dtype, rows, cols, T, monkeypatch):
    """Few workgroups: K cut into slices summed by splitk_sum.comp, with bias and accumulate; the slices'
    order is fixed, so the split result is the same on every run and close to the unsplit one."""
    room = coop_ops.split_scratch_bytes(T)
    assert room > 0
    whole, ref = run_linear(dev, coop_ops, dtype, rows, cols, T, rows + T)
    sums, real = [], coop_ops._split_sum
    monkeypatch.setattr(coop_ops, "_split_sum", lambda *a: sums.append(a[6]) or real(*a))   # a[6]: slices
    split, _ = run_linear(dev, coop_ops, dtype, rows, cols, T, rows + T, split=room)
    again, _ = run_linear(dev, coop_ops, dtype, rows, cols, T, rows + T, split=room)
    assert sums and min(sums) > 1, "the product did not split"
    assert rel_err(split, ref) < 1e-2 and rel_err(split, whole) < 1e-4
    assert np.array_equal(split, again)


@pytest.mark.gpu
def test_coop_matches_tiled(dev, coop_ops):
    """The coop kernel and the fp32 tiled kernel agree on a prefill-sized F16 product."""
    out, ref = run_linear(dev, coop_ops, "F16", 1024, 4096, 128, 3, bias=False, accumulate=False)
    tiled = gpu.Ops(dev)
    tiled.coop = False
    out2, _ = run_linear(dev, tiled, "F16", 1024, 4096, 128, 3, bias=False, accumulate=False)
    assert rel_err(out, ref) < 1e-2 and rel_err(out2, ref) < 1e-4


@pytest.mark.gpu
def test_env_disables_coopmat(coop_ops):
    """VKPACK_NO_COOPMAT=1: the extension is not enabled and Ops keeps the old kernels."""
    import os
    import subprocess
    import sys

    code = ("from vkpack.runtime import vk\nd = vk.Device()\n"
            "print(d.coopmat_f16, d.features['cooperativeMatrix'], vk.Ops(d).coop, bool(d.info.coopmat_shapes))\n"
            "d.close()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "VKPACK_NO_COOPMAT": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False", "False", "True"]
