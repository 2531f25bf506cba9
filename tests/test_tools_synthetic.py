"""Tests for tools/make_synthetic.py: tiny models of every arch and format load back
with the right shapes, both formats hold the same model, output is deterministic,
and (where installed) HF transformers runs them and agrees GGUF == HF."""

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


@pytest.mark.parametrize("dtype", ms.DTYPES)
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
    tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2}[dtype]
    for t in defs:
        rt = got[t.gguf]
        assert tuple(int(x) for x in rt.shape) == tuple(reversed(t.shape)), t.gguf
        want_type = "F32" if len(t.shape) == 1 else dtype
        assert rt.tensor_type.name == want_type, t.gguf
        vals = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(t.shape)
        ref = _expected(t, seed=3, gguf_layout=True)
        np.testing.assert_allclose(vals, ref, rtol=tol, atol=tol * 0.05, err_msg=t.gguf)


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
        ms.write_hf(tmp_path / name, spec, "BF16", seed=5, shard_mb=0.05)
    ms.write_gguf(tmp_path / "c.gguf", spec, "Q8_0", seed=6)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert (tmp_path / "a.gguf").read_bytes() != (tmp_path / "c.gguf").read_bytes()
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
