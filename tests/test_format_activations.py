"""Activation widths (format 1.1): the compiler writes `graph.activations`, readers of 1.0 archives
infer the same map, and the inference rejects graphs whose widths disagree (pack_format/shapes.py).

Hostile `activations` maps (wrong width, missing name, non-int) are among test_format_hostile's
INDEX_CASES, next to the other index rules.
"""

from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.pack_format.constants import FORMAT_MAJOR, FORMAT_MINOR, HEADER_STRUCT
from vkpack.pack_format.errors import FormatError
from vkpack.pack_format.reader import Archive
from vkpack.pack_format.shapes import activation_widths

sys.path.insert(0, str(Path(__file__).resolve().parent / "hostile"))
from tiny_archive import E, V, index_blob, op, with_index, write_archive

# The tiny archive as format 1.0 wrote it (the 1.0 golden digest of tests/test_format.py).
GOLDEN_1_0_SHA256 = "d58752f3a4080f828a6825f267236314bc40b6975b776311052bf5b4950c9f72"


def _as_1_0(data: bytes) -> bytes:
    """The archive as a 1.0 writer would have written it: minor 0 in header and index, no `activations`."""
    index = _index_of(data)
    index["format"] = [FORMAT_MAJOR, 0]
    del index["graph"]["activations"]
    data = with_index(data, index)
    magic, major, _minor, flags, hsize, align = HEADER_STRUCT.unpack_from(data, 0)
    return HEADER_STRUCT.pack(magic, major, 0, flags, hsize, align) + data[HEADER_STRUCT.size:]


def _index_of(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(index_blob(data)[0], raw=False)


# ---- the compiler writes the map, equal to the inference ----
@pytest.mark.parametrize("source", ["gguf", "hf"])
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)])
def test_compiler_writes_activations(tmp_path, arch, tied, source):
    # head_dim 24 keeps H·D (96) and K·D (48) apart from the hidden width (64)
    spec = ms.Spec(arch=arch, tied=tied, hidden=64, heads=4, kv_heads=2, head_dim=24, ffn=160, vocab=384)
    src = (ms.write_gguf(tmp_path / "m.gguf", spec, dtype="F16", seed=1) if source == "gguf"
           else ms.write_hf(tmp_path / "m", spec, dtype="F32", seed=1))
    out = tmp_path / "m.vkpack"
    build(src, out, progress=False)
    with Archive(out) as a:
        assert a.version == (FORMAT_MAJOR, FORMAT_MINOR) == (1, 3)
        assert a.index["format"] == [1, 3]
        acts = a.graph["activations"]
        assert acts == activation_widths(a.graph, a.tensors)
        assert acts == {"x": 64, "h": 64, "q": 96, "k": 48, "v": 48, "o": 96, "a": 64, "g": 160, "u": 160,
                        "m": 160, "logits": 384}
        assert a.activation_widths == acts
        written = {o["out"] for s in a.graph["steps"] for o in s["ops"]}
        assert set(acts) == written


# ---- 1.0 archives keep working ----
def test_1_0_archive_opens_and_infers_the_same_widths(tmp_path):
    p11 = tmp_path / "tiny11.vkpack"
    write_archive(p11, codecs=("none", "none"))
    data10 = _as_1_0(p11.read_bytes())
    # the rewritten bytes are exactly what the 1.0 writer produced: 1.1 changed nothing else
    assert hashlib.sha256(data10).hexdigest() == GOLDEN_1_0_SHA256
    p10 = tmp_path / "tiny10.vkpack"
    p10.write_bytes(data10)
    with Archive(p11) as a11, Archive(p10) as a10:
        assert a10.version == (1, 0) and a11.version == (1, FORMAT_MINOR)
        assert "activations" not in a10.graph
        assert a10.activation_widths == a11.activation_widths == {"x": E, "q": E, "k": E, "o": E, "h": E,
                                                                   "logits": V}
        assert a10.activation_widths is a10.activation_widths  # computed once


def test_1_0_compiled_archive_infers_what_1_1_states(tmp_path):
    spec = ms.Spec(arch="qwen3", hidden=64, heads=4, kv_heads=2, head_dim=24, ffn=160)
    out = tmp_path / "m.vkpack"
    build(ms.write_gguf(tmp_path / "m.gguf", spec, dtype="Q8_0", seed=2), out, progress=False)
    data = out.read_bytes()
    old = tmp_path / "old.vkpack"
    old.write_bytes(_as_1_0(data))
    with Archive(out) as new, Archive(old) as a10:
        assert a10.version == (1, 0) and "activations" not in a10.graph
        assert a10.activation_widths == new.graph["activations"]


def test_1_0_archive_with_disagreeing_widths_opens_but_has_no_widths(tmp_path):
    # 1.0 readers never checked widths, so such a file still opens; asking for its widths fails cleanly
    def mutate(index):
        index["format"] = [1, 0]
        del index["graph"]["activations"]
        index["graph"]["steps"][2]["ops"].append(op("add", ["h", "logits"], "y"))

    p = tmp_path / "bad10.vkpack"
    write_archive(p, mutate=mutate)
    msg = r"steps\[2\] 'head' ops\[3\] \(add\): inputs 'h' and 'logits' widths: 64 != 16"
    with Archive(p) as a, pytest.raises(FormatError, match=msg):
        a.activation_widths  # noqa: B018  (the property raises)


