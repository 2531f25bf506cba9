"""Tests for tools/make_synthetic.py: tiny models of every arch and format load back
with the right shapes, both formats hold the same model, output is deterministic,
and (where installed) HF transformers runs them and agrees GGUF == HF. Every quantized
GGUF type (and llama.cpp's Q4_K_M mix) reads back with gguf-py and runs in vkpack."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.runtime.engine import Engine

ARCHS = ("llama", "qwen2", "qwen3")
TOOL = Path(ms.__file__)
TEXT = "Hello, world! The robot <|im_start|>user\npaints 42 times: ünïcödé 😀<|im_end|>"


def _expected(t: ms.TensorDef, seed: int, std: float = 0.02, gguf_layout: bool = False) -> np.ndarray:
    blocks = ms._gguf_blocks if gguf_layout else ms._blocks
    return np.concatenate(list(blocks(t, seed, std)))


def _gguf_field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


def _load_hf(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(f, "np") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118  (a safetensors handle, not a dict)
    return out


def _hf_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for f in folder.glob("model*.safetensors"):
        with safe_open(f, "np") as st:
            names.update(st.keys())
    return names


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """F32 GGUF + F32 HF folder of every tiny arch, seed 7 (shared by the equality tests).

    std 0.1, not 0.02, so attention is far from uniform: a wrong Q/K permutation then moves
    the logits by ~1.5 instead of ~5e-3, far outside the 1e-4 tolerance.
    """
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for arch in ARCHS:
        spec = dataclasses.replace(ms.Spec.tiny(arch), std=0.1)
        out[f"{arch}.gguf"] = ms.write_gguf(root / f"{arch}.gguf", spec, "F32", seed=7)
        out[f"{arch}.hf"] = ms.write_hf(root / f"{arch}-hf", spec, "F32", seed=7)
    return out


# ---- GGUF ----


# Quantized from the f32 weights: max error per 32-block. Q4_1/Q5_1 round to nearest (half a step);
# Q4_0/Q5_0 put the max-|x| value at code 0, so the far side clips at 7 (15) steps: up to a full
# step. Plus a margin for the f16 rounding of the block's scale and min.
ERR_BOUND = {"Q4_0": lambda b: 1.05 * np.abs(b).max(1) / 8, "Q5_0": lambda b: 1.05 * np.abs(b).max(1) / 16,
             "Q4_1": lambda b: 0.6 * np.ptp(b, 1) / 15, "Q5_1": lambda b: 0.6 * np.ptp(b, 1) / 31}


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "Q8_0", *ERR_BOUND])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_reads_back(tmp_path, arch, dtype):
    spec = ms.Spec.tiny(arch)
    path = ms.write_gguf(tmp_path / "m.gguf", spec, dtype, seed=3)
    r = gguf.GGUFReader(path)
    a = arch
    assert _gguf_field(r, "general.architecture") == arch
    assert _gguf_field(r, f"{a}.block_count") == spec.layers
    assert _gguf_field(r, f"{a}.context_length") == spec.context
    assert _gguf_field(r, f"{a}.embedding_length") == spec.hidden
    assert _gguf_field(r, f"{a}.feed_forward_length") == spec.ffn
    assert _gguf_field(r, f"{a}.attention.head_count") == spec.heads
    assert _gguf_field(r, f"{a}.attention.head_count_kv") == spec.kv_heads
    assert _gguf_field(r, f"{a}.vocab_size") == spec.vocab
    assert _gguf_field(r, f"{a}.rope.freq_base") == pytest.approx(spec.theta)
    assert _gguf_field(r, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(spec.eps)
    if arch == "qwen3":
        assert _gguf_field(r, f"{a}.attention.key_length") == spec.hd
        assert _gguf_field(r, f"{a}.attention.value_length") == spec.hd
    # tokenizer
    tokens = _gguf_field(r, "tokenizer.ggml.tokens")
    types = _gguf_field(r, "tokenizer.ggml.token_type")
    assert _gguf_field(r, "tokenizer.ggml.model") == "gpt2"
    assert len(tokens) == len(types) == spec.vocab
    assert tokens[:3] == list(ms.SPECIALS) and types[:3] == [3, 3, 3] and set(types[3:]) == {1}
    assert len(_gguf_field(r, "tokenizer.ggml.merges")) == spec.vocab - ms.MIN_VOCAB
    assert tokens[_gguf_field(r, "tokenizer.ggml.bos_token_id")] == "<|im_start|>"
    assert tokens[_gguf_field(r, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert "<|im_start|>" in _gguf_field(r, "tokenizer.chat_template")
    # tensors: names, GGUF shapes (reversed), types, and values
    got = {t.name: t for t in r.tensors}
    defs = spec.tensors()
    assert list(got) == [t.gguf for t in defs]
    assert _gguf_field(r, "general.file_type") == ms.FILE_TYPES[dtype]
    tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2}.get(dtype)
    for t in defs:
        rt = got[t.gguf]
        assert tuple(int(x) for x in rt.shape) == tuple(reversed(t.shape)), t.gguf
        want_type = "F32" if len(t.shape) == 1 else dtype
        assert rt.tensor_type.name == want_type, t.gguf
        vals = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(t.shape)
        ref = _expected(t, seed=3, gguf_layout=True)
        if tol is not None or len(t.shape) == 1:
            np.testing.assert_allclose(vals, ref, rtol=tol or 0, atol=(tol or 0) * 0.05, err_msg=t.gguf)
        else:
            blocks = ref.reshape(-1, 32)
            err = np.abs(vals.reshape(-1, 32) - blocks).max(1)
            assert (err <= ERR_BOUND[dtype](blocks)).all(), t.gguf


# ---- quantized GGUF types: random K-quant blocks, llama.cpp's Q4_K_M mix, fallbacks ----

NEW_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")
# Every row a whole number of 256-blocks, so no tensor falls back.
QSPEC = ms.Spec(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=512)


def _want_type(name: str, dtype: str, tied: bool) -> str:
    """The intended type of a 2-D tensor of a 2-layer model, stated independently of make_synthetic:
    for 2 layers llama.cpp's use_more_bits picks layer 1 only (1 >= 7*2//8)."""
    if dtype != "Q4_K_M":
        return dtype
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q6_K"
    return "Q6_K" if name in ("blk.1.attn_v.weight", "blk.1.ffn_down.weight") else "Q4_K"


