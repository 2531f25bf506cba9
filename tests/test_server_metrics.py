"""GET /metrics through prometheus_client, on the real server: every metric docs/SERVER.md lists is exposed with
its type and labels (and nothing undocumented), the latency histograms see each request and token where the
scheduler produces them, two servers in one process keep their own registries, and OpenMetrics is negotiated."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from vkpack.runtime.engine import Engine
from vkpack.runtime.server.app import create_app
from vkpack.runtime.server.runner import BackgroundServer

KEY = "sk-metrics"
AUTH = {"Authorization": f"Bearer {KEY}"}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "SERVER.md"
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "request_duration_seconds",
              "request_queue_seconds")
STEP = 0.02   # seconds each batch step sleeps in the latency test: every token takes at least this long


class Served:
    def __init__(self, tiny_q8_archive: Path, device: object = "cpu", **engine_kw):
        self.engine = Engine(tiny_q8_archive, device=device, **engine_kw)
        self.srv = BackgroundServer(create_app(self.engine, model_name="m", api_key=KEY)).__enter__()
        self.url = self.srv.url
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def scrape(self, accept: str | None = None) -> httpx.Response:
        r = httpx.get(self.url + "/metrics", headers={**AUTH, **({"Accept": accept} if accept else {})}, timeout=10)
        assert r.status_code == 200, r.text
        return r

    def families(self) -> dict[str, object]:
        """name as a query writes it (a counter with its `_total`) -> the parsed family."""
        out = {}
        for f in parse_text(self.scrape().text):
            out[f.name + "_total" if f.type == "counter" else f.name] = f
        return out

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in parse_text(self.scrape().text) for s in f.samples}

    def chat(self, text: str, n: int) -> openai.types.chat.ChatCompletion:
        return self.client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                                   max_tokens=n, temperature=0, extra_body={"ignore_eos": True})

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.samples()[("vkpack_active_sequences", ())] or self.samples()[("vkpack_queue_depth", ())]:
            assert time.monotonic() < deadline, "the scheduler stayed busy"
            time.sleep(0.02)

    def close(self) -> None:
        self.srv.__exit__()
        self.engine.close()


@pytest.fixture(scope="module")
def served(tiny_q8_archive):
    s = Served(tiny_q8_archive, ram_gb=1)   # a RAM budget, so that vkpack_ram_budget_bytes is exposed too
    yield s
    s.close()


def _doc_tables() -> dict[str, dict[str, tuple[str, frozenset[str]]]]:
    """docs/SERVER.md's metric tables: {table: {metric: (type, labels)}}, table "all" or "hybrid"."""
    text = DOCS.read_text()
    section = text[text.index("### Metrics (`GET /metrics`)"):]
    section = section[:section.index("\n## ")]
    tables: dict[str, dict[str, tuple[str, frozenset[str]]]] = {"all": {}, "hybrid": {}}
    which = "all"
    for line in section.splitlines():
        if line.startswith("Hybrid backend only"):
            which = "hybrid"
        m = re.match(r"\| `(vkpack_\w+)` \|\s*(\w+)\s*\|([^|]*)\|", line)
        if m:
            labels = frozenset(re.findall(r"`(\w+)`", m.group(3)))
            tables[which][m.group(1)] = (m.group(2), labels)
    assert len(tables["all"]) >= 25 and len(tables["hybrid"]) == 7, tables
    return tables


def _check_against_doc(families: dict[str, object], doc: dict[str, tuple[str, frozenset[str]]]) -> None:
    for name, (kind, labels) in doc.items():
        assert name in families, f"{name} is documented but not exposed"
        fam = families[name]
        assert fam.type == kind, f"{name}: exposed as {fam.type}, documented as {kind}"
        seen = {k for s in fam.samples for k in s.labels if k != "le"}
        assert seen == labels, f"{name}: labels {sorted(seen)}, documented {sorted(labels)}"


def test_every_documented_metric_is_exposed_with_its_type_and_labels(served):
    served.chat("hello", 4)
    fams = served.families()
    doc = _doc_tables()
    _check_against_doc(fams, doc["all"])
    undocumented = {n for n in fams if not n.endswith("_created")} - set(doc["all"])
    assert not undocumented, f"exposed but not in docs/SERVER.md: {sorted(undocumented)}"
    # names that existed before prometheus_client keep their exact sample lines (tools/bench_serve.py reads them)
    text = served.scrape().text
    for line in ("vkpack_batch_steps_total ", "vkpack_bytes_read_total ", 'vkpack_finished_total{reason="length"} ',
                 'vkpack_requests_total{endpoint="/v1/chat/completions",status="200"} '):
        assert re.search("^" + re.escape(line) + r"\S+$", text, re.MULTILINE), line