# ---- the inference, op by op ----
class T:
    def __init__(self, *shape: int):
        self.shape = shape


TENSORS = {"emb": T(10, 8), "w": T(12, 8), "b": T(12), "b_bad": T(8), "n8": T(8), "n4": T(4), "w12": T(8, 12),
           "vec": T(8)}


def _graph(*ops: dict, inputs: tuple[str, ...] = ("tokens", "positions")) -> dict:
    return {"inputs": list(inputs), "steps": [{"name": "s", "ops": [op("embed", ["tokens"], "x", ["emb"]), *ops]}]}


def test_widths_follow_each_op():
    g = _graph(op("rms_norm", ["x"], "h", ["n8"]), op("linear", ["h"], "q", ["w", "b"]),
               op("rms_norm", ["q"], "q", ["n4"], group=4), op("rope", ["q"], "q"),
               op("linear", ["h"], "k", ["w"]), op("attention", ["q", "k", "k"], "o"),
               op("linear", ["o"], "a", ["w12"]), op("add", ["x", "a"], "x"), op("swiglu", ["q", "k"], "m"),
               op("last_token", ["x"], "x"))
    assert activation_widths(g, TENSORS) == {"x": 8, "h": 8, "q": 12, "k": 12, "o": 12, "a": 8, "m": 12}


def test_a_name_written_twice_gets_the_largest_width_and_readers_see_the_latest():
    g = _graph(op("linear", ["x"], "h", ["w"]), op("rms_norm", ["x"], "h", ["n8"]), op("add", ["h", "x"], "y"))
    assert activation_widths(g, TENSORS) == {"x": 8, "h": 12, "y": 8}


BAD: dict[str, tuple[dict, str]] = {
    "unknown input": (_graph(op("rope", ["z"], "y")), r"ops\[1\] \(rope\): input 'z' has no known width"),
    "graph input as float": (_graph(op("rope", ["positions"], "y")),
                             "input 'positions' is a graph input .integers., not a float activation"),
    "add widths": (_graph(op("linear", ["x"], "y", ["w"]), op("add", ["x", "y"], "x")),
                   r"ops\[2\] \(add\): inputs 'x' and 'y' widths: 8 != 12"),
    "swiglu widths": (_graph(op("linear", ["x"], "g", ["w"]), op("swiglu", ["g", "x"], "m")),
                      r"\(swiglu\): inputs 'g' and 'x' widths: 12 != 8"),
    "attention k/v widths": (_graph(op("linear", ["x"], "k", ["w"]), op("attention", ["x", "k", "x"], "o")),
                             r"\(attention\): inputs 'k' \(k\) and 'x' \(v\) widths: 12 != 8"),
    "linear columns": (_graph(op("linear", ["x"], "y", ["w12"])),
                       r"\(linear\): input 'x' width vs weight 'w12' columns: 8 != 12"),
    "linear bias length": (_graph(op("linear", ["x"], "y", ["w", "b_bad"])),
                           r"bias 'b_bad' length vs weight 'w' rows: 8 != 12"),
    "linear 1-D weight": (_graph(op("linear", ["x"], "y", ["vec"])), r"weight 'vec' has shape \[8\], expected 2"),
    "norm length": (_graph(op("rms_norm", ["x"], "y", ["n4"])), r"weight 'n4' length vs input 'x' width: 4 != 8"),
    "norm group length": (_graph(op("rms_norm", ["x"], "y", ["n8"], group=4)), r"weight 'n8' length vs group: 8 != 4"),
    "norm group divides": (_graph(op("rms_norm", ["x"], "y", ["n4"], group=3)), "group 3 does not divide"),
    "norm group bool": (_graph(op("rms_norm", ["x"], "y", ["n4"], group=True)), "group True does not divide"),
    "embed 1-D": (_graph(op("embed", ["tokens"], "y", ["vec"])), r"weight 'vec' has shape \[8\], expected 2"),
    "missing weight": (_graph(op("linear", ["x"], "y", ["nope"])), "weight 'nope' is not in the tensor table"),
    "unknown op": (_graph(op("gelu", ["x"], "y")), r"\(gelu\): unknown op"),
    "arity": (_graph(op("add", ["x"], "y")), r"\(add\): takes 2 inputs and 0-0 weights, got 1 and 0"),
    "in not a list": (_graph({"op": "rope", "in": "x", "out": "y", "w": [], "attrs": {}}), "must be arrays of str"),
    "op not a map": (_graph(["rope"]), r"ops\[1\]: not an op map"),
    "steps not a list": ({"inputs": [], "steps": {}}, "`steps` and `inputs` must be arrays"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_inference_rejects(case):
    graph, match = BAD[case]
    with pytest.raises(FormatError, match=match):
        activation_widths(copy.deepcopy(graph), TENSORS)