def _check_quantized(path: Path, spec: ms.Spec, dtype: str, tmp_path: Path) -> None:
    """Types as intended; gguf-py dequantizes each 2-D tensor to finite values of ~spec.std;
    vkpack builds the file and its numpy engine gives finite logits."""
    assert spec.layers == 2
    r = gguf.GGUFReader(path)
    assert _gguf_field(r, "general.file_type") == int(ms.FILE_TYPES[dtype])
    assert [t.name for t in r.tensors] == [t.gguf for t in spec.tensors()]
    for rt in r.tensors:
        if len(rt.shape) == 1:
            assert rt.tensor_type.name == "F32", rt.name
            continue
        assert rt.tensor_type.name == _want_type(rt.name, dtype, spec.tied), rt.name
        vals = gguf.quants.dequantize(rt.data, rt.tensor_type)
        assert vals.shape == tuple(int(x) for x in reversed(rt.shape)), rt.name
        assert np.isfinite(vals).all(), rt.name
        assert spec.std / 2 < vals.std() < spec.std * 2, (rt.name, vals.std())
        assert abs(vals.mean()) < 0.15 * spec.std, (rt.name, vals.mean())
    build(path, tmp_path / "m.vkpack", progress=False)
    with Engine(tmp_path / "m.vkpack", device="numpy") as eng:
        logits = eng.logits(eng.encode("hello"))
    assert logits.shape == (spec.vocab,) and np.isfinite(logits).all()


@pytest.mark.parametrize("dtype", NEW_QUANTS)
def test_quantized_gguf_reads_back_and_runs(tmp_path, dtype):
    path = ms.write_gguf(tmp_path / "m.gguf", QSPEC, dtype, seed=4)
    _check_quantized(path, QSPEC, dtype, tmp_path)


