"""Issue 16's server additions, on the real server: /tokenize, /detokenize, /props, the richer /v1/models,
CORS behind --cors-origin, the per-request log line, and sampling defaults shared with `vkpack run`."""

from __future__ import annotations

import inspect
import logging
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from vkpack.pack_format.reader import Archive
from vkpack.runtime.cli import make_parser
from vkpack.runtime.engine import Engine
from vkpack.runtime.sampler import DEFAULT_PARAMS
from vkpack.runtime.server.app import create_app
from vkpack.runtime.server.runner import BackgroundServer

KEY = "sk-16"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://app.example:3000"
DOCS = Path(__file__).resolve().parent.parent / "docs"


class Served:
    def __init__(self, tiny_q8_archive: Path, **kw):
        self.engine = Engine(tiny_q8_archive, device="cpu")
        self.srv = BackgroundServer(create_app(self.engine, model_name="m", api_key=KEY, **kw)).__enter__()
        self.url = self.srv.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=60, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=60, **kw)

    def close(self) -> None:
        self.srv.__exit__()
        self.engine.close()


@pytest.fixture(scope="module")
def served(tiny_q8_archive):
    s = Served(tiny_q8_archive)
    yield s
    s.close()


@pytest.fixture(scope="module")
def served_cors(tiny_q8_archive):
    s = Served(tiny_q8_archive, cors_origins=[ORIGIN])
    yield s
    s.close()


# ---- /tokenize, /detokenize ----


def test_tokenize_detokenize_round_trip(served):
    eng = served.engine
    text = "hello <|im_start|>world"
    r = served.post("/tokenize", json={"content": text})
    assert r.status_code == 200
    ids = r.json()["tokens"]
    assert ids == eng.encode(text, add_bos=False) and ids
    assert eng.text.raw.token_to_id("<|im_start|>") in ids  # special tokens in the text are parsed
    back = served.post("/detokenize", json={"tokens": ids})
    assert back.status_code == 200 and back.json() == {"content": eng.decode(ids, skip_special_tokens=False)}
    assert "<|im_start|>" in back.json()["content"]


