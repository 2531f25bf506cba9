"""The compiler end to end: every input kind, byte-identical tensors, determinism, splitting."""

from __future__ import annotations

import gguf
import pytest

import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.pack_format.reader import Archive


def _gguf(tmp_path, arch="llama", dtype="F16", **kw):
    return ms.write_gguf(tmp_path / f"{arch}-{dtype}.gguf", ms.Spec(arch=arch, **kw), dtype=dtype, seed=1)


def _tensor_bytes(a: Archive, name: str) -> bytes:
    t = a.tensors[name]
    return b"".join(bytes(memoryview(a.read_pack(p.pack))[p.offset:p.offset + p.nbytes]) for p in t.parts)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "Q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_tensors_stored_byte_identical(tmp_path, arch, dtype):
    src = _gguf(tmp_path, arch, dtype)
    out = tmp_path / "m.vkpack"
    stats = build(src, out)
    reader = gguf.GGUFReader(src)
    with Archive(out) as a:
        assert a.arch == arch
        assert not a.verify()
        assert len(a.tensors) == len(reader.tensors) == stats.tensors
        for t in reader.tensors:
            rec = a.tensors[t.name]
            assert rec.dtype == t.tensor_type.name
            assert list(rec.shape) == list(reversed(t.shape.tolist()))
            assert _tensor_bytes(a, t.name) == bytes(memoryview(t.data).cast("B")), t.name
        hp = a.hparams
        assert hp["qkv_bias"] == (arch == "qwen2") and hp["qk_norm"] == (arch == "qwen3")
        assert hp["rope_mode"] == ("norm" if arch == "llama" else "neox")


@pytest.mark.parametrize("shard_mb", [None, 0.05])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_hf_folder_and_shards(tmp_path, arch, shard_mb):
    from safetensors import safe_open

    folder = ms.write_hf(tmp_path / arch, ms.Spec(arch=arch), dtype="BF16", seed=2, shard_mb=shard_mb)
    out = tmp_path / "hf.vkpack"
    build(folder, out)
    files = sorted(folder.glob("*.safetensors"))
    if shard_mb:
        assert len(files) > 1
    with Archive(out) as a:
        assert a.index["source"]["format"] == "hf"
        assert a.hparams["rope_mode"] == "neox"
        assert a.tokenizer["json"] and a.tokenizer["chat_template"]
        for f in files:
            with safe_open(f, "np") as st:
                for name in st.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    from vkpack.compiler.archs import llama

                    norm = llama.Llama().normalize_hf_name(name)
                    raw = st.get_slice(name)
                    arr = st.get_tensor(name) if raw.get_dtype() != "BF16" else None
                    if arr is not None:
                        assert _tensor_bytes(a, norm) == arr.tobytes()
                    assert list(a.tensors[norm].shape) == list(raw.get_shape())


def test_single_safetensors_file_and_index_json(tmp_path):
    folder = ms.write_hf(tmp_path / "m", ms.Spec(), dtype="F32", seed=3)
    build(folder / "model.safetensors", tmp_path / "a.vkpack")
    sharded = ms.write_hf(tmp_path / "s", ms.Spec(), dtype="F32", seed=3, shard_mb=0.05)
    build(sharded / "model.safetensors.index.json", tmp_path / "b.vkpack")
    with Archive(tmp_path / "a.vkpack") as a, Archive(tmp_path / "b.vkpack") as b:
        assert a.index["tensors"] == b.index["tensors"]
        assert [p.raw_crc32 for p in a.packs] == [p.raw_crc32 for p in b.packs]


def test_deterministic_whatever_the_threads(tmp_path):
    src = _gguf(tmp_path, dtype="F16")
    build(src, tmp_path / "a.vkpack", threads=1)
    build(src, tmp_path / "b.vkpack", threads=2)
    build(src, tmp_path / "c.vkpack", threads=2)
    a, b, c = ((tmp_path / f"{x}.vkpack").read_bytes() for x in "abc")
    assert a == b == c


