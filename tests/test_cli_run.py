"""`vkpack run`'s prompt sources (-p, -f, stdin), a model source where an archive is expected, `build -o`
checked before building, and `--help` showing each default once."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import make_synthetic as ms
import pytest

from vkpack.compiler.build import build
from vkpack.runtime.cli import COMMANDS, main, make_parser
from vkpack.runtime.engine import Engine

SPEC = ms.Spec(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=384, std=0.3)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return ms.write_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf", SPEC, dtype="Q8_0", seed=2)


@pytest.fixture(scope="module")
def archive(gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arc") / "tiny.vkpack"
    build(gguf, out, progress=False)
    return out


def vkpack(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vkpack", *map(str, argv)], input=stdin, capture_output=True,
                          text=True, timeout=120)


def one_error_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


GREEDY = ("-n", "6", "--temperature", "0", "--device", "cpu", "--ignore-eos")


@pytest.fixture(scope="module")
def expected(archive) -> str:
    with Engine(archive, device="cpu") as eng:
        return eng.generate("The prompt", max_tokens=6, temperature=0, ignore_eos=True)


# ---- where the prompt comes from ----


def test_prompt_flag(archive, expected):
    r = vkpack("run", archive, "-p", "The prompt", *GREEDY)
    assert r.returncode == 0 and r.stdout == expected + "\n"


def test_prompt_from_file_drops_one_trailing_newline(archive, expected, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("The prompt\n", encoding="utf-8")
    r = vkpack("run", archive, "-f", f, *GREEDY)
    assert r.returncode == 0 and r.stdout == expected + "\n"


@pytest.mark.parametrize("flags", [("-p", "-"), ()])
def test_prompt_from_stdin(archive, expected, flags):
    r = vkpack("run", archive, *flags, *GREEDY, stdin="The prompt\n")
    assert r.returncode == 0 and r.stdout == expected + "\n", r.stderr


def test_prompt_flag_wins_over_piped_stdin(archive, expected):
    r = vkpack("run", archive, "-p", "The prompt", *GREEDY, stdin="something else")
    assert r.returncode == 0 and r.stdout == expected + "\n"


@pytest.mark.parametrize("argv,stdin,words", [
    (("-p", "x", "-f", "p.txt"), None, "not both"),
    (("-f", "missing.txt"), None, "missing.txt"),
    (("-p", "-"), "", "empty"),
    ((), "\n", "empty"),
    (("-n", "0", "-p", "x"), None, "-n 0"),
])
def test_prompt_errors_are_one_line(archive, tmp_path, argv, stdin, words):
    argv = tuple(str(tmp_path / a) if a.endswith(".txt") else a for a in argv)
    r = vkpack("run", archive, *argv, "--device", "cpu", stdin=stdin)
    assert words in one_error_line(r)


def test_undecodable_prompt_file_is_one_line(archive, tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"\xff\xfe bad")
    assert "not UTF-8" in one_error_line(vkpack("run", archive, "-f", f))


def test_system_message_implies_the_chat_template(archive):
    with Engine(archive, device="cpu") as eng:
        prompt = eng.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}])
        want = eng.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True)
    r = vkpack("run", archive, "-p", "Hi", "--system", "Be brief.", *GREEDY)
    assert r.returncode == 0 and r.stdout == want + "\n"


# ---- a model source where an archive is expected: suggest `vkpack build` ----


@pytest.mark.parametrize("command", ["run", "inspect", "verify", "serve"])
def test_gguf_given_as_archive_suggests_build(gguf, command):
    extra = ("-p", "x") if command == "run" else ("--port", "0") if command == "serve" else ()
    line = one_error_line(vkpack(command, gguf, *extra))
    assert "is a GGUF model, not a .vkpack archive" in line
    assert f"vkpack build {gguf} -o {gguf.with_suffix('.vkpack')}" in line and f"vkpack {command} " in line


def test_hf_folder_and_safetensors_given_as_archive(tmp_path):
    hf = ms.write_hf(tmp_path / "hf", SPEC, dtype="F32", seed=1)
    hf = Path(hf) if hf else tmp_path / "hf"
    assert "Hugging Face model folder" in one_error_line(vkpack("inspect", hf))
    st = next(hf.glob("*.safetensors"))
    assert "safetensors file" in one_error_line(vkpack("run", st, "-p", "x"))


def test_a_corrupt_archive_is_not_called_a_model_source(tmp_path):
    p = tmp_path / "x.vkpack"
    p.write_bytes(b"\x00" * 64)
    line = one_error_line(vkpack("inspect", p))
    assert "vkpack build" not in line


# ---- build -o: checked before building ----


def test_build_output_folder_is_refused_before_building(gguf, tmp_path, monkeypatch, capsys):
    from vkpack.compiler import cmd_build

    def no_build(*a, **k):
        raise AssertionError("built although the output was refused")

    monkeypatch.setattr(cmd_build, "build", no_build)
    (tmp_path / "out").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, words in ((tmp_path / "out", "is a folder"), (blocker / "m.vkpack", "is not a folder")):
        assert main(["build", str(gguf), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert list((tmp_path / "out").iterdir()) == []


def test_build_into_a_missing_folder_still_works(gguf, tmp_path):
    out = tmp_path / "new" / "deeper" / "m.vkpack"
    r = vkpack("build", gguf, "-o", out, "--no-progress")
    assert r.returncode == 0 and out.is_file()


def test_build_output_unwritable(gguf, tmp_path, monkeypatch, capsys):
    import os

    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    # as root, permissions do not stop writes; a read-only mount does, which os.access reports the same way
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))
    assert main(["build", str(gguf), "-o", str(ro / "m.vkpack")]) == 2
    err = capsys.readouterr().err
    assert "cannot write in" in err and not list(ro.iterdir())


# ---- --help: every default once ----


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = make_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_each_default_once(command, capsys):
    sub = _subparsers()[command]
    formatter = sub._get_formatter()
    for a in sub._actions:
        if not a.option_strings or a.help in (None, argparse.SUPPRESS):
            continue
        text = formatter._get_help_string(a) % {**vars(a), "prog": sub.prog}
        assert len(re.findall(r"\(default", text, re.IGNORECASE)) <= 1, (a.option_strings, text)
        if a.default not in (None, False, [], argparse.SUPPRESS):
            assert f"(default: {a.default})" in text, (a.option_strings, text)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_run_help_shows_the_sampling_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, value in (("--temperature", "0.8"), ("--top-k", "40"), ("--top-p", "0.95"), ("--min-p", "0.05"),
                        ("--repeat-penalty", "1.0"), ("--max-tokens", "128")):
        assert re.search(re.escape(flag) + r"\s+\S+\s+.{0,80}?\(default: " + re.escape(value) + r"\)", out), flag