def test_tokenize_add_special_adds_the_models_bos(served):
    eng = served.engine
    with_bos = served.post("/tokenize", json={"content": "hi", "add_special": True}).json()["tokens"]
    plain = served.post("/tokenize", json={"content": "hi", "add_special": False}).json()["tokens"]
    assert with_bos == eng.encode("hi")
    if eng.add_bos and eng.bos_id is not None:
        assert with_bos == [eng.bos_id, *plain]


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": "x", "add_special": "yes"}, "add_special"),
    ("/tokenize", {"content": "x", "with_pieces": True}, "with_pieces"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {"tokens": [1, True]}, "tokens"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_tokenize_detokenize_bad_input_is_400(served, path, body, param):
    r = served.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tokenize_needs_the_key(served):
    assert httpx.post(served.url + "/tokenize", json={"content": "x"}).status_code == 401
    assert httpx.get(served.url + "/props").status_code == 401


# ---- /props and /v1/models ----


def _expected_meta(tiny_q8_archive: Path) -> dict:
    with Archive(tiny_q8_archive) as a:
        params = Counter()
        for r in a.tensors.values():
            params[r.dtype] += math.prod(r.shape)
        return {"architecture": a.index["arch"], "n_params": sum(params.values()), "quantization": dict(params),
                "n_layers": a.hparams["n_layers"], "n_vocab": a.hparams["vocab"], "size": a.size}


def test_models_meta_through_openai(served, tiny_q8_archive):
    (card,) = served.client.models.list().data
    meta = card.model_extra["meta"]
    exp = _expected_meta(tiny_q8_archive)
    for k, v in exp.items():
        assert meta[k] == v, k
    assert set(meta["quantization"]) == {"Q8_0", "F32"}
    assert meta["n_ctx"] == served.engine.context and meta["backend"] == served.engine.backend.name == "cpu"
    assert meta["device_budget_bytes"] == served.engine.tier.budget and meta["ram_budget_bytes"] is None
    assert served.client.models.retrieve("m").model_extra["meta"] == meta


def test_props(served, tiny_q8_archive):
    r = served.get("/props")
    assert r.status_code == 200
    p = r.json()
    d = DEFAULT_PARAMS
    assert p["default_generation_settings"]["n_ctx"] == served.engine.context
    params = p["default_generation_settings"]["params"]
    assert (params["temperature"], params["top_k"], params["top_p"], params["min_p"], params["repeat_penalty"]) == \
        (d.temperature, d.top_k, d.top_p, d.min_p, d.repeat_penalty)
    assert params["n_predict"] == 512 and p["total_slots"] == 8 and p["model_alias"] == "m"
    assert p["chat_template"] and p["meta"]["n_params"] == _expected_meta(tiny_q8_archive)["n_params"]


# ---- CORS ----


def test_no_cors_without_the_flag(served):
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    r = httpx.options(served.url + "/v1/chat/completions", headers=pre)
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
    r = httpx.options(served.url + "/v1/chat/completions", headers={**pre, **AUTH})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = served.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_preflight_and_simple_requests(served_cors):
    s = served_cors
    pre = httpx.options(s.url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # browsers send no key here
    assert pre.status_code == 200, pre.text
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    r = s.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    denied = httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}, headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN  # readable error
    other = s.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    bad_pre = httpx.options(s.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "GET"})
    assert bad_pre.status_code == 400 and "access-control-allow-origin" not in bad_pre.headers
    # the openai client, streaming, through a CORS-enabled server
    chunks = list(s.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3, stream=True, temperature=0))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_cli_cors_origin_is_checked(tiny_q8_archive):
    r = subprocess.run([sys.executable, "-m", "vkpack", "serve", str(tiny_q8_archive), "--port", "0", "--cors-origin",
                        "example.com"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--cors-origin" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_serve_sends_cors_headers(tiny_q8_archive):
    proc = subprocess.Popen([sys.executable, "-m", "vkpack", "serve", str(tiny_q8_archive), "--port", "0", "--device", "cpu",
                             "--cors-origin", ORIGIN], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = line.split(" on ", 1)[1].split()[0]
        r = httpx.options(url + "/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"},
                          timeout=10)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    finally:
        proc.terminate()
        proc.wait(10)


# ---- the request log ----


LINE = re.compile(r"^(?P<id>\S+): prompt (?P<p>\d+) tok in (?P<pms>[\d.]+) ms \((?P<ptps>[\d.]+) tok/s\), generated "
                  r"(?P<g>\d+) tok in (?P<gms>[\d.]+) ms \((?P<gtps>[\d.]+) tok/s\), total (?P<tms>[\d.]+) ms "
                  r"\(queued [\d.]+ ms\), finish (?P<reason>\w+)$")


def test_one_log_line_per_request_with_tok_per_s(served, caplog):
    with caplog.at_level(logging.INFO, logger="vkpack.runtime.server.requests"):
        c = served.client.completions.create(model="m", prompt="one two three", max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True})
        served.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "vkpack.runtime.server.requests"]
    assert len(lines) == 2, lines
    m = LINE.match(lines[0])
    assert m, lines[0]
    assert m["id"] == c.id and int(m["p"]) == c.usage.prompt_tokens and int(m["g"]) == c.usage.completion_tokens == 6
    assert m["reason"] == "length"
    for n, ms_, tps in ((int(m["p"]), float(m["pms"]), float(m["ptps"])), (6, float(m["gms"]), float(m["gtps"]))):
        # tok/s is n over the time the line shows, rounded to 0.1 ms
        assert n / ((ms_ + 0.05) / 1e3) - 0.05 <= tps <= n / (max(ms_ - 0.05, 1e-6) / 1e3) + 0.05, (n, ms_, tps)
    assert float(m["tms"]) >= float(m["pms"]) + float(m["gms"]) - 0.2
    assert lines[1].startswith("chatcmpl-")


# ---- one table of sampling defaults ----


def test_requests_without_sampling_fields_use_the_run_defaults(served):
    d = DEFAULT_PARAMS
    assert (d.temperature, d.top_k, d.top_p, d.min_p, d.repeat_penalty) == (0.8, 40, 0.95, 0.05, 1.0)

    def text(**fields) -> str:
        body = {"prompt": "Sampling defaults", "max_tokens": 24, "seed": 7, "ignore_eos": True, **fields}
        r = served.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    bare = text()
    assert bare == text(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, min_p=d.min_p,
                        repeat_penalty=d.repeat_penalty, repeat_last_n=d.repeat_last_n)
    assert bare != text(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)  # OpenAI's defaults sample otherwise


def test_run_flags_and_engine_read_the_same_table():
    d = DEFAULT_PARAMS
    args = make_parser().parse_args(["run", "m.vkpack", "-p", "x"])
    assert (args.temperature, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.repeat_last_n) == \
        (d.temperature, d.top_k, d.top_p, d.min_p, d.repeat_penalty, d.repeat_last_n)
    sig = inspect.signature(Engine.stream).parameters
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n"):
        assert sig[name].default == getattr(d, name), name


def test_sampling_defaults_table_in_the_docs_matches_the_code():
    text = (DOCS / "SERVER.md").read_text(encoding="utf-8")
    section = text.split("### Sampling defaults", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `--([\w-]+)` \| ([^|]+) \|", section, re.MULTILINE)
    assert {r[0] for r in rows} >= {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n"}
    for field, flag, default in rows:
        assert flag == field.replace("_", "-")
        value = getattr(DEFAULT_PARAMS, field)
        if value is None:
            assert default.strip().startswith("none")
        else:
            assert float(default) == value, field
