"""Every supported family against transformers: tiny random models that transformers itself builds.

For each family (tools/family_models.py): the HF folder as transformers 5 saves it, the same folder with
a transformers 4 config.json, and the same weights as GGUF (tools/hf_to_gguf.py, llama.cpp's layout) in
F32 and in quantized types. Checked: logits at every position of a 64-token prompt (each position by a
decode step, which crosses the 16-token sliding windows, plus one prefill of the whole prompt in two
chunks), within REL_TOL of transformers in float32 running the same (for GGUF: dequantized) weights, and
32 greedy tokens equal to transformers', unlimited and at a quarter of the model's bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import family_models as fm
import hf_reference
import hf_to_gguf
from vkpack.compiler.build import build
from vkpack.pack_format.errors import SourceError
from vkpack.runtime.engine import Engine

REL_TOL = 1e-3
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, fm.VOCAB, 64)]
FAMILIES = sorted(fm.FAMILIES)


def _some(families: list[str], default: tuple[str, ...]) -> list:
    """`families` as parameters, those outside `default` marked slow: the default run keeps the families
    whose graphs use the ops beyond llama's (post-norms, geglu, soft-caps, windows, multipliers, fused
    tensors); the whole matrix runs with -m slow."""
    return [f if f in default else pytest.param(f, marks=pytest.mark.slow) for f in families]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """family -> (HF folder, transformers model, reference logits [64, vocab]), made once per family."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            folder = fm.make_hf(family, tmp_path_factory.mktemp(family) / "hf", seed=FAMILIES.index(family))
            model = fm.load_reference(folder)
            cache[family] = (folder, model, _ref_logits(model))
        return cache[family]
    return get


def _ref_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].float().numpy()


def _hf_greedy(model, n: int = 32) -> list[int]:
    return hf_reference.hf_greedy(model, PROMPT, n)


def _greedy(archive, device: str = "numpy", vram_gb: float | None = None) -> list[int]:
    with Engine(archive, device=device, vram_gb=vram_gb) as eng:
        eng.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True)
        return list(eng.last_ids)


def _check_engine(archive, ref: np.ndarray, device: str = "numpy") -> list[int]:
    """Logits at every position against `ref`; returns 32 greedy tokens."""
    with Engine(archive, device=device) as eng:
        with eng.kv_session(len(PROMPT)) as kv:
            for t in range(len(PROMPT)):
                got = eng.executor.forward(np.asarray(PROMPT[t:t + 1]), t, kv)[-1]
                assert rel_err(got, ref[t]) < REL_TOL, f"position {t}"
        with eng.kv_session(len(PROMPT)) as kv:  # a prefill in two chunks, the second past the window
            eng.executor.forward(np.asarray(PROMPT[:40]), 0, kv)
            got = eng.executor.forward(np.asarray(PROMPT[40:]), 40, kv)[-1]
            assert rel_err(got, ref[-1]) < REL_TOL
        eng.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True)
        return list(eng.last_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_matches_transformers(made, tmp_path, family):
    folder, model, ref = made(family)
    build(folder, tmp_path / "m.vkpack", progress=False)
    tokens = _check_engine(tmp_path / "m.vkpack", ref)
    assert tokens == _hf_greedy(model)
    with Engine(tmp_path / "m.vkpack") as eng:
        quarter = eng.model_bytes / 4 / 2**30
    assert _greedy(tmp_path / "m.vkpack", vram_gb=quarter) == tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers4_config_builds_the_same_model(made, tmp_path, family):
    """The same weights with config.json as transformers 4 wrote it: the same hyperparameters and graph."""
    folder, _, _ = made(family)
    old = tmp_path / "hf4"
    old.mkdir()
    for f in folder.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    fm.as_transformers4(old)
    build(folder, tmp_path / "new.vkpack", progress=False)
    build(old, tmp_path / "old.vkpack", progress=False)
    with Engine(tmp_path / "new.vkpack") as new, Engine(tmp_path / "old.vkpack") as was:
        assert was.hp == new.hp
        assert was.archive.graph == new.archive.graph


@pytest.mark.parametrize("family, dtype", [
    *[(f, "F32") for f in FAMILIES],
    *[(f, "Q4_K") if f in ("llama", "gemma3", "phi3") else pytest.param(f, "Q4_K", marks=pytest.mark.slow)
      for f in FAMILIES],
    *[pytest.param(f, t, marks=pytest.mark.slow) for f in FAMILIES for t in ("F16", "BF16", "Q8_0")]])
def test_gguf_matches_transformers_on_the_same_weights(made, tmp_path, family, dtype):
    folder, model, ref = made(family)
    path = hf_to_gguf.write_gguf(folder, tmp_path / "m.gguf", dtype)
    if dtype != "F32":  # transformers on the weights as the GGUF rounded them
        cfg = json.loads((folder / "config.json").read_text())
        names = list(model.state_dict())
        state = hf_to_gguf.reference_state_dict(path, cfg, [n for n in names if n in _saved(folder)])
        model = fm.load_reference(folder)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=False)
        ref = _ref_logits(model)
    build(path, tmp_path / "m.vkpack", progress=False)
    assert _check_engine(tmp_path / "m.vkpack", ref) == _hf_greedy(model)


