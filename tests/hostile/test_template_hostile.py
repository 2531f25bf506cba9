"""Chat templates that burn CPU or memory (issue 15): each ends, within the renderer's limits, as one
TemplateError (HTTP 400 in the server, one line and exit 2 in `vkpack run --chat`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vkpack.runtime.chat import RENDER_MAX_CHARS, RENDER_SECONDS, TemplateError, render_chat

MSGS = [{"role": "user", "content": "hi"}]
BOMBS = {
    "range(10**9) (was an OverflowError traceback)": ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    "nested range(100000) loops (hung a request forever)": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than"),
    "'A' * 10**10 (was a MemoryError)": ("{{ 'A' * 10**10 }}", "MiB"),
    "string doubling": (("{% set ns = namespace(s='AB') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}"), "MiB"),
    "center(10**10)": ("{{ 'a'|center(10**10) }}", "MiB"),
    "recursive macro (was a RecursionError)": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    "a huge output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", f"more than {RENDER_MAX_CHARS}"),
    "9 ** (9 ** 9)": ("{{ 9 ** (9 ** 9) }}", "refused"),
}


def _render(src: str) -> str:
    return render_chat({"chat_template": src}, MSGS)


@pytest.mark.parametrize("case", list(BOMBS))
def test_template_bombs_are_one_error_within_the_limits(case):
    src, words = BOMBS[case]
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match=words):
        _render(src)
    assert time.monotonic() - t0 < RENDER_SECONDS + 10
    assert _render("{{ messages[0].content }}!") == "hi!"  # the renderer serves the next template at once


def test_sandbox_escapes_are_still_refused():
    with pytest.raises(TemplateError, match="sandbox"):
        _render("{{ ''.__class__.__mro__[1].__subclasses__() }}")


def test_raise_exception_keeps_its_message():
    with pytest.raises(TemplateError, match="^chat template: roles must alternate$"):
        _render("{{ raise_exception('roles must alternate') }}")


def test_run_chat_with_a_hanging_template_is_one_line(capsys, tmp_path):
    import msgpack
    from model_edits import tiny_hf
    from tiny_archive import index_blob, with_index

    from vkpack.compiler.build import build
    from vkpack.runtime.cli import main

    out = tmp_path / "m.vkpack"
    build(tiny_hf(tmp_path / "hf"), out, progress=False, threads=1)
    data = out.read_bytes()
    index = msgpack.unpackb(index_blob(data)[0], raw=False)
    index["tokenizer"]["chat_template"] = BOMBS["nested range(100000) loops (hung a request forever)"][0]
    out.write_bytes(with_index(data, index))
    code = main(["run", str(out), "--chat", "-p", "hi", "-n", "1", "--device", "numpy"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "took more than" in err and "Traceback" not in err