def test_q4_k_m_tied_qwen2(tmp_path):
    """Tied: token_embd is also the output, so llama.cpp gives it the output's Q6_K."""
    spec = dataclasses.replace(QSPEC, arch="qwen2", tied=True, std=0.05)
    path = ms.write_gguf(tmp_path / "m.gguf", spec, "Q4_K_M", seed=2)
    _check_quantized(path, spec, "Q4_K_M", tmp_path)


def test_q4_k_m_use_more_bits():
    """32 layers: llama.cpp's Q4_K_M gives attn_v/ffn_down Q6_K in layers 0-3, 28-31 and every
    third layer from 6 (i.e. half of them)."""
    spec = dataclasses.replace(QSPEC, layers=32)
    types = ms.gguf_types(spec.tensors(), "Q4_K_M")
    q6 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for name in ("attn_v", "ffn_down"):
        assert [i for i in range(32) if types[f"blk.{i}.{name}.weight"] == gguf.GGMLQuantizationType.Q6_K] == q6
    rest = {v.name for k, v in types.items() if not k.endswith(("attn_v.weight", "ffn_down.weight"))}
    assert rest == {"F32", "Q4_K", "Q6_K"}
    assert (types["output.weight"].name, types["token_embd.weight"].name) == ("Q6_K", "Q4_K")
    big = ms.Spec.llama_1b().with_target_gb(1.0, "Q4_K_M")
    assert abs(ms._nbytes(big.tensors(), "Q4_K_M") - 1e9) < 0.05e9


@pytest.mark.parametrize("dtype, want", [
    ("Q2_K", "Q4_0"), ("Q3_K", "Q4_0"), ("Q4_K", "Q5_0"), ("Q5_K", "Q5_1"), ("Q6_K", "Q8_0"),
    ("Q4_0", "Q4_0"), ("Q8_0", "Q8_0")])
def test_row_fallback(tmp_path, caplog, dtype, want):
    """Rows of 64 are no whole 256-block: llama.cpp's fallback (Q4_0 for its IQ4_NL); rows of
    48 are no whole 32-block either: F16."""
    spec = ms.Spec(hidden=64, ffn=48, heads=4, kv_heads=2)  # ffn_down rows: 48
    path = ms.write_gguf(tmp_path / "m.gguf", spec, dtype, seed=1)
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
    assert got.pop("blk.0.ffn_down.weight") == got.pop("blk.1.ffn_down.weight") == "F16"
    assert set(got.values()) == {want}
    assert "blk.0.ffn_down.weight" in caplog.text  # the fallback is logged
    mix = ms.gguf_types(dataclasses.replace(spec, tied=True).tensors(), "Q4_K_M")
    assert mix["token_embd.weight"].name == "Q8_0"  # llama.cpp's output rule: Q8_0 if not whole 256-blocks
    assert mix["blk.0.attn_q.weight"].name == "Q5_0"


def test_k_quant_scales():
    """d, dmin: finite positive halves; values mean ~0, std ~spec.std on a bigger tensor."""
    t = ms.TensorDef("w", "w", (512, 1024))
    for name, (d_off, m_off, *_) in ms._K_LAYOUT.items():
        b = ms._random_k_blocks(t, name, seed=0, std=0.02, k=0, rows=512)
        for off in (d_off, m_off):
            if off is not None:
                h = b[:, off:off + 2].copy().view("<f2").astype(np.float32)
                assert np.isfinite(h).all() and (h > 0).all(), name
        vals = gguf.quants.dequantize(b, name)
        assert abs(vals.std() - 0.02) < 0.001 and abs(vals.mean()) < 0.0005, name
        assert np.array_equal(b, ms._random_k_blocks(t, name, seed=0, std=0.02, k=0, rows=512))


# ---- HF folder ----


