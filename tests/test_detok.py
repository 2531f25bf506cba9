"""Streaming detokenization on a real byte-level BPE, and OpenAI-style stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from vkpack.pack_format.errors import VkpackError
from vkpack.runtime.detok import StopError, StopMatcher, StreamDecoder

TEXTS = [
    "Hello 🎉 世界! café 👩‍👩‍👧 naïve 𝄞 end",
    "你好世界 こんにちは 🚀🚀 ok",
    "plain ascii, no surprises",
    "🎉",
]


def _byte_level_bpe(vocab_size: int) -> Tokenizer:
    """GPT-2 style tokenizer; vocab_size 257 leaves bytes only (no merges), so every
    non-ASCII character spans several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog, hello world"] * 20
    corpus += ["你好世界 こんにちは 🎉🚀 café"] * 3
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="module", params=[257, 400], ids=["bytes-only", "merged"])
def tok(request) -> Tokenizer:
    return _byte_level_bpe(request.param)


def _stream(tok: Tokenizer, ids, **kw) -> list[str]:
    dec = StreamDecoder(tok, **kw)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_without_broken_chars(tok, text):
    ids = tok.encode(text).ids
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_characters_really_span_tokens(tok):
    # Guards the test above: single-token decodes of an emoji do break.
    ids = tok.encode("👩").ids
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("hi 🎉").ids + [tok.token_to_id("<|endoftext|>")]
    assert "".join(_stream(tok, ids)) == "hi 🎉"
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == "hi 🎉<|endoftext|>"


def test_flush_releases_an_incomplete_character(tok):
    ids = tok.encode("ok 🎉").ids[:-1]  # stream cut inside the emoji's bytes
    dec = StreamDecoder(tok)
    streamed = "".join(dec.push(i) for i in ids)
    assert "\ufffd" not in streamed
    assert streamed + dec.flush() == tok.decode(ids)
    assert dec.flush() == ""


def test_context_ids_are_not_emitted(tok):
    ids = tok.encode("prompt text 世界 and the answer 🎉").ids
    full, head = tok.decode(ids), tok.decode(ids[:4])
    assert "".join(_stream(tok, ids[4:], context_ids=ids[:4])) == full[len(head):]


# ---- StopMatcher ----


def _feed_all(m: StopMatcher, pieces) -> tuple[str, bool]:
    out, stopped = [], False
    for p in pieces:
        emit, stopped = m.feed(p)
        out.append(emit)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped


def test_stop_split_across_pieces_is_held_then_cut():
    m = StopMatcher(["</s>"])
    assert m.feed("Hello <") == ("Hello ", False)   # "<" might start "</s>"
    assert m.feed("/") == ("", False)
    assert m.feed("s> ignored") == ("", True)
    assert m.matched == "</s>" and m.stopped
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_held_text_released_when_it_does_not_match():
    m = StopMatcher(["</s>"])
    assert m.feed("a </") == ("a ", False)
    assert m.feed("b") == ("</b", False)
    assert m.feed("x <") == ("x ", False)
    assert m.flush() == "<"
    assert not m.stopped and m.matched is None


def test_earliest_stop_wins_and_is_not_emitted():
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("one\n\ntwo END") == ("one", True)
    assert m.matched == "\n\n"


def test_stop_at_start_and_no_stops():
    assert StopMatcher(["x"]).feed("xyz") == ("", True)
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False) and m.flush() == ""
    assert StopMatcher("###").feed("a##") == ("a", False)  # a single str is one stop


def test_empty_stop_string_rejected():
    with pytest.raises(StopError, match="non-empty") as ei:
        StopMatcher(["ok", ""])
    assert isinstance(ei.value, VkpackError)


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_match_whole_text_semantics(seed):
    rnd = random.Random(seed)
    stops = ["<|im_end|>", "\nUser:", "🎉🎉"]
    text = rnd.choice([
        "answer with <|im_e and more <|im_end|> hidden",
        "line\nUse\nUser: hidden",
        "no stop at all <|im_en",
        "party 🎉 and 🎉🎉 hidden",
    ])
    cuts = sorted(rnd.sample(range(1, len(text)), k=min(6, len(text) - 1)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    hits = [text.find(s) for s in stops if s in text]
    expected = text[:min(hits)] if hits else text
    assert _feed_all(StopMatcher(stops), pieces) == (expected, bool(hits))
