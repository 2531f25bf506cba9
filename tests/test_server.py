"""`vkpack serve`: the real server (uvicorn on a free loopback port) driven by the official openai client.

Most tests use a small synthetic llama (fast); one chat test uses SmolLM2. Bad requests go
through raw httpx so that status codes and error bodies are checked exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import make_synthetic as ms
import openai
import pytest
from vkpack.compiler.build import build
from vkpack.runtime.engine import Engine
from vkpack.runtime.server.app import create_app
from vkpack.runtime.server.runner import BackgroundServer

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"


def _build(folder: Path, template: str | None = None) -> Path:
    """A small llama (4 layers, hidden 128) as a HF folder, optionally with another chat template."""
    spec = ms.Spec(layers=4, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=512, std=0.15)
    ms.write_hf(folder / "hf", spec, dtype="F32", seed=11)
    if template is not None:
        cfg_path = folder / "hf" / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg))
    out = folder / "m.vkpack"
    build(folder / "hf", out, max_pack_mb=1, progress=False)
    return out


class Served:
    """An engine, its app and a background uvicorn; `.client` is an openai client for it."""

    def __init__(self, archive: Path, name: str = NAME, api_key: str | None = KEY, **kw):
        engine_kw = {k: kw.pop(k) for k in ("vram_gb", "context") if k in kw}
        self.engine = Engine(archive, **engine_kw)
        self.app = create_app(self.engine, model_name=name, api_key=api_key, **kw)
        self.srv = BackgroundServer(self.app).__enter__()
        self.url = self.srv.url
        self.name = name
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0, timeout=60)

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, headers={**self.headers, **kw.pop("headers", {})}, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        r = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10)
        assert r.status_code == 200
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["vkpack_active_sequences"] == 0 and m["vkpack_queue_depth"] == 0:
                return m
            assert time.monotonic() < deadline, f"still busy: {m}"
            time.sleep(0.02)

    def close(self) -> None:
        self.srv.__exit__()
        self.engine.close()


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def served(tiny_archive):
    s = Served(tiny_archive)
    yield s
    s.close()


def _complete(s: Served, prompt, n: int = 16, **kw) -> openai.types.Completion:
    extra = kw.pop("extra_body", {"ignore_eos": True})
    return s.client.completions.create(model=s.name, prompt=prompt, max_tokens=n, temperature=kw.pop("temperature", 0),
                                       extra_body=extra, **kw)


# ---- the happy paths, through the openai client ----


def test_models_and_health(served):
    assert [m.id for m in served.client.models.list().data] == [NAME]
    r = httpx.get(served.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_streamed_equals_plain(served):
    plain = _complete(served, "The quick brown fox", 12)
    c = plain.choices[0]
    assert plain.object == "text_completion" and plain.model == NAME and plain.id.startswith("cmpl-")
    assert c.finish_reason == "length" and c.text
    assert plain.usage.completion_tokens == 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 12
    chunks = list(_complete(served, "The quick brown fox", 12, stream=True,
                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == c.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_prompt_as_token_ids(served):
    ids = served.engine.encode("The quick brown fox")
    assert _complete(served, ids, 8).choices[0].text == _complete(served, "The quick brown fox", 8).choices[0].text


def test_chat_streamed_equals_plain(served):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    plain = served.client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=10, temperature=0,
                                                  extra_body={"ignore_eos": True})
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 10
    expected = served.engine.encode(served.engine.apply_chat_template(msgs))
    assert plain.usage.prompt_tokens == len(expected)
    chunks = list(served.client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings(served):
    full = _complete(served, "Once upon a time", 24).choices[0].text
    ascii_at = [i for i in range(3, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].strip()]
    assert ascii_at, f"no ASCII pair to stop on in {full!r}"
    stop = full[ascii_at[len(ascii_at) // 2]:][:2]
    expected = full[:full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(_complete(served, "Once upon a time", 24, stop=[stop, "\x00never"], stream=True))
            text = "".join(ch.choices[0].text for ch in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            c = _complete(served, "Once upon a time", 24, stop=stop).choices[0]
            text, reason = c.text, c.finish_reason
        assert (text, reason) == (expected, "stop")


def test_seeded_sampling_repeats(served):
    a, b = (_complete(served, "Seeds", 16, temperature=1.0, seed=1234, top_p=0.9).choices[0].text for _ in range(2))
    assert a == b
    again = served.client.completions.create(model=NAME, prompt="Seeds", max_tokens=16, temperature=1.0, seed=1234,
                                             top_p=0.9, stream=True, extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in again) == a


# ---- auth ----


def test_api_key_required_except_health(served):
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(served.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(served.url + "/v1/completions", json={"model": NAME, "prompt": "x"},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(served.url + "/health").status_code == 200
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- bad requests: an OpenAI error body, a 4xx status, and the server keeps serving ----

BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": NAME, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [5] * 5000}, 400, "prompt"),   # longer than the context
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 3}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[2]}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_openai_error(served, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = served.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_oversized_body_413_and_still_serving(served):
    big = {"model": NAME, "prompt": "x" * (2 << 20)}
    r = served.post("/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the cap applies while reading
        for _ in range(40):
            yield b" " * 65536
    r = served.post("/v1/completions", content=chunked())
    assert r.status_code == 413
    r = served.post("/v1/completions", json={"model": NAME, "prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    m = served.metrics()
    assert m['vkpack_requests_total{endpoint="/v1/completions",status="413"}'] >= 2


def test_unknown_route_is_json_404(served):
    r = httpx.get(served.url + "/v2/nothing", headers=served.headers)
    assert r.status_code == 404 and "error" in r.json()


# ---- batching, cancellation, limits ----


def _slow_steps(monkeypatch, s: Served, seconds: float = 0.005) -> None:
    """Each batch step takes at least `seconds`, so a 1000-token request surely outlives the test's checks."""
    forward = s.engine.forward_batch

    def slow(seqs):
        time.sleep(seconds)
        return forward(seqs)

    monkeypatch.setattr(s.engine, "forward_batch", slow)