@pytest.mark.parametrize("shard_mb", [None, 0.05])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_reads_back(tmp_path, arch, dtype, shard_mb):
    spec = ms.Spec.tiny(arch)
    folder = ms.write_hf(tmp_path / "hf", spec, dtype, seed=3, shard_mb=shard_mb)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == [ms.ARCHS[arch][0]] and cfg["model_type"] == arch
    assert cfg["torch_dtype"] == ms.HF_DTYPES[dtype]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (
        spec.layers, spec.hidden, spec.ffn)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        spec.heads, spec.kv_heads, spec.hd)
    shards = sorted(folder.glob("model*.safetensors"))
    if shard_mb:
        assert len(shards) > 1 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == {t.hf for t in spec.tensors()}
        assert set(index["weight_map"].values()) == {s.name for s in shards}
    else:
        assert [s.name for s in shards] == ["model.safetensors"]
    names = set()
    for s in shards:
        with safe_open(s, "np") as st:  # metadata only, so BF16 needs no torch
            for k in st.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                names.add(k)
                assert tuple(st.get_slice(k).get_shape()) == next(
                    t.shape for t in spec.tensors() if t.hf == k)
                assert st.get_slice(k).get_dtype() == dtype
    want = {t.hf for t in spec.tensors()}
    assert names == want
    assert ("model.layers.0.self_attn.q_proj.bias" in want) == (arch == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in want) == (arch == "qwen3")
    assert "lm_head.weight" in want and not cfg["tie_word_embeddings"]