def test_latency_histograms_see_every_request_and_token(served, monkeypatch):
    """With each batch step at least STEP long, no first token, gap between tokens or request can be shorter."""
    forward = served.engine.forward_batch

    def slow(seqs):
        time.sleep(STEP)
        return forward(seqs)

    monkeypatch.setattr(served.engine, "forward_batch", slow)
    served.wait_idle()
    before = served.samples()
    n_req, n_tok = 3, 6
    wall = []
    usage = []
    for i in range(n_req):
        t0 = time.perf_counter()
        usage.append(served.chat(f"request {i}", n_tok).usage)
        wall.append(time.perf_counter() - t0)
    after = served.samples()

    def delta(name: str, **labels: str) -> float:
        key = (f"vkpack_{name}", tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert [u.completion_tokens for u in usage] == [n_tok] * n_req
    assert delta("time_to_first_token_seconds_count") == n_req
    assert delta("inter_token_latency_seconds_count") == n_req * (n_tok - 1)
    assert delta("request_duration_seconds_count") == n_req
    assert delta("request_queue_seconds_count") == n_req
    # every observation is at least one step: nothing below the STEP/2 bucket
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "request_duration_seconds"):
        assert delta(f"{h}_bucket", le="0.01") == 0, h
        assert delta(f"{h}_bucket", le="+Inf") == delta(f"{h}_count")
    assert delta("inter_token_latency_seconds_sum") >= n_req * (n_tok - 1) * STEP
    # a request lasts from its first token's wait to its last token, and no longer than the client waited
    assert delta("time_to_first_token_seconds_sum") + delta("inter_token_latency_seconds_sum") == pytest.approx(
        delta("request_duration_seconds_sum"), rel=0.05)
    assert delta("request_duration_seconds_sum") <= sum(wall)
    # the token counters agree with what the responses reported
    assert delta("prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert delta("generation_tokens_total") == n_req * n_tok
    # buckets from 1 ms to 60 s
    les = [dict(k[1])["le"] for k in after if k[0] == "vkpack_request_duration_seconds_bucket"]
    assert les[0] == "0.001" and les[-2:] == ["60.0", "+Inf"]


def test_a_cancelled_request_counts_its_tokens_but_no_duration(served, monkeypatch):
    forward = served.engine.forward_batch
    monkeypatch.setattr(served.engine, "forward_batch", lambda seqs: (time.sleep(STEP), forward(seqs))[1])
    served.wait_idle()
    before = served.samples()
    body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 500, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", served.url + "/v1/chat/completions", json=body,
                                                 headers=AUTH) as r:
        lines = (ln for ln in r.iter_lines() if ln.startswith("data: "))
        for _ in range(4):
            next(lines)
    served.wait_idle()
    after = served.samples()
    assert after[("vkpack_finished_total", (("reason", "cancelled"),))] == \
        before[("vkpack_finished_total", (("reason", "cancelled"),))] + 1
    assert after[("vkpack_time_to_first_token_seconds_count", ())] == \
        before[("vkpack_time_to_first_token_seconds_count", ())] + 1
    assert after[("vkpack_request_duration_seconds_count", ())] == before[("vkpack_request_duration_seconds_count", ())]


def test_two_servers_in_one_process_keep_their_own_metrics(tiny_q8_archive, served):
    other = Served(tiny_q8_archive)
    try:
        served.wait_idle()
        mine, theirs = served.samples(), other.samples()
        other.chat("only the second server", 3)
        assert other.samples()[("vkpack_time_to_first_token_seconds_count", ())] == 1
        assert other.samples()[("vkpack_generation_tokens_total", ())] == 3
        now = served.samples()
        for key in [("vkpack_time_to_first_token_seconds_count", ()), ("vkpack_generation_tokens_total", ())]:
            assert now[key] == mine[key], key
        assert theirs[("vkpack_request_duration_seconds_count", ())] == 0
    finally:
        other.close()


def test_openmetrics_when_the_scraper_asks_for_it(served):
    plain = served.scrape()
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    om = served.scrape("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    names = {f.name for f in parse_openmetrics(om.text)}
    assert {"vkpack_requests", "vkpack_time_to_first_token_seconds", "vkpack_queue_depth"} <= names


def test_metrics_need_the_key(served):
    assert httpx.get(served.url + "/metrics", timeout=10).status_code == 401


# ---- the hybrid backend's rates and plans (lavapipe and the native CPU kernels) ----


def _hybrid_available() -> tuple[bool, str]:
    from vkpack.runtime import native, vk

    ok_vk, why_vk = vk.available()
    ok_native, why_native = native.available()
    return ok_vk and ok_native, f"Vulkan: {why_vk or 'ok'}; native: {why_native or 'ok'}"


def test_hybrid_rates_and_plans_are_exported(smollm2_archive):
    """SmolLM2 at a quarter of its size in device memory, on rates that make the CPU worth it: planned passes."""
    ok, why = _hybrid_available()
    if not ok:
        pytest.skip(why)
    from vkpack.runtime.hybrid.backend import HybridBackend
    from vkpack.runtime.hybrid.rates import Rates
    from vkpack.runtime.native.backend import NativeCpuBackend
    from vkpack.runtime.vk.backend import VulkanBackend

    with Engine(smollm2_archive, device="numpy") as probe:
        quarter = probe.model_bytes / 4 / 2**30
    rates = Rates(link=1e9, gpu_read=1e11, sync=1e-5,
                  cpu={dt: {1: 1e10, 8: 1e8} for dt in ("Q4_1", "Q6_K", "Q8_0", "F32", "F16")})
    s = Served(smollm2_archive, device=lambda a: HybridBackend(a, VulkanBackend(a), NativeCpuBackend(a), rates=rates),
               vram_gb=quarter)
    try:
        s.chat("hello", 3)
        _check_against_doc(s.families(), _doc_tables()["hybrid"])
        got = s.samples()
        assert got[("vkpack_rate_link_bytes_per_second", ())] == rates.link
        assert got[("vkpack_rate_cpu_bytes_per_second", (("dtype", "Q8_0"), ("tokens", "8")))] == 1e8
        assert got[("vkpack_plan_cpu_steps", (("tokens", "1"),))] > 0, "a decode token computes layers on the CPU"
        passes = sum(v for (n, _), v in got.items() if n == "vkpack_hybrid_passes_total")
        assert passes >= got[("vkpack_batch_steps_total", ())] > 0
    finally:
        s.close()
