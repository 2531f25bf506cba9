"""docs/FORMAT.md and pack_format/ in lockstep: the doc's machine-readable tables against the code.

Each table in FORMAT.md follows a `<!-- table:NAME -->` marker. A cell that is one code span
(`like this`) is read without its backticks.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import re
import sys
from pathlib import Path

import pytest

from vkpack.pack_format import constants, shapes, validate
from vkpack.pack_format.errors import FormatError
from vkpack.pack_format.records import PackRecord, TensorPart, TensorRecord

sys.path.insert(0, str(Path(__file__).resolve().parent / "hostile"))
from tiny_archive import make_index

DOC = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"


def _cell(c: str) -> str:
    c = c.strip().replace("\\|", "|")
    if len(c) >= 2 and c[0] == c[-1] == "`" and c.count("`") == 2:
        return c[1:-1]
    return c


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{name: rows as {column: cell}} for every marked table."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- table:(\w+) -->", line.strip())
        if not m:
            continue
        block = []
        for row in lines[i + 1:]:
            if not row.startswith("|"):
                break
            block.append([_cell(c) for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]])
        assert len(block) >= 3 and set(block[1][0]) <= set("-: "), f"table {m.group(1)} is malformed"
        assert m.group(1) not in tables, f"table {m.group(1)} appears twice"
        tables[m.group(1)] = [dict(zip(block[0], r)) for r in block[2:]]
    return tables


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def t(doc) -> dict[str, list[dict[str, str]]]:
    return parse_tables(doc)


def _col(rows: list[dict[str, str]], name: str) -> list[str]:
    return [r[name] for r in rows]


# ---- layout ----
def test_constants(t):
    rows = t["constants"]
    names = _col(rows, "name")
    assert names == ["MAGIC", "FOOTER_MAGIC", "FORMAT_MAJOR", "FORMAT_MINOR", "HEADER_SIZE", "FOOTER_SIZE", "ALIGN",
                     "TENSOR_ALIGN", "MAX_PACK_SIZE", "MAX_INDEX_SIZE"]
    for r in rows:
        assert ast.literal_eval(r["value"]) == getattr(constants, r["name"]), r["name"]


def test_magic_hex_in_doc(t):
    for r in t["constants"][:2]:
        hexes = re.search(r"hex `([0-9A-F ]+)`", r["meaning"]).group(1)
        assert bytes.fromhex(hexes) == getattr(constants, r["name"])


_TYPES = {"u16": "H", "u32": "I", "u64": "Q"}


def _struct_format(rows: list[dict[str, str]], total: int) -> str:
    fmt, pos = "<", 0
    for r in rows:
        off, size, typ = int(r["offset"]), int(r["size"]), r["type"]
        assert off == pos, f"field {r['field']} starts at {off}, expected {pos}"
        if typ in _TYPES:
            fmt += _TYPES[typ]
            assert size == {"H": 2, "I": 4, "Q": 8}[_TYPES[typ]]
        else:
            n = int(re.fullmatch(r"u8\[(\d+)\]", typ).group(1))
            assert n == size
            fmt += f"{n}x" if r["field"] == "reserved" else f"{n}s"
        pos += size
    assert pos == total
    return fmt


def test_header_table(t, doc):
    fmt = _struct_format(t["header"], constants.HEADER_SIZE)
    assert fmt == constants.HEADER_STRUCT.format
    assert f'the header is `"{constants.HEADER_STRUCT.format}"`' in doc


def test_footer_table(t, doc):
    rows = t["footer"]
    # the footer's one reserved u32 is a plain field in the struct ("I"), unlike the header's padding
    fmt = _struct_format([dict(r, field="reserved_u32") if r["field"] == "reserved" else r for r in rows],
                         constants.FOOTER_SIZE)
    assert fmt == constants.FOOTER_STRUCT.format
    assert f'the footer is `"{constants.FOOTER_STRUCT.format}"`' in doc


# ---- enums ----
def test_dtypes(t):
    rows = t["dtypes"]
    doc_dtypes = {r["dtype"]: (int(r["block elements"]), int(r["block bytes"])) for r in rows}
    assert list(doc_dtypes) == list(constants.DTYPES)
    assert doc_dtypes == constants.DTYPES


def test_ggml_type_ids(t):
    assert {r["dtype"]: int(r["GGML type"]) for r in t["dtypes"]} == constants.GGML_TYPE_IDS


def test_dtypes_match_gguf_py():
    # an independent source for GGML's block sizes and type ids (gguf-py is a dependency of the compiler)
    import gguf

    for name, size in constants.DTYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == size, name
        assert gguf.GGMLQuantizationType[name].value == constants.GGML_TYPE_IDS[name], name


def test_codecs(t):
    assert tuple(_col(t["codecs"], "codec")) == constants.CODECS


def test_pack_kinds(t):
    assert tuple(_col(t["pack_kinds"], "kind")) == constants.PACK_KINDS


def test_rope_modes(t):
    assert tuple(_col(t["rope_modes"], "mode")) == constants.ROPE_MODES


def test_ops_and_arity(t):
    rows = t["ops"]
    assert tuple(_col(rows, "op")) == constants.OPS
    assert set(validate.OP_ARITY) == set(constants.OPS)
    for r in rows:
        lo, _, hi = r["w"].partition("-")
        assert (int(r["in"]), int(lo), int(hi or lo)) == validate.OP_ARITY[r["op"]], r["op"]


def test_graph_inputs(t):
    assert tuple(_col(t["graph_inputs"], "input")) == validate.GRAPH_INPUTS


def test_activation_width_rules(t):
    # every op has a width rule, in the doc and in shapes.py
    assert tuple(_col(t["activation_widths"], "op")) == constants.OPS
    assert tuple(shapes.WIDTH_RULES) == constants.OPS


# ---- records and keys ----
_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool", dict: "map", list: "array", type(None): "nil"}


def _type_string(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES[x] for x in types)


def test_index_keys(t):
    rows = t["index_keys"]
    required = tuple(r["key"] for r in rows if r["required"] == "yes")
    assert required == validate.REQUIRED_KEYS
    assert {r["required"] for r in rows} <= {"yes", "no"}


def test_hparams_table(t):
    doc_types = {r["key"]: r["type"] for r in t["hparams"]}
    assert doc_types == {k: _type_string(v) for k, v in validate.HPARAM_TYPES.items()}


def test_tokenizer_table(t):
    doc_types = {r["key"]: r["type"] for r in t["tokenizer"]}
    code_types = {k: _type_string(v) for k, v in validate.TOKENIZER_TYPES.items()}
    assert doc_types == code_types


def test_record_tables_match_dataclasses(t):
    fields = lambda cls: [f.name for f in dataclasses.fields(cls)]
    assert _col(t["pack_record"], "field") == fields(PackRecord)
    assert _col(t["tensor_part"], "field") == fields(TensorPart)
    assert _col(t["tensor_record"], "field") == fields(TensorRecord)


# ---- every documented required field is enforced by the validator ----
def _index() -> dict:
    packs = [{"id": 0, "kind": "embed", "layer": None, "offset": 4096, "stored_size": 2048, "raw_size": 2048,
              "codec": "none", "codec_params": {}, "crc32": 0, "raw_crc32": 0},
             {"id": 1, "kind": "head", "layer": None, "offset": 8192, "stored_size": 256, "raw_size": 256,
              "codec": "none", "codec_params": {}, "crc32": 0, "raw_crc32": 0}]
    return make_index(packs)


INDEX_OFFSET = 12288


def _rejects_without(path: tuple, key: str) -> str:
    index = copy.deepcopy(_index())
    d = index
    for k in path:
        d = d[k]
    del d[key]
    with pytest.raises(FormatError) as e:
        validate.validate_index(index, INDEX_OFFSET)
    return str(e.value)


def test_valid_index_passes():
    validate.validate_index(_index(), INDEX_OFFSET)


@pytest.mark.parametrize("table,path", [
    ("pack_record", ("packs", 0)), ("tensor_part", ("tensors", 0, "parts", 0)), ("tensor_record", ("tensors", 0)),
    ("hparams", ("hparams",)), ("tokenizer", ("tokenizer",)), ("graph_keys", ("graph",)),
    ("step", ("graph", "steps", 0)),
])
def test_documented_fields_are_required(t, table, path):
    key_col = "field" if "field" in t[table][0] else "key"
    for r in t[table]:
        if r.get("required", "yes") == "no":  # optional: the index stays valid without it
            index = copy.deepcopy(_index())
            del _dig(index, path)[r[key_col]]
            validate.validate_index(index, INDEX_OFFSET)
            continue
        msg = _rejects_without(path, r[key_col])
        assert f"missing key '{r[key_col]}'" in msg, (table, r[key_col], msg)


def test_op_attrs_table(t):
    rows = t["op_attrs"]
    where = {"rms_norm": ("graph", "steps", 2, "ops", 1), "rope": ("graph", "steps", 1, "ops", 0),
             "attention": ("graph", "steps", 1, "ops", 2)}
    assert {r["op"] for r in rows} == set(where) | {"scale", "softcap", "moe"}  # ops the tiny index does not use
    ops_attrs = {r["op"]: r["attrs"] for r in t["ops"]}
    for r in rows:
        assert r["attribute"] in ops_attrs[r["op"]], (r["op"], r["attribute"])
        if r["op"] not in where:
            continue
        optional = "optional" in r["type"]
        if r["attribute"] not in _dig(_index(), where[r["op"]])["attrs"]:
            assert optional
            continue
        if optional:
            index = copy.deepcopy(_index())
            del _dig(index, where[r["op"]])["attrs"][r["attribute"]]
            validate.validate_index(index, INDEX_OFFSET)
        else:
            msg = _rejects_without(where[r["op"]] + ("attrs",), r["attribute"])
            assert f"missing key '{r['attribute']}'" in msg


def _dig(d, path):
    for k in path:
        d = d[k]
    return d


# ---- rules and versions ----
def test_rules_are_numbered_and_match_the_code(t):
    rows = t["rules"]
    numbers = [int(r["#"]) for r in rows]
    assert numbers == list(range(1, len(rows) + 1))
    assert {r["error"] for r in rows} == {"FormatError", "ChecksumError"}
    assert [int(r["#"]) for r in rows if r["error"] == "ChecksumError"] == [24, 25, 26]
    # validate.py names the rules it implements in its section comments: together exactly 10-23
    src = (Path(validate.__file__)).read_text()
    covered: set[int] = set()
    for a, b in re.findall(r"# ---- rules (\d+)-(\d+)", src):
        covered |= set(range(int(a), int(b) + 1))
    assert covered == set(range(10, 24))


def test_history_ends_at_the_current_version(t, doc):
    current = f"{constants.FORMAT_MAJOR}.{constants.FORMAT_MINOR}"
    assert _col(t["history"], "version")[-1] == current
    assert doc.splitlines()[0].endswith(f"version {current}")


def test_every_table_is_parsed(t, doc):
    assert set(t) == set(re.findall(r"<!-- table:(\w+) -->", doc))
    assert set(t) >= {"constants", "header", "footer", "dtypes", "codecs", "pack_kinds", "ops", "rope_modes",
                      "hparams", "tokenizer", "graph_inputs", "index_keys", "pack_record", "tensor_part",
                      "tensor_record", "rules", "history", "op_attrs", "graph_keys", "step", "activation_widths"}


def test_tensor_names_match_the_compiler(t):
    # The doc's name table is what the compiler writes: HF names map as listed, and each lands in its pack kind.
    from vkpack.compiler.archs.base import HF_RENAME, Family

    rows = t["tensor_names"]
    doc_map = {r["from HF"].split(";")[0].strip("` ").replace(".N.", ".{}."): r["name"].replace(".N.", ".{}.")
               for r in rows}
    code_map = {k: v for k, v in HF_RENAME.items() if v is not None}
    assert doc_map == code_map
    fam = Family()
    for r in rows:
        kind, _layer = fam.pack_group(r["name"].replace(".N.", ".3."))
        assert kind == r["pack kind"], r["name"]
