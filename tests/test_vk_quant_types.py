"""The quant types added for issue 12 (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS) on the Vulkan backend.

Every shader family with per-type variants runs on random blocks of awkward shapes (1, 7, 33 rows; 1-3
and 11 blocks per row) against the numpy dequantizer (runtime/cpu/dequant.py, bit-equal to gguf-py:
tests/test_dequant.py) followed by a float64 numpy product:
- products (matmul, matvec, _nosg, tiled): max |y - ref| <= 1e-4 * max |ref| (f32 accumulation in
  the shader's order against float64);
- cooperative-matrix products: 1e-2 (x and the weights are rounded to f16 there, as in test_vk_coop.py);
  they need VK_NV_cooperative_matrix (lavapipe has none: those tests skip, saying so);
- embedding rows: bit-exact (every product in these dequantizers is exact in f32, so the shader's order
  of operations, or an FMA, cannot change a bit);
- whole models: Vulkan logits within 1e-3 relative of the numpy backend's on the same archive.
Also: `--device auto` and `--device vulkan` with an archive whose weight type has no kernel.
"""

from __future__ import annotations

import logging
import zlib

import gguf
import make_synthetic as ms
import numpy as np
import pytest
from vk_helpers import greedy, random_weight, rel_err, run, to_dev, upload_weight
from vkpack.compiler.build import build
from vkpack.pack_format.constants import DTYPES
from vkpack.runtime import backends, vk
from vkpack.runtime.cli import main as cli_main
from vkpack.runtime.cpu.dequant import dequantize
from vkpack.runtime.engine import Engine
from vkpack.shaders.variants import COOP_TYPES, WEIGHT_TYPES

OK, WHY = vk.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"no Vulkan device: {WHY}")

NEW_TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS")
PRODUCT_TOL, COOP_TOL, MODEL_TOL = 1e-4, 1e-2, 1e-3


def test_every_new_type_has_every_shader_family():
    assert set(NEW_TYPES) <= set(WEIGHT_TYPES) and set(NEW_TYPES) <= set(COOP_TYPES)
    assert set(NEW_TYPES) <= set(vk.WEIGHT_FORMATS)
    for t in NEW_TYPES:
        assert vk.WEIGHT_FORMATS[t][:2] == DTYPES[t], t


# ---- products ----

def _ops(dev, cfg: str) -> vk.Ops:
    """Ops set up to take one kernel family: matmul.comp (default), matvec.comp, the _nosg twins of
    matmul.comp, or matmul_tiled.comp (small tiles, from 2 tokens on)."""
    o = vk.Ops(dev)
    o.coop = False
    if cfg == "matvec":
        o.mv_subgroup = True
        sg = max(1, dev.info.subgroup_size)
        o.mv_wg, o.mv_rows, o.mv_units = 2 * sg, 2, 3
    elif cfg == "nosg":
        o.suffix = "_nosg"
        o.mm_wg, o.mm_rows = 32, 1
    elif cfg == "tiled":
        o.mm_tiled_min_tokens = 2
        o.mm_tile = (32, 16, 4, 2)
    return o


def _linear(dev, ops, dtype, rows, nblk, T, seed):
    """ops.linear on random blocks with a bias; returns (result, float64 reference from the numpy dequantizer)."""
    rng = np.random.default_rng(seed)
    cols = nblk * DTYPES[dtype][0]
    raw, _ = random_weight(rng, dtype, rows, cols)
    wd = dequantize(dtype, raw, (rows, cols)).astype(np.float64)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    wb, xb, bb, yb = upload_weight(dev, raw), to_dev(dev, x), to_dev(dev, bias), dev.alloc(T * rows * 4)
    try:
        run(dev, lambda rec: ops.linear(rec, vk.Weight(wb, 48, dtype, rows, cols), xb, yb, T, bias=bb))
        out = np.frombuffer(dev.download(yb, T * rows * 4), np.float32).reshape(T, rows)
    finally:
        for b in (wb, xb, bb, yb):
            b.destroy()
    return out, x.astype(np.float64) @ wd.T + bias


# (kernel family, the kind Ops._linear_kernel must pick, (rows, blocks per row, tokens) cases)
FAMILIES = {
    "matmul": ("matmul", [(1, 1, 1), (7, 2, 3), (33, 3, 17), (33, 11, 1), (7, 11, 5)]),
    "matvec": ("matvec", [(1, 1, 1), (33, 3, 1), (7, 11, 1)]),
    "nosg": ("matmul", [(1, 1, 1), (7, 2, 3), (33, 11, 1)]),
    "tiled": ("tiled", [(1, 1, 2), (7, 2, 3), (33, 3, 17), (7, 11, 5)]),
}
LINEAR_CASES = [(cfg, *case) for cfg, (_, cases) in FAMILIES.items() for case in cases]


