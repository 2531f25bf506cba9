"""The `logprobs` objects of OpenAI's two APIs, from the scheduler's `TokenLogprob`s.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
Completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, parallel lists,
`top_logprobs[i]` a `{token string: logprob}` dict of the k most likely plus the chosen token (as
OpenAI and vLLM give it), and for an echoed prompt's first token `None` twice (nothing precedes it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .logprobs import TokenLogprob

TextOf = Callable[[int], tuple[str, bytes]]


def chat_logprobs(entries: Sequence[TokenLogprob], text_of: TextOf) -> dict[str, Any]:
    """The chat `logprobs` object of some generated tokens."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = text_of(token)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


class LegacyLogprobs:
    """One choice's completions-API `logprobs`, built in order (the echoed prompt, then each piece).

    `text_offset` is where each token's text starts: echoed prompt tokens count from 0 by the lengths
    of their `tokens` strings (vLLM's rule), generated ones from the echoed text's length (0 without
    echo) the same way, so it is the offset into `text` except where a token holds part of a
    character (its string is then `bytes:...`)."""

    def __init__(self, text_of: TextOf):
        self.text_of = text_of
        self.offset = 0

    def prompt(self, ids: Sequence[int], entries: Sequence[TokenLogprob | None], echo_text: str) -> dict[str, Any]:
        """The echoed prompt's part: `entries[i]` scores `ids[i]` (None for the first)."""
        out = _empty()
        for tok, e in zip(ids, entries, strict=True):
            self._add(out, tok, None if e is None else e.logprob, None if e is None else e.top)
        self.offset = len(echo_text)
        return out

    def part(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The part for some generated tokens (a stream chunk's, or all of them)."""
        out = _empty()
        for e in entries:
            self._add(out, e.token, e.logprob, e.top)
        return out

    def _add(self, out: dict[str, list[Any]], tok: int, logprob: float | None,
             top: tuple[tuple[int, float], ...] | None) -> None:
        text = self.text_of(tok)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        if top is None or logprob is None:
            out["top_logprobs"].append(None)
        else:
            best: dict[str, float] = {}
            for t, lp in top:
                best.setdefault(self.text_of(t)[0], lp)
            best.setdefault(text, logprob)
            out["top_logprobs"].append(best)
        out["text_offset"].append(self.offset)
        self.offset += len(text)


def merge(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Two legacy parts as one (the echoed prompt's, then the completion's)."""
    return {k: a[k] + b[k] for k in a}


def _empty() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