def test_client_disconnect_frees_slot_and_kv(served, monkeypatch):
    idle = served.wait_idle()
    _slow_steps(monkeypatch, served)
    body = {"model": NAME, "prompt": "never ending", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", served.url + "/v1/completions", json=body,
                                                 headers=served.headers) as r:
        assert r.status_code == 200
        lines = (ln for ln in r.iter_lines() if ln.startswith("data: "))
        next(lines), next(lines)
        assert served.metrics()["vkpack_active_sequences"] == 1
    after = served.wait_idle()
    assert after['vkpack_finished_total{reason="cancelled"}'] == idle['vkpack_finished_total{reason="cancelled"}'] + 1
    assert after["vkpack_device_bytes_in_use"] == idle["vkpack_device_bytes_in_use"]


def test_16_concurrent_streams_match_each_alone(served, monkeypatch):
    prompts = [f"Request {i}: the model streams its weights" for i in range(16)]
    alone = [_complete(served, p, 24).choices[0].text for p in prompts]
    sizes: list[int] = []
    forward = served.engine.forward_batch

    def recording(seqs):
        sizes.append(len(seqs))
        return forward(seqs)

    monkeypatch.setattr(served.engine, "forward_batch", recording)
    go = threading.Barrier(16)

    def streamed(p: str) -> tuple[str, str | None]:
        go.wait()
        chunks = list(_complete(served, p, 24, stream=True))
        return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(streamed, prompts))
    assert [t for t, _ in results] == alone  # greedy: batching must not change the tokens
    assert all(reason == "length" for _, reason in results)
    assert 4 <= max(sizes) <= 8, f"batch sizes {sizes}: requests were not decoded together"
    served.wait_idle()


def test_queue_full_is_503_and_slots_free(tiny_archive, monkeypatch):
    s = Served(tiny_archive, api_key=None, max_batch=1, max_queue=1)
    _slow_steps(monkeypatch, s)
    try:
        body = {"model": NAME, "prompt": "hold the slot", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                "stream": True}
        queued_status = []

        def queued():
            with httpx.Client(timeout=60) as c, c.stream("POST", s.url + "/v1/completions", json=body) as r:
                queued_status.append(r.status_code)
                lines = r.iter_lines()
                next(lines)

        with httpx.Client(timeout=60) as c, c.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response
            next(lines)
            t = threading.Thread(target=queued)
            t.start()
            deadline = time.monotonic() + 10
            while s.metrics()["vkpack_queue_depth"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r3 = s.post("/v1/completions", json={**body, "stream": False})
            assert r3.status_code == 503 and r3.json()["error"]["code"] == "queue_full"
            assert r3.headers.get("retry-after")
        t.join(30)
        assert queued_status == [200]
        s.wait_idle()
        assert s.post("/v1/completions", json={**body, "max_tokens": 3, "stream": False}).status_code == 200
    finally:
        s.close()


def test_kv_budget_full_requests_wait_then_finish(tiny_archive):
    probe = Engine(tiny_archive)
    before = probe.tier.in_use
    with probe.kv_session(200 + 8):  # prompt + max_tokens below: several packs' worth, so packs still fit
        session = probe.tier.in_use - before
    room = sum(sorted((probe.backend.pack_bytes(p.id) for p in probe.archive.packs), reverse=True)[:2])
    budget = max(room + int(2.5 * session), probe.min_bytes)
    probe.close()
    s = Served(tiny_archive, vram_gb=budget / 2**30, max_batch=8)
    try:
        prompts = [[10 + i] * 200 for i in range(5)]
        alone = [_complete(s, p, 8).choices[0].text for p in prompts]
        with ThreadPoolExecutor(5) as pool:
            together = list(pool.map(lambda p: _complete(s, p, 8).choices[0].text, prompts))
        assert together == alone
        assert s.scheduler.kv_waits > 0
    finally:
        s.close()


# ---- chat templates are untrusted ----

EVIL = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = namespace() %}{{ x.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ lipsum.__globals__ }}{{ messages.pop() }}",
]