@pytest.mark.parametrize("dtype", NEW_TYPES)
@pytest.mark.parametrize("cfg,rows,nblk,T", LINEAR_CASES)
def test_linear(dev, dtype, cfg, rows, nblk, T):
    ops = _ops(dev, cfg)
    assert ops._linear_kernel(T, dtype) == FAMILIES[cfg][0]
    out, ref = _linear(dev, ops, dtype, rows, nblk, T, seed=zlib.crc32(f"{dtype}{cfg}{rows}{nblk}{T}".encode()))
    assert rel_err(out, ref) <= PRODUCT_TOL
    suffix = "_nosg" if cfg == "nosg" else ""
    family = {"matvec": "matvec", "tiled": "matmul_tiled"}.get(cfg, "matmul")
    assert any(name == f"{family}_{dtype.lower()}{suffix}" for name, _ in dev._kernels), "the family's variant ran"


@pytest.fixture(scope="module")
def coop_ops(dev):
    if not dev.coopmat_f16:
        pytest.skip(f"{dev.info.name} has no 16x16x16 f16/f32 VK_NV_cooperative_matrix: matmul_coop_* cannot run")
    ops = vk.Ops(dev)
    assert ops.coop
    return ops


@pytest.mark.parametrize("dtype", NEW_TYPES)
@pytest.mark.parametrize("rows,nblk,T", [(33, 3, 33), (100, 11, 64), (4112, 2, 40)])
def test_linear_coop(dev, coop_ops, dtype, rows, nblk, T):
    if DTYPES[dtype][0] == 32:
        nblk = nblk * 8 + 1     # 17, 89 or 25 blocks of 32: a partial last K step
    assert coop_ops._linear_kernel(T, dtype) == "coop"
    out, ref = _linear(dev, coop_ops, dtype, rows, nblk, T, seed=rows + T)
    assert rel_err(out, ref) <= COOP_TOL


# ---- embedding ----

@pytest.mark.parametrize("dtype", NEW_TYPES)
@pytest.mark.parametrize("nblk", [1, 3, 11])
def test_embed_rows_are_the_dequantized_rows(dev, ops, dtype, nblk):
    rng = np.random.default_rng(nblk)
    rows, cols = 33, nblk * DTYPES[dtype][0]
    raw, _ = random_weight(rng, dtype, rows, cols)
    wd = dequantize(dtype, raw, (rows, cols))
    ids = np.array([0, 32, 7, 7, 1000, 31], np.uint32)   # 1000 is outside the table: a zero row
    wb, ib, ob = upload_weight(dev, raw), to_dev(dev, ids), dev.alloc(len(ids) * cols * 4)
    try:
        run(dev, lambda rec: ops.embed(rec, vk.Weight(wb, 48, dtype, rows, cols), ib, ob, len(ids)))
        out = np.frombuffer(dev.download(ob, len(ids) * cols * 4), np.float32).reshape(len(ids), cols)
    finally:
        for b in (wb, ib, ob):
            b.destroy()
    want = np.zeros((len(ids), cols), np.float32)
    inside = ids < rows
    want[inside] = wd[ids[inside]]
    bad = np.argwhere(out.view(np.uint32) != want.view(np.uint32))
    assert not len(bad), f"{dtype}: {len(bad)} elements differ, first (token, col) {tuple(bad[0])}: " \
                         f"{out[tuple(bad[0])]} != {want[tuple(bad[0])]}"


# ---- whole models ----

SPEC = ms.Spec(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=512, std=0.05)


