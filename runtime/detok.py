"""Streaming detokenization and stop strings: emit only complete, final text.

Byte-level BPE splits one character (emoji, CJK) over several tokens, and decoding a
partial byte run yields U+FFFD. `StreamDecoder` re-decodes a short window of recent ids
and holds text back while the window ends with U+FFFD (the approach of HF TGI and
vLLM). Decoding a window with one token of left context, instead of single tokens,
keeps leading-space rules (Metaspace, ByteLevel) identical to a full decode.

`StopMatcher` implements OpenAI's stop semantics: output ends just before the first
stop string, which is not emitted; text that might begin a stop string is held back
until it is known not to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vkpack.pack_format.errors import VkpackError

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Turn token ids, one at a time, into text pieces whose concatenation is the full decode.

    Args:
        tokenizer: a `tokenizers.Tokenizer` (anything with `decode(ids, skip_special_tokens=)`).
        skip_special_tokens: passed through to `decode`.
        context_ids: ids already shown to the user (e.g. the prompt's last few tokens);
            they give the first generated token its left context and are never emitted.

    Example:
        >>> dec = StreamDecoder(tok)                          # doctest: +SKIP
        >>> "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)  # doctest: +SKIP
        True
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True,
                 context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # ids[prefix:read] were already emitted and serve as context; ids[read:] are pending.
        self._ids: list[int] = [int(i) for i in context_ids]
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (possibly with U+FFFD if the bytes never completed)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if not final and (len(after) <= len(before) or after.endswith(REPLACEMENT)):
            return ""  # nothing new, or the last character is still incomplete
        # Emitted text is final: if more context ever changed `before`, keep the tail only.
        new = after[len(before):]
        # Keep the just-emitted tokens as the next window's left context.
        self._prefix, self._read = self._read, len(self._ids)
        return new


class StopError(VkpackError, ValueError):
    """A stop string list that cannot work (an empty string would stop before any output)."""


class StopMatcher:
    """Cut streamed text at the first stop string, holding back possible stop prefixes.

    Attributes:
        matched: the stop string that ended the stream, or None.

    Example:
        >>> m = StopMatcher(["</s>"])
        >>> m.feed("Hello </"), m.feed("s> more")
        (('Hello ', False), ('', True))
    """

    def __init__(self, stops: Iterable[str]):
        if isinstance(stops, str):
            stops = (stops,)
        self.stops: tuple[str, ...] = tuple(stops)
        for s in self.stops:
            if not isinstance(s, str) or not s:
                raise StopError(f"stop strings must be non-empty str, got {s!r}")
        self._held = ""
        self.matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was hit)."""
        if self.matched is not None:
            return "", True
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf, False
        # Earliest occurrence wins; on a tie the longer stop string (it contains the other).
        hit, hit_at = None, -1
        for s in self.stops:
            at = buf.find(s)
            if at != -1 and (hit is None or at < hit_at or (at == hit_at and len(s) > len(hit))):
                hit, hit_at = s, at
        if hit is not None:
            self.matched, self._held = hit, ""
            return buf[:hit_at], True
        hold = max(_partial_suffix(buf, s) for s in self.stops)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """At end of generation: release held text (it never became a stop string)."""
        out, self._held = ("" if self.matched is not None else self._held), ""
        return out


def _partial_suffix(buf: str, stop: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(buf)), 0, -1):
        if buf.endswith(stop[:n]):
            return n
    return 0
