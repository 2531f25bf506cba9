"""The native CPU backend against its reference, the numpy backend: the same models, the same tokens.

Tolerances: last-position logits within 1e-4 relative (max |native - numpy| over max |numpy|): both
accumulate in f32 from the same dequantized values, only the order of the sums differs; greedy
tokens identical for 16 steps. Weights stay as stored: the tier holds the archive's bytes, not f32.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.pack_format.errors import VkpackError
from vkpack.runtime import native
from vkpack.runtime.backends import make_backend
from vkpack.runtime.engine import Engine

ok, why = native.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"native kernels unavailable: {why}")
REL_TOL = 1e-4
DTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
          "Q4_K_M"]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def greedy(eng: Engine, ids: list[int], n: int) -> list[int]:
    eng.generate(ids, max_tokens=n, temperature=0, ignore_eos=True)
    return list(eng.last_ids)


@pytest.fixture(scope="module", params=DTYPES)
def archive(request, tmp_path_factory):
    """A 3-layer llama GGUF in one weight type (or llama.cpp's Q4_K_M mix), 1 MiB packs; hidden 320
    (not a multiple of 256) for the 32-element block types, 512 and ffn 768 for the K-quants."""
    d = tmp_path_factory.mktemp(request.param)
    if request.param.endswith(("_K", "_K_M")):
        spec = ms.Spec(layers=3, hidden=512, heads=8, kv_heads=2, ffn=768, vocab=700, std=0.05)
    else:
        spec = ms.Spec(layers=3, hidden=320, heads=5, kv_heads=1, ffn=640, vocab=700, std=0.1)
    src = ms.write_gguf(d / "m.gguf", spec, dtype=request.param, seed=21)
    build(src, d / "m.vkpack", max_pack_mb=1, progress=False)
    return d / "m.vkpack"


def test_native_matches_numpy_resident_and_streamed(archive):
    with Engine(archive, device="numpy") as ref, Engine(archive, device="cpu") as eng:
        assert eng.backend.name == "cpu" and ref.backend.name == "numpy"
        ids = ref.encode("the native kernels read weights as stored")
        assert len(ids) > 1
        assert rel_err(eng.logits(ids), ref.logits(ids)) < REL_TOL
        want = greedy(ref, ids, 16)
        assert greedy(eng, ids, 16) == want
        # the tier holds the stored bytes (plus f32 copies of vectors), never an f32 copy of the weights
        stored = sum(p.raw_size for p in eng.archive.packs)
        assert eng.model_bytes < stored * 1.1 + (1 << 20)
        if eng.archive.tensors["blk.0.attn_q.weight"].dtype != "F32":
            assert ref.model_bytes > 1.5 * stored
    with Engine(archive, device="cpu") as probe:
        floor, model = probe.min_bytes, probe.model_bytes
    if model < 2 * floor:
        return  # a 4-bit model this small fits in the smallest budget: nothing streams (the wider types do)
    with Engine(archive, device="cpu", vram_gb=(floor + probe.model_bytes / 8) / 2**30) as small:
        assert small.tier.budget < small.model_bytes
        assert greedy(small, ids, 16) == want
        assert small.tier.evictions > 0


@pytest.mark.parametrize("path", ["kernels", "blas tiles"])
def test_prefill_matches_numpy(archive, path):
    """Passes of BLAS_MIN_TOKENS tokens and more: the kernels' GEMM (gemm.h), or, as a portable build
    does, dequantized tiles + BLAS."""
    from vkpack.runtime.native.backend import BLAS_MIN_TOKENS

    with Engine(archive, device="numpy") as ref, Engine(archive, device="cpu") as eng:
        if path == "blas tiles":
            eng.backend.blas_min_tokens, eng.backend.tile_bytes = BLAS_MIN_TOKENS, 1 << 20
        ids = [int(i) for i in np.random.default_rng(3).integers(1, 700, BLAS_MIN_TOKENS + 7)]
        assert rel_err(eng.logits(ids), ref.logits(ids)) < REL_TOL


def test_batched_sequences_equal_separate_passes(archive):
    with Engine(archive, device="cpu") as eng:
        a, b = eng.encode("first sequence here"), eng.encode("second")
        la, lb = eng.logits(a), eng.logits(b)
        with eng.kv_session(32) as ka, eng.kv_session(32) as kb:
            both = eng.forward_batch([(a, 0, ka), (b, 0, kb)])
        assert rel_err(both[0], la) < 1e-5 and rel_err(both[1], lb) < 1e-5


def test_prefill_ops_in_the_kernels_match_numpy(archive, monkeypatch):
    """Passes of NATIVE_OPS_MIN_TOKENS tokens and more run attention and SwiGLU in ops.h: two sequences in
    one pass (each shorter than the threshold), and a second pass over a cached prefix (pos0 > 0)."""
    from vkpack.runtime.native.backend import NATIVE_OPS_MIN_TOKENS

    rng = np.random.default_rng(4)
    a, b, c = (rng.integers(1, 700, n).tolist() for n in (NATIVE_OPS_MIN_TOKENS - 5, 9, NATIVE_OPS_MIN_TOKENS + 3))
    with Engine(archive, device="numpy") as ref, Engine(archive, device="cpu") as eng:
        calls = []
        for op in ("attention", "swiglu"):
            fn = getattr(eng.backend.kernels, op)
            monkeypatch.setattr(eng.backend.kernels, op, lambda *args, _fn=fn, _op=op: calls.append(_op) or _fn(*args))
        with eng.kv_session(64) as ka, eng.kv_session(64) as kb:
            both = eng.forward_batch([(a, 0, ka), (b, 0, kb)])
            more = eng.forward_batch([(c, len(a), ka)])[-1]
        assert rel_err(both[0], ref.logits(a)) < REL_TOL and rel_err(both[1], ref.logits(b)) < REL_TOL
        assert rel_err(more, ref.logits(a + c)) < REL_TOL
        assert {"attention", "swiglu"} <= set(calls)


@pytest.mark.parametrize("device", ["cpu", "numpy"])
def test_token_id_outside_the_embedding_is_refused(archive, device):
    with Engine(archive, device=device) as eng, pytest.raises(VkpackError, match="outside the embedding"):
        eng.logits([1, 2, eng.archive.tensors["token_embd.weight"].shape[0]])


def test_without_a_compiler_cpu_falls_back_to_numpy_with_one_warning(archive, monkeypatch, caplog, tmp_path):
    """A machine with no C compiler: the first engine warns once, with the reason; later ones are quiet."""
    from vkpack.pack_format.reader import Archive
    from vkpack.runtime.native import loader

    monkeypatch.setattr(loader, "_state", {})  # as in a fresh process (restored afterwards)
    monkeypatch.setenv("CC", "no-such-cc-for-vkpack")
    monkeypatch.setenv("VKPACK_CACHE", str(tmp_path))
    with Archive(archive) as arc, caplog.at_level(logging.WARNING):
        for _ in range(2):
            backend = make_backend("cpu", arc)
            try:
                assert backend.name == "numpy"
            finally:
                backend.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no-such-cc-for-vkpack" in warnings[0], warnings
