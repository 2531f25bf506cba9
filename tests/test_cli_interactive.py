"""`vkpack run -i`: the conversation kept and rendered through the chat template, Ctrl-C stopping a reply and
returning to the prompt, Ctrl-D and /exit quitting; the real command in a subprocess, and the loop's logic
on a recording engine."""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import make_synthetic as ms
import pytest

from vkpack.compiler.build import build
from vkpack.pack_format.errors import VkpackError
from vkpack.runtime.cli import run as run_cmd
from vkpack.runtime.engine import Engine

SPEC = ms.Spec(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=384, std=0.3)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat")
    out = folder / "chat.vkpack"
    build(ms.write_gguf(folder / "m.gguf", SPEC, dtype="Q8_0", seed=4), out, progress=False)
    return out


def chat(archive: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vkpack", "run", str(archive), "-i", "--device", "cpu", *flags],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(stream, pred, timeout: float = 60.0) -> bytes:
    """Bytes from a pipe until pred(all so far) holds (or fail after `timeout`)."""
    got = b""
    deadline = time.monotonic() + timeout
    while not pred(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {got[-300:]!r}"
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"pipe closed; got {got[-300:]!r}"
            got += chunk
    return got


def test_piped_chat_keeps_the_history(archive):
    """Two turns, greedy: the second reply is the one the whole conversation (with the first reply) gives."""
    r = subprocess.run([sys.executable, "-m", "vkpack", "run", str(archive), "-i", "--device", "cpu", "-n", "5",
                        "--temperature", "0", "--ignore-eos", "--system", "S"],
                       input="first\n\n  \nsecond\n/exit\nnever sent\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with Engine(archive, device="cpu") as eng:
        msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "first"}]
        one = eng.generate(eng.encode(eng.apply_chat_template(msgs)), max_tokens=5, temperature=0, ignore_eos=True)
        msgs += [{"role": "assistant", "content": one}, {"role": "user", "content": "second"}]
        two = eng.generate(eng.encode(eng.apply_chat_template(msgs)), max_tokens=5, temperature=0, ignore_eos=True)
        alone = eng.generate(eng.encode(eng.apply_chat_template([msgs[0], msgs[-1]])), max_tokens=5, temperature=0,
                             ignore_eos=True)
    assert r.stdout == f"{one}\n{two}\n"
    assert two != alone  # otherwise this test could not tell a kept history from a forgotten one


def test_first_message_from_p_then_eof_quits(archive):
    r = subprocess.run([sys.executable, "-m", "vkpack", "run", str(archive), "-i", "--device", "cpu", "-n", "3",
                        "-p", "hello", "--temperature", "0", "--ignore-eos"],
                       input="", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("\n") == 1, (r.stdout, r.stderr)


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(archive):
    # 2,000 tokens past EOS take seconds; Ctrl-C must end each reply early and leave the chat running
    p = chat(archive, "-n", "2000", "--ignore-eos")
    try:
        for message in (b"tell me a long story\n", b"and another\n"):
            p.stdin.write(message)
            p.stdin.flush()
            read_until(p.stdout, lambda b: len(b) >= 20)
            t0 = time.monotonic()
            p.send_signal(signal.SIGINT)
            read_until(p.stderr, lambda b: b"[vkpack] stopped" in b, timeout=20)
            assert time.monotonic() - t0 < 5
        p.stdin.write(b"/exit\n")
        p.stdin.flush()
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()


def test_ctrl_c_at_the_prompt_keeps_going(archive):
    p = chat(archive, "-n", "3")
    try:
        time.sleep(3)  # loaded and waiting for input
        p.send_signal(signal.SIGINT)
        read_until(p.stderr, lambda b: b"Ctrl-D or /exit quits" in b, timeout=30)
        p.stdin.write(b"still here\n")
        p.stdin.close()  # then Ctrl-D
        assert p.wait(30) == 0
        assert p.stdout.read().count(b"\n") == 1
    finally:
        p.kill()
        p.wait()


def test_a_second_ctrl_c_during_a_reply_raises():
    # the first only asks the reply to stop; a second (a stuck reply) is the usual KeyboardInterrupt, which quits
    with run_cmd._StopOnInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.stopped
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- the loop's logic, on an engine that records what it is asked ----


class RecordingEngine:
    """Templates are `role:content|...`, a token per character; replies are fixed text."""

    context = 60

    def __init__(self, refuse: str | None = None):
        self.rendered: list[list[dict[str, str]]] = []
        self.refuse = refuse

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if self.refuse and any(m["content"] == self.refuse for m in messages):
            raise VkpackError("chat template: refused\nsecond line")
        self.rendered.append([dict(m) for m in messages])
        return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    def encode(self, text):
        return list(range(len(text)))

    def stream(self, ids, **kw):
        yield f"reply{len(self.rendered)}"


def loop(eng, lines: list[str], system: str | None = None, monkeypatch=None, capsys=None) -> tuple[int, str, str]:
    feed = iter(lines)

    def fake_input(*prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    args = argparse.Namespace(system=system, max_tokens=5, temperature=0.0, top_k=40, top_p=0.95, min_p=0.05,
                              repeat_penalty=1.0, repeat_last_n=64, seed=None, stop=[], ignore_eos=False)
    code = run_cmd.chat_loop(eng, args, None)
    out, err = capsys.readouterr()
    return code, out, err


def test_loop_history_system_and_exit(monkeypatch, capsys):
    eng = RecordingEngine()
    code, out, _ = loop(eng, ["a", "", "b", "/exit", "c"], system="sys", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out == "reply1\nreply2\n"
    assert eng.rendered[-1] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
                                {"role": "assistant", "content": "reply1"}, {"role": "user", "content": "b"}]


def test_loop_drops_the_oldest_turns_to_fit_the_context(monkeypatch, capsys):
    eng = RecordingEngine()
    code, _, err = loop(eng, ["x" * 10, "y" * 10, "z" * 10], system="s", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "dropped the oldest turn" in err
    last = eng.rendered[-1]
    assert last[0]["role"] == "system" and last[-1]["content"] == "z" * 10
    assert len("|".join(f"{m['role']}:{m['content']}" for m in last)) < eng.context


def test_loop_reports_a_refused_message_and_goes_on(monkeypatch, capsys):
    eng = RecordingEngine(refuse="bad")
    code, out, err = loop(eng, ["bad", "fine", "w" * 100], monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out == "reply1\n"
    assert "[vkpack] error: chat template: refused" in err and "second line" not in err
    assert "the context holds 60" in err
    assert eng.rendered[0] == [{"role": "user", "content": "fine"}]