def _iq4_blocks(qt: gguf.GGMLQuantizationType, n: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """n random IQ4_NL/IQ4_XS blocks with d chosen so values have about `std` (every other bit random)."""
    size = gguf.GGML_QUANT_SIZES[qt][1]
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    kv_rms = 67.4                                    # rms of kvalues_iq4nl
    scale_rms = 18.5 if qt == gguf.GGMLQuantizationType.IQ4_XS else 1.0   # rms of (6-bit code - 32)
    d = std / (kv_rms * scale_rms) * rng.uniform(0.5, 1.5, n)
    b[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(n, 2)
    return b


def write_iq4_gguf(path, spec: ms.Spec, dtype: str, seed: int):
    """`spec` as a GGUF whose 2-D tensors are random `dtype` (IQ4_NL or IQ4_XS) blocks; IQ4_XS rows that
    are not whole 256-blocks fall back to IQ4_NL (as llama.cpp does). 1-D tensors are make_synthetic's
    F32 values. make_synthetic cannot write these types (gguf-py has no IQ4 quantizer)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, spec.arch)
    ms._add_gguf_metadata(w, spec, "F16", seed)      # general.file_type is informational only
    for t in spec.tensors():
        if len(t.shape) == 1:
            w.add_tensor(t.gguf, ms._block(t, seed, spec.std, 0, t.shape[0]))
            continue
        qt = gguf.GGMLQuantizationType[dtype]
        if t.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
            qt = gguf.GGMLQuantizationType.IQ4_NL
        n = int(np.prod(t.shape)) // gguf.GGML_QUANT_SIZES[qt][0]
        raw = _iq4_blocks(qt, n, spec.std, rng).reshape(t.shape[0], -1)
        w.add_tensor(t.gguf, raw, raw_shape=raw.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _archive(tmp_path, dtype: str):
    src = tmp_path / f"{dtype}.gguf"
    if dtype.startswith("IQ4"):
        write_iq4_gguf(src, SPEC, dtype, seed=3)
    else:   # Q5_0/Q5_1 quantized from floats, K-quants random blocks (make_synthetic's module doc)
        ms.write_gguf(src, SPEC, dtype=dtype, seed=3)
    out = tmp_path / f"{dtype}.vkpack"
    build(src, out, progress=False)
    return out


@pytest.mark.parametrize("dtype", NEW_TYPES)
def test_model_vulkan_matches_numpy(tmp_path, dtype):
    path = _archive(tmp_path, dtype)
    with Engine(path, device="numpy") as c, Engine(path, device="vulkan") as g:
        stored = {t.dtype for t in g.archive.tensors.values() if len(t.shape) == 2}
        assert dtype in stored, stored
        ids = c.encode("every quant type on the gpu")
        assert rel_err(g.logits(ids), c.logits(ids)) < MODEL_TOL
        assert greedy(g, ids, 6) == greedy(c, ids, 6)     # decode steps: the T = 1 kernels


def test_model_kquant_matvec_matches_numpy(tmp_path):
    """Q4_K_M (Q4_K with Q6_K for output, v and down) decoded on shaders/matvec_k.comp, which GPUs run for
    T = 1 and lavapipe does not unless told: two subgroups of two rows a workgroup."""
    path = _archive(tmp_path, "Q4_K_M")
    with Engine(path, device="numpy") as c, Engine(path, device="vulkan") as g:
        sg = g.backend.dev.info.subgroup_size
        g.backend.ops.mv_kquant = {"Q4_K": (2 * sg, 2, 4, 2), "Q6_K": (2 * sg, 1, 2, 1)}
        stored = {t.dtype for t in g.archive.tensors.values() if len(t.shape) == 2}
        assert {"Q4_K", "Q6_K"} <= stored, stored
        ids = c.encode("sub-blocks at a time")
        assert greedy(g, ids, 6) == greedy(c, ids, 6)
        assert rel_err(g.logits(ids[:1]), c.logits(ids[:1])) < MODEL_TOL   # one token: matvec_k throughout


# ---- choosing the backend ----

@pytest.fixture
def q5_archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("q5")
    src = ms.write_gguf(d / "m.gguf", ms.Spec(), dtype="Q5_0", seed=1)
    build(src, d / "m.vkpack", progress=False)
    return d / "m.vkpack"


@pytest.fixture
def no_q5_0_kernel(monkeypatch):
    """The Vulkan backend as it was before Q5_0 shaders existed (every type the CPU reads now has them)."""
    monkeypatch.setattr(vk.ops, "WEIGHT_FORMATS", {k: v for k, v in vk.WEIGHT_FORMATS.items() if k != "Q5_0"})


@pytest.mark.parametrize("has_vulkan", [True, False])
def test_auto_falls_back_to_the_cpu_before_opening_a_device(q5_archive, no_q5_0_kernel, monkeypatch, caplog,
                                                            has_vulkan):
    """No device is opened; the fallback is worth one warning where a Vulkan device exists (listing the
    devices is allowed), and none on a machine without one (the CPU is the expected choice there)."""
    def no_device(*a, **k):
        raise AssertionError("a Vulkan device was opened for an archive the shaders cannot read")

    monkeypatch.setattr(vk, "available", lambda: (has_vulkan, "" if has_vulkan else "no Vulkan driver"))
    monkeypatch.setattr("vkpack.runtime.vk.backend.VulkanBackend.__init__", no_device)
    with caplog.at_level(logging.WARNING, logger="vkpack.runtime.backends"), Engine(q5_archive, device="auto") as eng:
        assert eng.backend.name in ("cpu", "numpy"), eng.backend.name
        assert np.isfinite(eng.logits(eng.encode("hello"))).all()
    warnings = [r.getMessage() for r in caplog.records if r.name == "vkpack.runtime.backends"]
    if has_vulkan:
        assert len(warnings) == 1 and "Q5_0" in warnings[0] and "no Vulkan kernel" in warnings[0], warnings
    else:
        assert warnings == []


def test_vulkan_by_name_is_one_clear_error(q5_archive, no_q5_0_kernel, capsys):
    from vkpack.pack_format.reader import Archive
    from vkpack.runtime.vk.backend import VulkanBackend

    arc = Archive(q5_archive)
    try:
        for device in ("vulkan", "hybrid"):
            with pytest.raises(vk.UnsupportedWeightType, match=rf"--device {device}: .* weight type\(s\) Q5_0 "):
                backends.make_backend(device, arc)
        with pytest.raises(vk.UnsupportedWeightType, match="Q5_0"):
            VulkanBackend(arc)                  # directly, too: before any device opens
    finally:
        arc.close()
    code = cli_main(["run", str(q5_archive), "-p", "hi", "-n", "1", "--device", "vulkan"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and "Traceback" not in err and len(lines) == 1, err
    assert "Q5_0" in lines[0] and "--device cpu" in lines[0], lines[0]