@pytest.fixture(scope="module")
def evil_served(tmp_path_factory):
    s = Served(_build(tmp_path_factory.mktemp("evil"), template=" | ".join(EVIL)), name="evil", api_key=None)
    yield s
    s.close()


@pytest.mark.parametrize("template", EVIL)
def test_malicious_template_leaks_nothing(evil_served, template):
    from vkpack.runtime.chat import TemplateError, render_chat

    tok = {**evil_served.engine.archive.tokenizer, "chat_template": template}
    try:
        text = render_chat(tok, [{"role": "user", "content": "hi"}])
    except TemplateError:
        return
    assert "<class" not in text and "function" not in text and "module" not in text and "uid=" not in text


def test_malicious_template_is_an_error_and_server_keeps_serving(evil_served):
    r = evil_served.post("/v1/chat/completions", json={"model": "evil", "messages": [{"role": "user", "content": "hi"}]})
    assert 400 <= r.status_code < 600
    err = r.json()["error"]
    assert "template" in err["message"] and "<class" not in r.text
    assert httpx.get(evil_served.url + "/health").json()["status"] == "ok"
    ok = evil_served.post("/v1/completions", json={"model": "evil", "prompt": "still here", "max_tokens": 3})
    assert ok.status_code == 200


# ---- the real model and the real command ----


def test_smollm2_chat(smollm2_archive):
    s = Served(smollm2_archive, name="smollm2", api_key=None)
    try:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        plain = s.client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0)
        text = plain.choices[0].message.content
        assert "Paris" in text, text
        chunks = list(s.client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=12, temperature=0,
                                                       stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    finally:
        s.close()


def test_cli_serve_starts_and_answers(tiny_archive):
    proc = subprocess.Popen([sys.executable, "-m", "vkpack", "serve", str(tiny_archive), "--port", "0",
                             "--model-name", "cli", "--max-batch", "2"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "vkpack serve: cli on http://127.0.0.1:" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).json()["status"] == "ok"
        r = httpx.post(url + "/completions", json={"model": "cli", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_serve_port_in_use_is_one_line(tiny_archive, served):
    port = served.srv.port
    r = subprocess.run([sys.executable, "-m", "vkpack", "serve", str(tiny_archive), "--port", str(port)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"cannot bind 127.0.0.1:{port}" in r.stderr


def test_model_field_is_optional_as_in_llama_server(served):
    # docs/SERVER.md: optional; when given, it must name the served model (404 otherwise)
    r = served.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == NAME
    r = served.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": None})
    assert r.status_code == 200
    r = served.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


# ---- fields the server does not implement: 400 naming the field, never a silent 200 (issue 15) ----

UNSUPPORTED = [   # tools, tool_choice and response_format are implemented: tests/test_server_tools.py
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field,value", UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_unsupported_fields_are_400_naming_the_field(served, path, field, value):
    from vkpack.runtime.server.parse import UNSUPPORTED_FIELDS

    assert field in UNSUPPORTED_FIELDS  # one table: implementing a field means removing its row
    body = {"model": NAME, "max_tokens": 2, field: value,
            **({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})}
    r = served.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and err["code"] == "unsupported_parameter"


@pytest.mark.parametrize("field,value", [("tools", []), ("tool_choice", "none"), ("logit_bias", {}),
                                         ("presence_penalty", 0), ("frequency_penalty", 0.0),
                                         ("response_format", {"type": "text"}), ("tools", None)])
def test_unsupported_fields_at_their_off_value_are_accepted(served, field, value):
    # what clients such as the openai package send by default must not be refused
    r = served.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", [
    b'{"prompt": "hi", "max_tokens": ' + b"9" * 5001 + b"}",            # was an HTTP 500 (ValueError in json)
    b'{"prompt": "hi", "temperature": ' + b"9" * 400 + b"}",            # float() overflow
    b'{"prompt": "hi", "seed": ' + b"9" * 40 + b"}",
    b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deep nesting
    b'{"prompt": [1, ' + b"9" * 30 + b"]}",                              # a token id far past the vocabulary
])
def test_numbers_and_nesting_json_cannot_hold_are_400(served, raw):
    r = served.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_template_bomb_is_400_and_the_server_keeps_serving(tmp_path):
    s = Served(_build(tmp_path, template="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                           "{% endfor %}"), name="bomb", api_key=None)
    try:
        r = s.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_error"
        assert "took more than" in r.json()["error"]["message"]
        assert s.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        s.close()