def test_hf_tokenizer(built):
    folder = built["llama.hf"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cfg = json.loads((folder / "config.json").read_text())
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok.get_vocab_size() == cfg["vocab_size"]
    enc = tok.encode(TEXT)
    assert tok.decode(enc.ids, skip_special_tokens=False) == TEXT
    assert 1 in enc.ids and 2 in enc.ids  # specials stay single tokens
    assert len(enc.ids) < len(TEXT.encode())  # merges apply
    assert (tcfg["bos_token"], tcfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tcfg["chat_template"]
    gguf_tokens = _gguf_field(gguf.GGUFReader(built["llama.gguf"]), "tokenizer.ggml.tokens")
    assert gguf_tokens == [tok.id_to_token(i) for i in range(tok.get_vocab_size())]


def test_vocab_padding(tmp_path):
    tokens, merges = ms.build_vocab(49152)
    assert len(tokens) == len(set(tokens)) == 49152
    rank = {t: i for i, t in enumerate(tokens)}
    assert all(rank[a] < rank[a + b] and rank[b] < rank[a + b] for a, b in merges)
    folder = ms.write_hf(tmp_path / "hf", ms.Spec(vocab=1000), "F16")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() == json.loads((folder / "config.json").read_text())["vocab_size"] == 1000
    assert tok.decode(tok.encode(TEXT).ids, skip_special_tokens=False) == TEXT


# ---- same model, determinism, sizes ----


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_and_hf_are_the_same_model(built, arch):
    hf = _load_hf(built[f"{arch}.hf"])
    r = gguf.GGUFReader(built[f"{arch}.gguf"])
    g = {t.name: np.array(t.data).reshape(tuple(reversed([int(x) for x in t.shape]))) for t in r.tensors}
    spec = ms.Spec.tiny(arch)
    for t in spec.tensors():
        w = hf[t.hf]
        if t.permute:  # llama Q/K: llama.cpp convert_hf_to_gguf LlamaModel.permute
            rows, n = w.shape[0], t.permute
            w = w.reshape(n, 2, rows // n // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
            assert not np.array_equal(w, hf[t.hf])
        np.testing.assert_array_equal(g[t.gguf], w, err_msg=t.gguf)


def test_deterministic(tmp_path):
    spec = ms.Spec.tiny("qwen2")
    for name in ("a", "b"):
        ms.write_gguf(tmp_path / f"{name}.gguf", spec, "Q8_0", seed=5)
        ms.write_gguf(tmp_path / f"{name}.k.gguf", QSPEC, "Q4_K_M", seed=5)
        ms.write_hf(tmp_path / name, spec, "BF16", seed=5, shard_mb=0.05)
    ms.write_gguf(tmp_path / "c.gguf", spec, "Q8_0", seed=6)
    ms.write_gguf(tmp_path / "c.k.gguf", QSPEC, "Q4_K_M", seed=6)
    for ext in (".gguf", ".k.gguf"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()
        assert (tmp_path / f"a{ext}").read_bytes() != (tmp_path / f"c{ext}").read_bytes()
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_rewrite_removes_stale_shards(tmp_path):
    spec = ms.Spec.tiny()
    ms.write_hf(tmp_path, spec, "F32", shard_mb=0.05)
    ms.write_hf(tmp_path, spec, "F32")
    assert [p.name for p in tmp_path.glob("model*")] == ["model.safetensors"]


def test_presets_and_target_gb():
    one, eight = ms.Spec.llama_1b(), ms.Spec.llama_8b()
    assert (one.layers, one.hidden, one.heads, one.kv_heads, one.ffn, one.vocab) == (
        16, 2048, 32, 8, 8192, 49152)
    assert (eight.layers, eight.hidden, eight.heads, eight.kv_heads, eight.ffn, eight.vocab) == (
        32, 4096, 32, 8, 14336, 49152)
    spec = one.with_target_gb(2.0, "F16")
    assert abs(ms._nbytes(spec.tensors(), "F16") - 2e9) < 0.1e9
    assert 7.5e9 < ms._nbytes(eight.tensors(), "Q8_0") < 8.5e9  # 7.4B params
    with pytest.raises(ValueError, match="kv_heads"):
        ms.Spec(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="arch"):
        ms.Spec(arch="gpt2")


def test_cli(tmp_path, capsys):
    assert ms.main(["--arch", "qwen3", "--format", "hf", "--dtype", "BF16", "--layers", "1",
                    "--vocab", "300", "--tied", "-o", str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (1, 300, True)
    names = _hf_names(tmp_path / "hf")
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert ms.main(["--dtype", "Q8_0", "--head-dim", "32", "--seed", "1",
                    "-o", str(tmp_path / "m.gguf")]) == 0
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert _gguf_field(r, "llama.attention.key_length") == 32
    assert ms.main(["--format", "hf", "--dtype", "Q8_0", "-o", str(tmp_path / "x")]) == 2
    assert ms.main(["--format", "hf", "--dtype", "Q4_K_M", "-o", str(tmp_path / "x")]) == 2
    assert ms.main(["--dtype", "Q4_K_M", "--hidden", "256", "--ffn", "512", "--vocab", "512",
                    "-o", str(tmp_path / "k.gguf")]) == 0
    r = gguf.GGUFReader(tmp_path / "k.gguf")
    assert _gguf_field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M) == 15
    assert {t.tensor_type.name for t in r.tensors} == {"F32", "Q4_K", "Q6_K"}
    assert str(tmp_path / "m.gguf") in capsys.readouterr().out


# ---- HF transformers as the independent reference ----


@pytest.fixture(scope="module")
def transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


IDS = [1, 50, 300, 7, 2, 100, 383, 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_runs_hf_folder(transformers, built, arch):
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(built[f"{arch}.hf"], dtype=torch.float32)
    out = _logits(model, IDS)
    assert out.shape == (len(IDS), ms.Spec.tiny(arch).vocab) and np.isfinite(out).all()
    tok = transformers.AutoTokenizer.from_pretrained(built[f"{arch}.hf"])
    assert tok.decode(tok(TEXT).input_ids) == TEXT


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # transformers ignores qwen3 key_length in GGUF
def test_transformers_gguf_matches_hf(transformers, built, arch):
    """transformers un-permutes llama Q/K when loading GGUF, so equal logits prove our permutation."""
    import torch

    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    path = built[f"{arch}.gguf"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(built[f"{arch}.hf"], dtype=torch.float32)
    gg = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32)
    np.testing.assert_allclose(_logits(gg, IDS), _logits(hf, IDS), atol=1e-4, rtol=0)


# ---- scale ----


def _peak_rss_mb(args: list[str]) -> float:
    """Run the writer in a fresh parent whose only child is the writer; return the child's peak RSS."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, str(TOOL), *args],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) / 1024  # ru_maxrss is KiB on Linux


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "hf"])
def test_2gb_write_streams(tmp_path, fmt):
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "hf")
    args = ["--preset", "llama_1b", "--target-gb", "2", "--dtype", "F16", "--format", fmt,
            "-o", str(out)]
    if fmt == "hf":
        args += ["--shard-mb", "500"]
    peak = _peak_rss_mb(args)
    size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.iterdir()))
    assert size > 1.9e9
    assert peak < 512, f"writer peak RSS {peak:.0f} MiB for a {size / 1e9:.2f} GB model"