@pytest.mark.parametrize("codec", ["none", "blosc2-zstd", "blosc2-lz4", "zfp", "auto"])
def test_every_codec_round_trips_every_pack(tmp_path, codec):
    src = _gguf(tmp_path, dtype="F32")
    out = tmp_path / f"{codec}.vkpack"
    build(src, out, codec=codec)
    reader = gguf.GGUFReader(src)
    with Archive(out) as a:
        used = {p.codec for p in a.packs}
        if codec not in ("auto", "none"):
            assert codec in used, f"{codec} never chosen: {used}"
        assert not a.verify()  # decodes every pack and checks the decoded crc32
        for t in reader.tensors:
            assert _tensor_bytes(a, t.name) == bytes(memoryview(t.data).cast("B"))


def test_max_pack_mb_splits_rows(tmp_path):
    spec = ms.Spec(layers=2, hidden=512, heads=8, kv_heads=4, ffn=1536, vocab=4096)
    src = ms.write_gguf(tmp_path / "m.gguf", spec, dtype="F32", seed=0)
    out = tmp_path / "m.vkpack"
    build(src, out, max_pack_mb=1)
    with Archive(out) as a:
        assert max(p.raw_size for p in a.packs) <= 1 << 20
        assert len(a.tensors["blk.0.ffn_up.weight"].parts) >= 3       # 1536x512 f32 = 3 MiB
        assert len(a.tensors["token_embd.weight"].parts) >= 8         # 4096x512 f32 = 8 MiB
        for step in a.graph["steps"]:
            needed = {p.pack for o in step["ops"] for w in o["w"] for p in a.tensors[w].parts}
            assert needed == set(step["packs"])
        assert not a.verify()


def test_graph_orders_packs_as_the_forward_pass(tmp_path):
    src = _gguf(tmp_path, dtype="F16", layers=3)
    with Archive(build_to(src, tmp_path)) as a:
        names = [s["name"] for s in a.graph["steps"]]
        assert names[0] == "embed" and names[-1] == "head"
        assert names[1:-1] == [f"blk.{i}.{k}" for i in range(3) for k in ("attn", "mlp")]
        offsets = [a.packs[p].offset for s in a.graph["steps"][:-1] for p in s["packs"]]
        assert offsets == sorted(offsets)  # one sequential read for a cold first token
        assert a.graph["loop_to"] == 0


def build_to(src, tmp_path):
    out = tmp_path / "g.vkpack"
    build(src, out)
    return out


def test_smollm2_real_model(tmp_path, smollm2_gguf):
    out = tmp_path / "smol.vkpack"
    stats = build(smollm2_gguf, out)
    reader = gguf.GGUFReader(smollm2_gguf)
    with Archive(out) as a:
        assert stats.packs == len(a.packs) and not a.verify()
        assert {t.dtype for t in a.tensors.values()} == {"Q4_1", "Q8_0", "F32"}
        for t in reader.tensors:
            assert _tensor_bytes(a, t.name) == bytes(memoryview(t.data).cast("B")), t.name
        hp = a.hparams
        assert (hp["n_layers"], hp["hidden"], hp["n_heads"], hp["n_kv_heads"], hp["vocab"]) == (30, 576, 9, 3, 49152)
        assert "output.weight" not in a.tensors  # tied embeddings: the head reads token_embd
        assert a.graph["steps"][-1]["ops"][-1]["w"] == ["token_embd.weight"]


@pytest.mark.slow
def test_build_streams_a_2gb_model_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    spec = ms.Spec(layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192, vocab=49152)
    src = ms.write_gguf(tmp_path / "big.gguf", spec, dtype="F16", seed=0)
    assert src.stat().st_size > 2e9
    code = ("import resource,sys; from vkpack.compiler.build import build; "
            f"build({str(src)!r}, {str(tmp_path / 'big.vkpack')!r}, progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    # page cache of the mmapped source counts as shared RSS; anonymous memory is what we bound
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_mb = int(out.stdout.strip()) / 1024  # ru_maxrss is in KiB on Linux
    # the bound says something only if that process really moved every source byte into the archive
    with Archive(tmp_path / "big.vkpack") as a:
        stored = sum(p.nbytes for t in a.tensors.values() for p in t.parts)
    assert stored == sum(int(t.n_bytes) for t in gguf.GGUFReader(src).tensors) > 2e9
    # the interpreter with numpy alone takes tens of MB, so a misread unit fails one bound or the other
    assert 20 < peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