@pytest.mark.parametrize("family", _some(FAMILIES, ("gemma2", "gemma3", "olmo2", "phi3")))
def test_vulkan_matches_transformers(made, tmp_path, family):
    """The Vulkan backend (lavapipe here) on the HF archive: every position, 32 greedy tokens, resident and
    with a quarter of the model's bytes for weights (streamed)."""
    from vk_helpers import assert_device_peak_within

    from vkpack.runtime import vk

    ok, why = vk.available()
    if not ok:
        pytest.skip(f"no Vulkan: {why}")
    folder, model, ref = made(family)
    build(folder, tmp_path / "m.vkpack", progress=False)
    tokens = _check_engine(tmp_path / "m.vkpack", ref, device="vulkan")
    assert tokens == _hf_greedy(model)
    with Engine(tmp_path / "m.vkpack", device="vulkan") as eng:
        # a quarter of the weights' bytes, plus the backend's fixed reservations (staging), which a tiny
        # model does not dwarf as a real one does
        budget = (eng.model_bytes / 4 + eng.backend.reserved_bytes) / 2**30
    with Engine(tmp_path / "m.vkpack", device="vulkan", vram_gb=budget) as eng:
        eng.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True)
        assert list(eng.last_ids) == tokens
        assert eng.stats()["device_budget"] < eng.model_bytes / 2
        assert_device_peak_within(eng, budget)


@pytest.mark.parametrize("family", ["gemma2", pytest.param("phi3", marks=pytest.mark.slow)])
def test_native_backend_runs_the_new_ops(made, tmp_path, family):
    folder, _, ref = made(family)
    build(folder, tmp_path / "m.vkpack", progress=False)
    _check_engine(tmp_path / "m.vkpack", ref, device="cpu")


def _saved(folder) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            names |= set(st.keys())
    return names


@pytest.mark.parametrize("edit, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 2]}}, "'mrope_section'"),
    ({"rope_theta": 5.0}, "disagrees with rope_parameters"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"layer_types": ["linear_attention"] * 12}, "'linear_attention' is not supported"),
])
def test_config_values_vkpack_does_not_understand_are_errors(made, tmp_path, edit, message):
    """Never a silent default: a value the compiler cannot honour stops the build, naming it."""
    folder, _, _ = made("llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(edit)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match=message):
        build(bad, tmp_path / "bad.vkpack", progress=False)
    assert not (tmp_path / "bad.vkpack").exists()


@pytest.mark.parametrize("window,softcap", [(16, None), (1, None), (None, 2.0), (5, 1.5)])
def test_numpy_attention_window_and_softcap(window, softcap):
    """The reference backend's attention against a float64 loop: every query of a chunk that starts
    inside the cache (prefill continuing at pos0) and a single decode query."""
    from vk_helpers import attention_ref

    from vkpack.runtime.cpu import ops

    rng = np.random.default_rng(3)
    n_heads, n_kv, hd, n_ctx = 4, 2, 16, 64
    kc = rng.standard_normal((n_ctx, n_kv * hd)).astype(np.float32)
    vc = rng.standard_normal((n_ctx, n_kv * hd)).astype(np.float32)
    for pos0, T in ((20, 9), (40, 1), (0, 30)):
        q = rng.standard_normal((T, n_heads * hd)).astype(np.float32)
        got = ops.attention(q, kc, vc, pos0, n_heads, n_kv, hd, 0.3, softcap, window)
        ref = attention_ref(q, kc, vc, list(range(pos0, pos0 + T)), n_heads, n_kv, hd, 0.3, window or 0, softcap or 0.0)
        assert np.abs(got - ref).max() < 1e-5, (pos0, T)


def test_every_weight_type_runs_on_every_backend():
    """One list of the types the compiler accepts as weights, and every backend decodes each of them."""
    from vkpack.pack_format.constants import WEIGHT_DTYPES
    from vkpack.runtime.cpu.dequant import SUPPORTED
    from vkpack.runtime.native.loader import TYPES
    from vkpack.shaders.variants import WEIGHT_TYPES

    assert set(WEIGHT_DTYPES) == set(SUPPORTED) == set(TYPES) == set(WEIGHT_TYPES)


@pytest.mark.parametrize("ggml_type, message", [(16, "IQ2_XXS"), (41, "Q1_0"), (99, "unknown"), (26, "I32")])
def test_types_without_kernels_are_refused_at_build(tmp_path, ggml_type, message):
    """A GGUF weight in a type no backend runs: one error naming the tensor and the type, no archive."""
    import gguf

    from make_synthetic import add_gguf_tokenizer

    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_uint32("llama.block_count", 1)
    add_gguf_tokenizer(w, 300)
    w.add_tensor_info("token_embd.weight", (4, 16), np.dtype(np.float32), 256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 2 * 8   # n_dims, 2 dims
    data[at:at + 4] = ggml_type.to_bytes(4, "little")
    (tmp_path / "m.gguf").write_bytes(bytes(data) + bytes(4096))
    with pytest.raises(SourceError, match=f"token_embd.weight.*{message}"):
        build(tmp_path / "m.gguf", tmp_path / "m.vkpack", progress=False)
    assert not (tmp_path / "m.vkpack").exists()
