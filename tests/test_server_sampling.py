"""Issue 16's sampling fields on the real server and SmolLM2 (numpy backend): logprobs / top_logprobs,
echo, n > 1 with one shared prefill, presence / frequency penalties, logit_bias, and the scheduler's
per-sequence logits-mask hook. Logprobs are checked against a separate numpy engine's logits."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from server_helpers import LiveServer
from vkpack.runtime.engine import Engine
from vkpack.runtime.sampler import SamplingParams
from vkpack.runtime.server.batch import Finished, GenRequest, Piece, Scheduler
from vkpack.runtime.server.logprobs import TokenText

NAME = "smol"
TOL = 1e-4          # logprobs vs a numpy log-softmax of the reference engine's logits
HI = [{"role": "user", "content": "What is the capital of France?"}]
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def served(smollm2_archive):
    s = LiveServer(Engine(smollm2_archive, device="numpy"), model_name=NAME)
    yield s
    s.close()


@pytest.fixture(scope="module")
def ref(smollm2_archive):
    """A second numpy engine, for reference logits (the server's belongs to its scheduler thread)."""
    with Engine(smollm2_archive, device="numpy") as eng:
        yield eng


@pytest.fixture(scope="module")
def text_of(ref):
    return TokenText(ref.tokenizer, ref.archive.tokenizer["json"])


@pytest.fixture(scope="module")
def id_of(ref, text_of) -> dict[str, int]:
    """Token string -> id over the whole vocabulary (unique for SmolLM2's byte-level BPE)."""
    table = {text_of(i)[0]: i for i in range(ref.n_token_ids)}
    assert len(table) == ref.n_token_ids
    return table


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def _greedy_reference(ref: Engine, ids: list[int], n: int) -> list[np.ndarray]:
    """log_softmax of the numpy engine's logits at each of n greedy steps after `ids`."""
    out, ids = [], list(ids)
    for _ in range(n):
        lp = _log_softmax(ref.logits(ids))
        out.append(lp)
        ids.append(int(np.argmax(lp)))
    return out


# ---- logprobs ----


def test_chat_logprobs_are_the_models_log_softmax(served, ref, text_of):
    r = served.client.chat.completions.create(model=NAME, messages=HI, max_tokens=4, temperature=0, logprobs=True,
                                              top_logprobs=5, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content
    steps = _greedy_reference(ref, ref.encode(ref.apply_chat_template(HI)), 4)
    for e, lp in zip(content, steps):
        tok = int(np.argmax(lp))
        assert (e.token, bytes(e.bytes)) == text_of(tok)
        assert abs(e.logprob - lp[tok]) < TOL
        top = np.argsort(-lp)[:5]
        assert [t.token for t in e.top_logprobs] == [text_of(int(i))[0] for i in top]
        assert np.allclose([t.logprob for t in e.top_logprobs], lp[top], atol=TOL)
        assert e.top_logprobs[0].logprob == e.logprob  # greedy: the chosen token is the most likely


def test_completion_logprobs_legacy_shape_and_values(served, ref, text_of):
    prompt = "The capital of France is"
    r = served.post("/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2,
                                        "ignore_eos": True})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    lp = c["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(lp["tokens"]) == c["text"] and len(lp["tokens"]) == 3
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(3)]
    for tok_text, logprob, top, ref_lp in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                              _greedy_reference(ref, ref.encode(prompt), 3)):
        best = np.argsort(-ref_lp)[:2]
        assert tok_text == text_of(int(best[0]))[0] and abs(logprob - ref_lp[best[0]]) < TOL
        assert list(top) == [text_of(int(i))[0] for i in best]  # k = 2, the chosen one among them
        assert np.allclose(list(top.values()), ref_lp[best], atol=TOL)


def test_logprobs_of_a_sampled_token_that_is_not_the_best(served, ref, id_of):
    # temperature 1.5 with a seed: some drawn tokens are not the argmax; each logprob is still its own
    prompt = "Once upon a time"
    r = served.post("/v1/completions", {"prompt": prompt, "max_tokens": 4, "temperature": 1.5, "top_k": 0,
                                        "top_p": 1.0, "min_p": 0.0, "seed": 4, "logprobs": 1, "ignore_eos": True})
    lp = r.json()["choices"][0]["logprobs"]
    ids = ref.encode(prompt)
    drawn = [id_of[t] for t in lp["tokens"]]
    for i, logprob in enumerate(lp["token_logprobs"]):
        want = _log_softmax(ref.logits(ids + drawn[:i]))[drawn[i]]
        assert abs(logprob - want) < TOL
        assert len(lp["top_logprobs"][i]) in (1, 2)  # the best, plus the drawn one where it differs
    assert any(len(t) == 2 for t in lp["top_logprobs"]), "every draw was the argmax: raise the temperature"


