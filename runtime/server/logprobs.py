"""Log-probabilities for `logprobs` / `top_logprobs`: exact numbers, and each token's text and bytes.

Which distribution: the model's own, `log_softmax` of the raw logits in float64, before the
logit bias, the penalties, the temperature and any truncation (vLLM's default, `raw_logprobs`).
So a logprob says what the model thinks of a token, whatever the sampling settings made of it,
and `top_logprobs` lists the model's most likely tokens, not the ones that could be drawn.

A token's bytes come from the tokenizer's vocabulary (byte-level BPE maps each byte to one
printable character; SentencePiece writes a space as U+2581 and a lone byte as `<0xNN>`), so a
token that carries half of a UTF-8 character still gets its exact bytes; its `token` string is
then OpenAI's `bytes:\\xNN...` form.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_TOP_CHAT = 20           # OpenAI's bound on chat `top_logprobs`
MAX_TOP_COMPLETIONS = 5     # ... and on the legacy completions' `logprobs`


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its logprob, and the `top` most likely (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def log_softmax(row: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of one logits row (float32 [vocab] as the sampler saw it)."""
    x = np.asarray(row, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def score(row: np.ndarray, token: int, k: int) -> TokenLogprob:
    """`token`'s logprob under `row`'s distribution and the `k` most likely tokens (ties: lower id first)."""
    lp = log_softmax(row)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        best = np.argpartition(lp, lp.size - k)[lp.size - k:] if k < lp.size else np.arange(lp.size)
        best = best[np.lexsort((best, -lp[best]))]
        top = tuple((int(i), float(lp[i])) for i in best)
    return TokenLogprob(int(token), float(lp[token]), top)


# ---- token ids as text and bytes ----


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character each byte is written as -> the byte."""
    direct = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in direct}
    extra = 0
    for b in range(256):
        if b not in direct:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Token id -> (`token` string, exact bytes), cached; built from the archive's tokenizer JSON."""

    def __init__(self, tokenizer: Any, tokenizer_json: str):
        self.tok = tokenizer
        decoder = json.loads(tokenizer_json).get("decoder") or {}
        steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {d.get("type") for d in steps if isinstance(d, dict)}
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.replace = [(d["pattern"].get("String"), d.get("content", "")) for d in steps
                        if isinstance(d, dict) and d.get("type") == "Replace" and isinstance(d.get("pattern"), dict)
                        and isinstance(d["pattern"].get("String"), str)]
        self.added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._table = _byte_level_table() if self.byte_level else {}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        hit = self._cache.get(token)
        if hit is None:
            raw = self._bytes(token)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a character: OpenAI's spelling of raw bytes
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token] = (text, raw)
        return hit

    def _bytes(self, token: int) -> bytes:
        if token in self.added:
            return self.added[token].encode()
        piece = self.tok.id_to_token(token)
        if piece is None:
            return b""
        if self.byte_level and all(c in self._table for c in piece):
            return bytes(self._table[c] for c in piece)
        if self.byte_fallback:
            m = _BYTE_TOKEN.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            for pattern, content in self.replace:
                piece = piece.replace(pattern, content)
            return piece.encode()
        return self.tok.decode([token], skip_special_tokens=False).encode()
