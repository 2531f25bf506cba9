"""The per-token loop of one sequence: sample, stop (EOS, stop strings, max tokens), detokenize.

`Engine.stream` and the server's batch scheduler both drive generation through `TokenStream`,
so a sequence ends, and its text comes out, the same way whichever runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .detok import StopMatcher, StreamDecoder
from .sampler import Sampler, SamplingParams


class TokenStream:
    """One sequence's generation state. Feed each pass's logits to `push`; it returns the text
    completed so far (never a broken UTF-8 character, never part of a stop string) and sets
    `finish_reason` ("stop": EOS or a stop string; "length": max_tokens) when the sequence ends.

    `history` is the prompt and every generated token (what the KV cache must hold); `generated`
    the generated ids alone (the EOS that ended it excluded).
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int,
                 eos_ids: set[int], stop: Sequence[str] = (), ignore_eos: bool = False):
        self.sampler = Sampler(params)
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True, context_ids=list(prompt_ids)[-4:])
        self.stops = StopMatcher(list(stop)) if stop else None
        self.history = list(prompt_ids)
        self.generated: list[int] = []
        self.max_tokens = max_tokens
        self.eos_ids = eos_ids
        self.ignore_eos = ignore_eos
        self.finish_reason: str | None = None

    def keep_special(self, ids: Iterable[int]) -> None:
        """Keep the text of these special tokens in the output, other special tokens still skipped: a
        tool-call marker that is a control token (Mistral's `[TOOL_CALLS]`, Llama 3's `<|python_tag|>`)
        must reach the tool-call parser. Call before the first `push`."""
        if self.generated:
            raise RuntimeError("keep_special must be called before generation starts")
        keep = _KeepSpecial(self.decoder.tokenizer, ids)
        self.decoder = StreamDecoder(keep, skip_special_tokens=True, context_ids=self.history[-4:])

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, logits: np.ndarray) -> str:
        """Sample the next token from `logits` (float32 [vocab]); the text it completes."""
        tok = self.sampler.sample(logits, self.history)
        if tok in self.eos_ids and not self.ignore_eos:
            self.finish_reason = "stop"
            return self._tail()
        self.history.append(tok)
        self.generated.append(tok)
        piece = self.decoder.push(tok)
        if self.stops is not None:
            piece, stopped = self.stops.feed(piece)
            if stopped:
                self.finish_reason = "stop"
                return piece
        if len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
            return piece + self._tail()
        return piece

    def _tail(self) -> str:
        """The text held back for completion at the end (a stop string found in it ends it there)."""
        tail = self.decoder.flush()
        if self.stops is not None:
            tail, stopped = self.stops.feed(tail)
            if stopped:
                self.finish_reason = "stop"
            else:
                tail += self.stops.flush()
        return tail


class _KeepSpecial:
    """A tokenizer whose `decode` writes the given special tokens' text and skips the rest as asked."""

    def __init__(self, tokenizer: Any, ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.text = {int(i): tokenizer.id_to_token(int(i)) for i in ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out, run = [], []
        for i in ids:
            if i in self.text:
                out += [self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens), self.text[i]]
                run = []
            else:
                run.append(i)
        out.append(self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens))
        return "".join(out)
