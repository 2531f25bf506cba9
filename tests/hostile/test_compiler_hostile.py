"""Hostile model inputs to `vkpack build` (issue 15): each is refused with one line naming the
cause, exit code 2, no traceback and no output file; none is silently compiled into a wrong model.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_edits import edit_json, gguf_with, tiny_gguf, tiny_hf

from vkpack.compiler.build import build
from vkpack.compiler.sources.gguf_header import MAX_ARRAY, MAX_STRING, read_gguf_header
from vkpack.pack_format.errors import SourceError
from vkpack.pack_format.reader import Archive
from vkpack.runtime.cli import main


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seeds")
    return {"gguf": tiny_gguf(d / "tiny.gguf"), "hf": tiny_hf(d / "hf")}


def build_refused(capsys, src: Path, out_dir: Path, *words: str) -> str:
    """`vkpack build src` fails with exit 2 and one line holding every word; nothing is left behind."""
    out_dir.mkdir(exist_ok=True)
    code = main(["build", str(src), "-o", str(out_dir / "m.vkpack"), "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert not [p.name for p in out_dir.iterdir()], "an output or .partial file was left"
    return lines[0]


def _hf_copy(seeds: dict[str, Path], tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(seeds["hf"], tmp_path / "hf"))


# ---- GGUF hyperparameters: up front, naming the key ----
A = "llama."
GGUF_BAD_META = {
    "head_count 0 (was a division by zero)": ({A + "attention.head_count": 0}, "llama.attention.head_count"),
    "head_count_kv 0": ({A + "attention.head_count_kv": 0}, "llama.attention.head_count_kv"),
    "hidden 0": ({A + "embedding_length": 0}, "llama.embedding_length"),
    "head_count an array": ({A + "attention.head_count": [4, 4]}, "llama.attention.head_count"),
    "rope base 0": ({A + "rope.freq_base": 0.0}, "llama.rope.freq_base"),
    "rope base -1": ({A + "rope.freq_base": -1.0}, "llama.rope.freq_base"),
    "rope base nan": ({A + "rope.freq_base": float("nan")}, "llama.rope.freq_base"),
    "rope base inf (was an OverflowError)": ({A + "rope.freq_base": float("inf")}, "llama.rope.freq_base"),
    "eps 0": ({A + "attention.layer_norm_rms_epsilon": 0.0}, "epsilon"),
    "eps negative": ({A + "attention.layer_norm_rms_epsilon": -1e-5}, "epsilon"),
    "context 0": ({A + "context_length": 0}, "llama.context_length"),
    "vocab 0": ({A + "vocab_size": 0}, "llama.vocab_size"),
    "vocab larger than the embedding": ({A + "vocab_size": 385}, "[vocab, hidden]"),
    "heads not dividing": ({A + "attention.head_count_kv": 3}, "n_kv_heads"),
    "rope dims over head_dim": ({A + "rope.dimension_count": 32}, "rope_dim"),
    "rope dims odd": ({A + "rope.dimension_count": 15}, "rope_dim"),
    "block_count -1 (i32)": ({A + "block_count": -1}, "llama.block_count"),
    "block_count smaller than the tensors (was: 1 of 2 layers ran)": ({A + "block_count": 1}, "n_layers", "layers 0-1"),
    "block_count 0 (was: a model with no layers)": ({A + "block_count": 0}, "llama.block_count"),
    "block_count 2**32 (was: a 2**32-step graph)": ({A + "block_count": 2**32}, "n_layers", "layers 0-1"),
    "ffn disagrees with the tensors": ({A + "feed_forward_length": 256}, "ffn_gate"),
    "hidden disagrees with the tensors": ({A + "embedding_length": 128}, "hidden"),
}


@pytest.mark.parametrize("case", list(GGUF_BAD_META))
def test_gguf_bad_hyperparameters(capsys, tmp_path, seeds, case):
    meta, *words = GGUF_BAD_META[case]
    src = gguf_with(seeds["gguf"], tmp_path / "bad.gguf", meta=meta)
    t0 = time.monotonic()
    build_refused(capsys, src, tmp_path / "out", *words)
    assert time.monotonic() - t0 < 10


def test_gguf_missing_block_count(capsys, tmp_path, seeds):
    src = gguf_with(seeds["gguf"], tmp_path / "bad.gguf", drop=(A + "block_count",))
    build_refused(capsys, src, tmp_path / "out", "llama.block_count")


# ---- GGUF tensor table ----
def test_gguf_misaligned_tensor_offset(capsys, tmp_path, seeds):
    def shift(infos):
        name, tid, ne, off = infos[0]
        infos[0] = (name, tid, ne, off + 1)
        return infos
    src = gguf_with(seeds["gguf"], tmp_path / "bad.gguf", infos=shift)
    build_refused(capsys, src, tmp_path / "out", "not a multiple of the alignment 32")


def test_gguf_overlapping_tensors(capsys, tmp_path, seeds):
    # two tensors of the same shape on the same bytes: built and ran on garbage before
    def overlap(infos):
        a = next(i for i, t in enumerate(infos) if t[0] == "blk.0.ffn_up.weight")
        b = next(i for i, t in enumerate(infos) if t[0] == "blk.0.ffn_gate.weight")
        infos[a] = (*infos[a][:3], infos[b][3])
        return infos
    src = gguf_with(seeds["gguf"], tmp_path / "bad.gguf", infos=overlap)
    build_refused(capsys, src, tmp_path / "out", "overlap")


def test_gguf_missing_layer_tensor(capsys, tmp_path, seeds):
    src = gguf_with(seeds["gguf"], tmp_path / "bad.gguf", infos=lambda t: [x for x in t if x[0] != "blk.1.ffn_up.weight"])
    build_refused(capsys, src, tmp_path / "out", "blk.1.ffn_up.weight")


# ---- GGUF header: no unbounded allocation, refused within seconds ----
def _header_only(path: Path, kv: bytes, n_kv: int = 1) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kv)
    return path


def _gguf_str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def test_gguf_huge_string_is_refused_without_reading_it(tmp_path):
    # a 6 GB string made the old reader grow its buffer to the file size; a sparse file of that size
    p = tmp_path / "huge-string.gguf"
    _header_only(p, _gguf_str(b"k") + struct.pack("<IQ", 8, 6 << 30))
    with open(p, "r+b") as f:
        f.truncate((6 << 30) + 200)
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=f"string of {6 << 30} bytes exceeds the cap {MAX_STRING}"):
        read_gguf_header(p)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("etype,count", [(4, 3_500_000_000), (8, 1 << 28), (5, MAX_ARRAY + 1)])
def test_gguf_huge_array_is_refused_before_building_it(tmp_path, etype, count):
    # a 3.5G-element u32 array went through .tolist(); 2**28 empty strings made 268M Python strings
    p = tmp_path / "huge-array.gguf"
    _header_only(p, _gguf_str(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, etype, count))
    with open(p, "r+b") as f:
        f.truncate(count * (8 if etype == 8 else 4) + 200)
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=f"array of {count} elements exceeds the cap {MAX_ARRAY}"):
        read_gguf_header(p)
    assert time.monotonic() - t0 < 5


def test_gguf_tokenizer_array_of_wrong_type(capsys, tmp_path, seeds):
    src = gguf_with(seeds["gguf"], tmp_path / "bad.gguf", meta={"tokenizer.ggml.tokens": [1, 2, 3]})
    build_refused(capsys, src, tmp_path / "out", "tokenizer.ggml.tokens")


# ---- HF config.json and safetensors headers ----
HF_BAD_CONFIG = {
    "heads 0": (lambda c: c.update(num_attention_heads=0), "num_attention_heads"),
    "hidden 0": (lambda c: c.update(hidden_size=0), "hidden_size"),
    "layers 10**9 (was: a billion-step graph)": (lambda c: c.update(num_hidden_layers=10**9), "n_layers", "layers 0-1"),
    "layers 10**29": (lambda c: c.update(num_hidden_layers=10**29), "num_hidden_layers"),
    "layers 1 of 2": (lambda c: c.update(num_hidden_layers=1), "n_layers"),
    "layers negative": (lambda c: c.update(num_hidden_layers=-2), "num_hidden_layers"),
    "heads a string": (lambda c: c.update(num_attention_heads="4"), "num_attention_heads"),
    "eps 0": (lambda c: c.update(rms_norm_eps=0), "rms_norm_eps"),
    "theta a list": (lambda c: c.update(rope_theta=[1]), "rope_theta"),
    "architectures 5 (was an AttributeError)": (lambda c: c.update(architectures=5), "architectures"),
    "architectures [5]": (lambda c: c.update(architectures=[5]), "architectures"),
    "rope_scaling a list": (lambda c: c.update(rope_scaling=[1]), "rope_scaling"),
    "rope_scaling factor 0": (lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 0}), "factor"),
    "llama3 scaling, equal freq factors (was a division by zero)": (
        lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 1.0, "original_max_position_embeddings": 64}),
        "low_freq_factor"),
    "vocab disagrees with the embedding": (lambda c: c.update(vocab_size=400), "[vocab, hidden]"),
}


@pytest.mark.parametrize("case", list(HF_BAD_CONFIG))
def test_hf_bad_config(capsys, tmp_path, seeds, case):
    edit, *words = HF_BAD_CONFIG[case]
    folder = _hf_copy(seeds, tmp_path)
    edit_json(folder / "config.json", edit)
    build_refused(capsys, folder, tmp_path / "out", *words)


@pytest.mark.parametrize("literal", ["1e400", "Infinity", "NaN", "1" * 5001])
def test_hf_config_numbers_json_cannot_hold(capsys, tmp_path, seeds, literal):
    # inf overflowed int(); a 5001-digit integer raised ValueError from json itself
    folder = _hf_copy(seeds, tmp_path)
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_attention_heads": 4', f'"num_attention_heads": {literal}'))
    build_refused(capsys, folder, tmp_path / "out", "config.json")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "tokenizer.json"])
def test_hf_deeply_nested_json(capsys, tmp_path, seeds, name):
    folder = _hf_copy(seeds, tmp_path)
    (folder / name).write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    build_refused(capsys, folder, tmp_path / "out", name)


SAFETENSORS_BAD = {
    "dtype a list (was TypeError: unhashable)": (lambda e: e.update(dtype=["F16"]), "dtype"),
    "shape a string": (lambda e: e.update(shape="64"), "shape"),
    "shape with a float": (lambda e: e.update(shape=[64.0]), "shape"),
    "shape 10**29": (lambda e: e.update(shape=[10**29]), "needs"),
    "offsets a map": (lambda e: e.update(data_offsets={"a": 1}), "data_offsets"),
    "offsets negative": (lambda e: e.update(data_offsets=[-2, 0]), "data_offsets"),
    "entry a list": (None, "not an object"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_BAD))
def test_safetensors_header_wrong_types(capsys, tmp_path, seeds, case):
    edit, word = SAFETENSORS_BAD[case]
    folder = _hf_copy(seeds, tmp_path)
    st = folder / "model.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = "model.norm.weight"
    if edit is None:
        header[name] = [1, 2]
    else:
        edit(header[name])
    hb = json.dumps(header).encode()
    st.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    build_refused(capsys, folder, tmp_path / "out", word)


def test_safetensors_header_deeply_nested(capsys, tmp_path, seeds):
    folder = _hf_copy(seeds, tmp_path)
    st = folder / "model.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    hb = json.dumps(json.loads(raw[8:8 + n])).encode()[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    st.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    build_refused(capsys, folder, tmp_path / "out", "not valid JSON")


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"a": 5}, "x"])
def test_sharded_index_weight_map_of_wrong_type(capsys, tmp_path, seeds, weight_map):
    folder = _hf_copy(seeds, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    build_refused(capsys, folder, tmp_path / "out", "weight_map")


@pytest.mark.parametrize("key", ["bos_token_id", "eos_token_id", "pad_token_id"])
def test_special_token_ids_beyond_the_tokenizer_are_dropped(tmp_path, seeds, key):
    # an id of 2**40 in generation_config.json reached the tokenizers library (OverflowError at 2**32)
    folder = _hf_copy(seeds, tmp_path)
    (folder / "generation_config.json").write_text(json.dumps({key: 2**40}))
    build(folder, tmp_path / "m.vkpack", progress=False, threads=1)
    with Archive(tmp_path / "m.vkpack") as a:
        tok = a.tokenizer
    assert 2**40 not in [tok["bos_id"], tok["eos_id"], tok["pad_id"], *tok["eos_ids"]]


# ---- the compiler checks what it writes ----
def test_compiler_runs_the_readers_validation_before_finishing(capsys, tmp_path, seeds, monkeypatch):
    # a family bug that emits a graph the reader rejects must fail the build, not write the archive
    import vkpack.compiler.build as b

    real = b.attach_packs

    def broken(graph, plan):
        g = real(graph, plan)
        g["kv_cache"]["n_layers"] = 7  # more cache layers than attention ops
        return g

    monkeypatch.setattr(b, "attach_packs", broken)
    line = build_refused(capsys, seeds["gguf"], tmp_path / "out", "would be invalid", "kv_cache.n_layers")
    assert "7" in line


# ---- not a regular file ----
@pytest.mark.parametrize("victim", ["model.gguf", "config.json", "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json"])
def test_fifo_inputs_are_refused_not_waited_on(tmp_path, seeds, victim):
    import shutil

    if victim == "model.gguf":
        src = tmp_path / "model.gguf"
        os.mkfifo(src)
    else:
        src = Path(shutil.copytree(seeds["hf"], tmp_path / "hf"))
        (src / victim).unlink()
        os.mkfifo(src / victim)
    result: dict[str, int] = {}
    th = threading.Thread(target=lambda: result.setdefault("code", main(["build", str(src), "-o",
                                                                          str(tmp_path / "m.vkpack")])), daemon=True)
    th.start()
    th.join(20)
    if th.is_alive():  # unblock the stuck open() so the thread can end, then fail
        with open(src / victim if victim != "model.gguf" else src, "wb"):
            pass
        pytest.fail("build blocked on a FIFO")
    assert result["code"] == 2