def test_streamed_logprobs_equal_plain(served):
    body = {"messages": HI, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    plain = served.post("/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    chunks = list(served.client.chat.completions.create(model=NAME, stream=True, **{k: v for k, v in body.items()
                                                                                  if k != "ignore_eos"},
                                                        extra_body={"ignore_eos": True}))
    streamed = [e.model_dump() for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert streamed == plain
    legacy = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 3,
              "ignore_eos": True}
    whole = served.post("/v1/completions", legacy).json()["choices"][0]["logprobs"]
    parts = _sse(served.post("/v1/completions", {**legacy, "stream": True}))
    joined = {k: [x for p in parts for c in p["choices"] if c["logprobs"] for x in c["logprobs"][k]] for k in whole}
    assert joined == whole


def _sse(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_no_logprobs_unless_asked(served):
    r = served.post("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "temperature": 0})
    assert r.json()["choices"][0]["logprobs"] is None
    r = served.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.json()["choices"][0]["logprobs"] is None


def test_token_bytes_are_exact_for_byte_level_and_sentencepiece_vocabularies(ref, text_of):
    from tokenizers import Tokenizer, decoders, models

    # byte-level BPE (SmolLM2): a whole token, and a parrot emoji split into byte tokens
    assert [text_of(i) for i in ref.encode(" caf\u00e9")] == [(" caf\u00e9", b" caf\xc3\xa9")]
    assert [text_of(i) for i in ref.encode("\U0001f99c")] == [
        ("bytes:\\xf0\\x9f", b"\xf0\x9f"), ("bytes:\\xa6", b"\xa6"), ("bytes:\\x9c", b"\x9c")]
    # SentencePiece as vkpack builds it from a GGUF (compiler/tokenizer.py): U+2581 for spaces, <0xNN> bytes
    spm = Tokenizer(models.BPE(vocab={"<0xE2>": 0, "<0x82>": 1, "<0xAC>": 2, "\u2581hello": 3, "a": 4}, merges=[],
                               byte_fallback=True))
    spm.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    spm_text = TokenText(spm, spm.to_str())
    assert spm_text(3) == (" hello", b" hello") and spm_text(4) == ("a", b"a")
    assert spm_text(0) == ("bytes:\\xe2", b"\xe2")
    assert b"".join(spm_text(i)[1] for i in (0, 1, 2)).decode() == "\u20ac"


# ---- echo ----


def test_echo_returns_the_prompt_and_its_logprobs(served, ref, text_of):
    prompt = "The capital of France is"
    plain = served.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0}).json()
    echo = served.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True,
                                           "logprobs": 1}).json()
    c = echo["choices"][0]
    assert c["text"] == prompt + plain["choices"][0]["text"]
    assert echo["usage"] == plain["usage"]  # the prompt is counted once, as a prompt
    ids = ref.encode(prompt)
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 2
    assert "".join(lp["tokens"][:len(ids)]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None   # nothing precedes the first
    assert lp["text_offset"][:len(ids)] == [len(ref.decode(ids[:i])) for i in range(len(ids))]
    assert lp["text_offset"][len(ids)] == len(prompt)
    with ref.kv_session(len(ids)) as kv:   # each position by a decode step, as tests/test_families.py does
        rows = [ref.executor.forward(np.asarray(ids[t:t + 1]), t, kv)[-1] for t in range(len(ids))]
    for i in range(1, len(ids)):
        want = _log_softmax(rows[i - 1])
        assert abs(lp["token_logprobs"][i] - want[ids[i]]) < TOL, i
        best = int(np.argmax(want))
        assert lp["top_logprobs"][i][text_of(best)[0]] == pytest.approx(want[best], abs=TOL)


def test_echo_streamed_and_with_token_ids(served):
    prompt = "The capital of France is"
    plain = served.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True}).json()
    assert plain["choices"][0]["logprobs"] is None
    parts = _sse(served.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True,
                                                 "stream": True}))
    assert parts[0]["choices"][0]["text"] == prompt
    assert "".join(c["text"] for p in parts for c in p["choices"]) == plain["choices"][0]["text"]
    ids = served.engine.encode(prompt)
    by_ids = served.client.completions.create(model=NAME, prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert by_ids.choices[0].text == plain["choices"][0]["text"]


# ---- n > 1 ----


SEEDED = {"model": NAME, "prompt": "My favourite animal is", "max_tokens": 5, "temperature": 1.0, "seed": 7,
          "extra_body": {"ignore_eos": True, "top_k": 0, "min_p": 0.0}}


def test_n_choices_are_seeded_and_reproducible(served):
    a = served.client.completions.create(n=3, **SEEDED)
    b = served.client.completions.create(n=3, **SEEDED)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1, "three seeds drew the same text"
    assert a.usage.prompt_tokens == len(served.engine.encode(SEEDED["prompt"]))   # once, not three times
    assert a.usage.completion_tokens == 15
    # choice i samples with seed + i: choice 0 is n=1's result, choice 2 that of seed 9 alone
    for i in (0, 2):
        alone = served.client.completions.create(**{**SEEDED, "seed": 7 + i})
        assert alone.choices[0].text == a.choices[i].text


def test_n_choices_share_one_prefill(served, monkeypatch):
    fed: list[tuple[int, int]] = []
    forward = served.engine.forward_batch

    def counting(seqs):
        fed.extend((len(t), p) for t, p, _ in seqs)
        return forward(seqs)

    monkeypatch.setattr(served.engine, "forward_batch", counting)
    n_prompt = len(served.engine.encode(SEEDED["prompt"]))
    copied = served.scheduler.prompt_tokens_copied
    r = served.client.completions.create(n=3, **{**SEEDED, "max_tokens": 2})
    assert len(r.choices) == 3
    prompt_positions = sum(max(0, min(p + t, n_prompt) - p) for t, p in fed)
    # the first choice prefills the prompt; the other two copy it and re-feed only its last token
    assert prompt_positions == n_prompt + 2, fed
    assert served.scheduler.prompt_tokens_copied - copied == 2 * (n_prompt - 1)


def test_n_greedy_choices_equal_one(served):
    # the copied KV must be the prompt's: every greedy choice is the single greedy answer
    one = served.client.chat.completions.create(model=NAME, messages=HI, max_tokens=6, temperature=0)
    three = served.client.chat.completions.create(model=NAME, messages=HI, max_tokens=6, temperature=0, n=3)
    assert [c.message.content for c in three.choices] == [one.choices[0].message.content] * 3
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_streamed_equals_plain(served):
    kw = {"model": NAME, "messages": HI, "max_tokens": 4, "temperature": 1.0, "seed": 3, "n": 2}
    plain = served.client.chat.completions.create(**kw)
    chunks = list(served.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, reasons, roles = ["", ""], [None, None], Counter()
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            roles[c.index] += c.delta.role == "assistant"
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [c.message.content for c in plain.choices]
    assert reasons == [c.finish_reason for c in plain.choices] and roles == Counter({0: 1, 1: 1})
    # usage equal but for the prefix cache: whichever of the two ran second found the prompt cached
    def counts(u):
        return {k: v for k, v in u.model_dump().items() if k != "prompt_tokens_details"}

    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(plain.usage)
    legacy = _sse(served.post("/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "n": 2,
                                                  "stream": True, "ignore_eos": True}))
    assert sorted(c["index"] for p in legacy for c in p["choices"] if c["finish_reason"]) == [0, 1]


# ---- penalties and logit_bias ----

REPEAT = {"prompt": "apple apple apple apple apple apple apple apple", "max_tokens": 8, "temperature": 0,
          "ignore_eos": True, "logprobs": 0}


def _tokens(served, **kw) -> list[str]:
    r = served.post("/v1/completions", {**REPEAT, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def test_frequency_and_presence_penalties_change_repetition_as_expected(served):
    base = _tokens(served)
    most = Counter(base).most_common(1)[0][1]
    for field in ("frequency_penalty", "presence_penalty"):
        fewer = _tokens(served, **{field: 2.0})
        assert Counter(fewer).most_common(1)[0][1] < most, (field, base, fewer)
        assert len(set(fewer)) > len(set(base))
    more = _tokens(served, frequency_penalty=-2.0)   # rewards what it already said
    assert len(set(more)) < len(set(base)), (base, more)


def test_logit_bias_forces_and_bans_a_token(served, id_of):
    forced = served.engine.encode(" banana")[0]
    r = served.client.completions.create(model=NAME, prompt="My favourite fruit is", max_tokens=3, temperature=0.8,
                                         seed=1, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == served.engine.decode([forced]) * 3
    kw = {"model": NAME, "messages": HI, "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    first = served.client.chat.completions.create(**kw).choices[0].logprobs.content[0]
    banned = served.client.chat.completions.create(**kw, logit_bias={str(id_of[first.token]): -100})
    entry = banned.choices[0].logprobs.content[0]
    # greedy without the best token is the second best, and its logprob the model's own (before the bias)
    assert entry.token == first.top_logprobs[1].token != first.token
    assert entry.logprob == pytest.approx(first.top_logprobs[1].logprob, abs=TOL)


# ---- bad values: 400 naming the field ----

BAD = [
    ("/v1/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"5": "x"}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": [5]}, "logit_bias"),
    ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"frequency_penalty": "1"}, "frequency_penalty"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"n": 17}, "n"),
    ("/v1/completions", {"n": "2"}, "n"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
]


@pytest.mark.parametrize("path,extra,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_values_are_400_naming_the_field(served, path, extra, param):
    body = {"max_tokens": 1, **({"prompt": "hi"} if path == "/v1/completions" else {"messages": HI}), **extra}
    r = served.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"] and err["type"] == "invalid_request_error"


def test_docs_table_lists_these_fields_and_none_is_refused():
    from vkpack.runtime.server.parse import UNSUPPORTED_FIELDS

    doc = (DOCS / "SERVER.md").read_text()
    table = doc.split("### Choices, penalties, logprobs and echo", 1)[1].split("\n\n", 2)[1]
    fields = {f for row in table.splitlines()[2:] for f in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert fields == {"n", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                      "top_logprobs", "echo"}
    assert not fields & set(UNSUPPORTED_FIELDS)
    refused = doc.split("rather than silently ignored:", 1)[1].split(". They", 1)[0]
    assert set(re.findall(r"`(\w+)`", refused)) == set(UNSUPPORTED_FIELDS)


# ---- the scheduler's per-sequence logits mask (for grammar-constrained decoding) ----


class OnlyThese:
    """A LogitsMask that allows two tokens and records what it was told."""

    def __init__(self, allowed: list[int]):
        self.allowed, self.accepted = allowed, []

    def apply(self, logits: np.ndarray) -> np.ndarray:
        out = np.full_like(logits, -np.inf)
        out[self.allowed] = logits[self.allowed]
        return out

    def accept(self, token: int) -> None:
        self.accepted.append(token)


def test_logits_mask_hook_constrains_each_choice(ref):
    allowed = [ref.encode(" yes")[0], ref.encode(" no")[0]]
    made: list[OnlyThese] = []

    def factory() -> OnlyThese:
        made.append(OnlyThese(allowed))
        return made[-1]

    events, done = [], threading.Event()

    def emit(ev):
        events.append(ev)
        if sum(isinstance(e, Finished) for e in events) == 2:
            done.set()

    sched = Scheduler(ref, max_batch=4).start()
    try:
        sched.submit(GenRequest(ref.encode("Is Paris in France? Answer:"), SamplingParams(temperature=1.0, seed=2), 5,
                                emit, ignore_eos=True, n=2, logprobs=0, logits_mask=factory))
        assert done.wait(120)
    finally:
        sched.stop()
    assert len(made) == 2   # one mask per choice
    for i, mask in enumerate(made):
        lps = [e for ev in events if isinstance(ev, Piece) and ev.index == i for e in ev.logprobs]
        assert [e.token for e in lps] == mask.accepted and len(mask.accepted) == 5
        assert set(mask.accepted) <= set(allowed)
        # logprobs are the model's raw distribution: the two allowed tokens do not hold all the mass
        assert all(e.logprob < 0 for e in lps)
        assert all(np.exp(e.logprob) < 0.999 for e in lps)
