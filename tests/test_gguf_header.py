"""Our GGUF header parser against the `gguf` package's reader, and on damaged files."""

from __future__ import annotations

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import make_synthetic as ms
from vkpack.compiler.sources.gguf_header import read_gguf_header
from vkpack.compiler.sources.gguf_meta import gguf_metadata
from vkpack.pack_format.errors import SourceError


def same_as_gguf_reader(path) -> None:
    ours = read_gguf_header(path)
    ref = gguf.GGUFReader(path)
    assert ours.meta == gguf_metadata(ref)
    assert [(t.name, t.dtype, t.shape, t.offset) for t in ours.tensors] == [
        (t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), int(t.data_offset)) for t in ref.tensors]


@pytest.mark.parametrize("arch,dtype", [("llama", "F16"), ("qwen2", "Q8_0"), ("qwen3", "BF16")])
def test_matches_gguf_reader_on_synthetic(tmp_path, arch, dtype):
    same_as_gguf_reader(ms.write_gguf(tmp_path / "m.gguf", ms.Spec(arch=arch), dtype=dtype, seed=0))


def test_matches_gguf_reader_on_smollm2(smollm2_gguf):
    same_as_gguf_reader(smollm2_gguf)


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    return ms.write_gguf(tmp_path_factory.mktemp("g") / "t.gguf", ms.Spec(), dtype="F16", seed=0).read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_headers_raise_source_error_only(tmp_path, tiny_bytes, data):
    buf = bytearray(tiny_bytes[:20000])
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(buf[:cut]))
    try:
        read_gguf_header(p)
    except SourceError:
        pass
