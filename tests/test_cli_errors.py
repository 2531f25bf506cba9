"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and no output file left."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

import make_synthetic as ms
from vkpack.pack_format.constants import FOOTER_SIZE, FOOTER_STRUCT
from vkpack.runtime.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, err: str, *words: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def no_output_left(folder: Path) -> bool:
    return not list(folder.glob("*.vkpack")) and not list(folder.glob("*.partial"))


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return ms.write_gguf(tmp_path / "src" / "tiny.gguf", ms.Spec(), dtype="F16", seed=0)


def build_fails(capsys, src: Path, tmp_path: Path, *words: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    code, _, err = run_cli(capsys, "build", src, "-o", out_dir / "m.vkpack")
    assert_clean_failure(code, err, *words)
    assert no_output_left(out_dir)


def test_empty_file(capsys, tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    build_fails(capsys, p, tmp_path, "empty")


def test_wrong_magic(capsys, tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + bytes(200))
    build_fails(capsys, p, tmp_path, "not a gguf")


def test_truncated_gguf(capsys, tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    for cut in (len(data) // 2, 40, len(data) - 100):
        p = tmp_path / "trunc.gguf"
        p.write_bytes(data[:cut])
        build_fails(capsys, p, tmp_path, "trunc")


def test_gguf_tensor_offset_past_end(capsys, tmp_path, tiny_gguf):
    t = gguf.GGUFReader(tiny_gguf).tensors[-1]
    f = t.field
    pos = f.offset + sum(part.nbytes for part in f.parts[:-1])  # the tensor's u64 data offset
    data = bytearray(tiny_gguf.read_bytes())
    assert struct.unpack_from("<Q", data, pos)[0] + f.offset > 0
    struct.pack_into("<Q", data, pos, 1 << 40)
    p = tmp_path / "offset.gguf"
    p.write_bytes(bytes(data))
    build_fails(capsys, p, tmp_path, "past the end")


def test_safetensors_header_longer_than_file(capsys, tmp_path):
    folder = ms.write_hf(tmp_path / "hf", ms.Spec(), dtype="F16", seed=0)
    st = folder / "model.safetensors"
    data = bytearray(st.read_bytes())
    struct.pack_into("<Q", data, 0, len(data) + 10)
    st.write_bytes(bytes(data))
    build_fails(capsys, folder, tmp_path, "header length")


def test_sharded_index_missing_shard(capsys, tmp_path):
    folder = ms.write_hf(tmp_path / "hf", ms.Spec(), dtype="F16", seed=0, shard_mb=0.05)
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    build_fails(capsys, folder, tmp_path, "missing", shards[-1].name)


def test_unsupported_architecture(capsys, tmp_path):
    folder = ms.write_hf(tmp_path / "hf", ms.Spec(), dtype="F16", seed=0)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    build_fails(capsys, folder, tmp_path, "GPTNeoXForCausalLM", "not supported", "LlamaForCausalLM", "qwen3")


def test_missing_tokenizer(capsys, tmp_path):
    folder = ms.write_hf(tmp_path / "hf", ms.Spec(), dtype="F16", seed=0)
    (folder / "tokenizer.json").unlink()
    build_fails(capsys, folder, tmp_path, "tokenizer")


def test_gguf_without_tokenizer(capsys, tmp_path):
    w = gguf.GGUFWriter(tmp_path / "notok.gguf", "llama")
    w.add_block_count(1)
    import numpy as np

    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    build_fails(capsys, tmp_path / "notok.gguf", tmp_path, "tokenizer")


@pytest.fixture
def archive(tmp_path, tiny_gguf, capsys) -> Path:
    out = tmp_path / "a" / "m.vkpack"
    out.parent.mkdir()
    code, _, _ = run_cli(capsys, "build", tiny_gguf, "-o", out, "--codec", "none")
    assert code == 0
    return out


def test_verify_names_the_pack_with_a_flipped_byte(capsys, archive):
    from vkpack.pack_format.reader import Archive

    with Archive(archive) as a:
        victim = a.packs[len(a.packs) // 2]
    data = bytearray(archive.read_bytes())
    data[victim.offset + victim.stored_size // 2] ^= 0x40
    archive.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "verify", archive)
    assert code == 1
    assert f"pack {victim.id}" in err and "Traceback" not in err
    code, out, _ = run_cli(capsys, "verify", archive, "--json")
    assert code == 1 and json.loads(out)["bad_packs"] == [victim.id]


def test_verify_ok(capsys, archive):
    code, out, _ = run_cli(capsys, "verify", archive, "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_archive_index_offset_outside_file(capsys, archive):
    data = bytearray(archive.read_bytes())
    _off, size, crc, res, magic = FOOTER_STRUCT.unpack_from(data, len(data) - FOOTER_SIZE)
    FOOTER_STRUCT.pack_into(data, len(data) - FOOTER_SIZE, len(data) * 4, size, crc, res, magic)
    archive.write_bytes(bytes(data))
    for cmd in ("inspect", "verify"):
        code, _, err = run_cli(capsys, cmd, archive)
        assert_clean_failure(code, err, "index")


def test_truncated_archive(capsys, archive):
    data = archive.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        archive.write_bytes(data[:cut])
        code, _, err = run_cli(capsys, "inspect", archive)
        assert_clean_failure(code, err)


def test_interrupted_build_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    import vkpack.compiler.build as b

    calls = {"n": 0}
    real = b.encode_pack

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(b, "encode_pack", flaky)
    with pytest.raises(KeyboardInterrupt):
        b.build(tiny_gguf, tmp_path / "x.vkpack", threads=1)
    assert no_output_left(tmp_path)


def test_console_script_exit_code_and_one_line(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "vkpack", "build", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "vkpack", "build", str(p), "--verbose"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("command", ["run", "serve"])
def test_policy_flag_is_gone(capsys, command):
    # LRU is a benchmark baseline: Engine(policy="lru") in Python, no flag on the command line.
    with pytest.raises(SystemExit) as ei:
        main([command, "m.vkpack", "-p", "x", "--policy", "lru"] if command == "run" else
             [command, "m.vkpack", "--policy", "lru"])
    assert ei.value.code == 2 and "--policy" in capsys.readouterr().err


def test_old_config_with_removed_setting_still_runs(tmp_path, archive):
    cfg = tmp_path / "old.ini"
    cfg.write_text("[memory]\neviction_aggression = 0.7\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VKPACK_")}
    r = subprocess.run([sys.executable, "-m", "vkpack", "run", str(archive), "-p", "hi", "-n", "2",
                        "--temperature", "0", "--device", "cpu", "--config", str(cfg)],
                       capture_output=True, text=True, env={**env, "VKPACK_EVICTION_AGGRESSION": "0.5"})
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if "ignored" in ln]
    assert len(warned) == 2 and "memory.eviction_aggression: ignored" in warned[0], r.stderr
    assert "VKPACK_EVICTION_AGGRESSION: ignored" in warned[1]
