"""Pick the next token from a logits vector, the way llama.cpp and vLLM users expect.

Order (fixed, so results are comparable across runs and engines):
logit bias -> repetition penalty -> presence and frequency penalties -> greedy if
temperature == 0 -> top-k -> softmax at temperature -> top-p -> min-p -> draw from
`Generator(PCG64(seed))`.

Why this order: the bias and the penalties must see raw logits (llama.cpp divides positive
ones and multiplies negative ones; OpenAI subtracts the presence and frequency terms from
the logits, and adds the bias "prior to sampling"); top-p and min-p are measured on the temperature-scaled
distribution, as in vLLM. top-k uses `argpartition`, so a 150k vocab is never fully
sorted when top_k is set; min-p is applied as a threshold before the sort because,
after top-p, it only ever shortens the same sorted prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from vkpack.pack_format.errors import VkpackError


_TOP_P_PEEK = 1024  # candidates tried before a full sort when top_k is off


class SamplingError(VkpackError, ValueError):
    """Bad sampling parameters or inputs; a ValueError too, so HTTP layers can map it to 400."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; defaults follow llama.cpp, `temperature=0` means greedy.

    `top_k <= 0`, `top_p == 1`, `min_p == 0` and `repeat_penalty == 1` each disable their
    stage. `repeat_last_n == -1` penalises the whole history, `0` disables the penalty.
    `seed=None` draws from OS entropy. `max_tokens` and `stop` are carried for the engine;
    the sampler itself does not use them.

    `presence_penalty` and `frequency_penalty` (OpenAI's, in [-2, 2]) count the tokens this
    sampler has drawn, never the prompt (vLLM's rule): logit -= frequency * count + presence
    * (count > 0). `logit_bias` is ((token id, bias in [-100, 100]), ...), added to the logits
    first (a dict {id: bias} is accepted and stored sorted).

    Example:
        >>> SamplingParams(temperature=0.0).temperature
        0.0
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        # OpenAI's API allows `stop` as one string or a list; store a tuple either way.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        """Raise SamplingError naming the first bad field and its value."""
        _check_real("temperature", self.temperature, lo=0.0)
        _check_int("top_k", self.top_k)
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_real("min_p", self.min_p)
        if not 0.0 <= self.min_p < 1.0:
            raise SamplingError(f"min_p must be in [0, 1), got {self.min_p!r}")
        _check_real("repeat_penalty", self.repeat_penalty)
        if self.repeat_penalty <= 0.0:
            raise SamplingError(f"repeat_penalty must be > 0, got {self.repeat_penalty!r}")
        _check_int("repeat_last_n", self.repeat_last_n)
        if self.repeat_last_n < -1:
            raise SamplingError(
                f"repeat_last_n must be >= -1 (-1 = whole history), got {self.repeat_last_n!r}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed)
            if self.seed < 0:
                raise SamplingError(f"seed must be >= 0 or None, got {self.seed!r}")
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingError(f"stop strings must be non-empty str, got {s!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check_real(name, v)
            if not -2.0 <= v <= 2.0:
                raise SamplingError(f"{name} must be in [-2, 2], got {v!r}")
        if not isinstance(self.logit_bias, tuple):
            raise SamplingError(f"logit_bias must be ((token id, bias), ...), got {self.logit_bias!r}")
        for entry in self.logit_bias:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise SamplingError(f"logit_bias entries must be (token id, bias), got {entry!r}")
            tok, bias = entry
            _check_int("logit_bias", tok)
            _check_real("logit_bias", bias)
            if tok < 0 or not -100.0 <= bias <= 100.0:
                raise SamplingError(f"logit_bias must map token ids >= 0 to biases in [-100, 100], "
                                    f"got {tok!r}: {bias!r}")


def _check_real(name: str, value: object, lo: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise SamplingError(f"{name} must be >= {lo}, got {value!r}")


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SamplingError(f"{name} must be an int, got {value!r}")


DEFAULT_PARAMS = SamplingParams()
"""The one table of sampling defaults (llama-server's): `vkpack run`'s flags, the fields a `vkpack serve`
request leaves out, and `Engine.stream`'s arguments all read it, so one prompt samples alike everywhere
(docs/SERVER.md, "Sampling defaults")."""


class Sampler:
    """Stateful sampler: owns the RNG and the counts of the tokens it drew (for the presence and
    frequency penalties), so one Sampler per sequence keeps seeds reproducible.

    `last_token` is the id the latest `sample` returned (None before the first).

    Example:
        >>> s = Sampler(SamplingParams(seed=0))
        >>> s.sample(np.array([0.0, 5.0, 1.0], dtype=np.float32), history=[])
        1
    """

    def __init__(self, params: SamplingParams | None = None):
        self.params = params if params is not None else SamplingParams()
        self.params.validate()
        self._rng = np.random.Generator(np.random.PCG64(self.params.seed))
        self._counts: dict[int, int] = {}      # token id -> times drawn
        bias = self.params.logit_bias
        self._bias_ids = np.array([t for t, _ in bias], dtype=np.int64)
        self._bias = np.array([b for _, b in bias], dtype=np.float32)
        self.last_token: int | None = None

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Return the next token id.

        Args:
            logits: shape (vocab,), any float dtype; not modified.
            history: token ids seen so far (prompt + generated), for the repetition penalty.
        """
        x = np.asarray(logits)
        if x.ndim != 1 or x.size == 0:
            raise SamplingError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if np.isnan(x).any():
            raise SamplingError("logits contain NaN")
        x = self._bias_logits(x)
        x = self._penalize(x, history)
        x = self._penalize_drawn(x)
        tok = self._pick(x)
        self._counts[tok] = self._counts.get(tok, 0) + 1
        self.last_token = tok
        return tok

    def _pick(self, x: np.ndarray) -> int:
        """Greedy, or the truncations and a draw, over adjusted logits."""
        p = self.params
        if p.temperature == 0.0 or p.top_k == 1:
            return int(np.argmax(x))
        if not np.isfinite(x.max()):
            raise SamplingError(f"logits max is {x.max()}, expected a finite value")

        # ---- top-k: (k,) candidate ids, unsorted ----
        vocab = x.size
        if 0 < p.top_k < vocab:
            ids = np.argpartition(x, vocab - p.top_k)[vocab - p.top_k:]
            cand = x[ids]
        else:
            ids = None
            cand = x

        # ---- softmax at temperature, float64 for a stable normaliser ----
        z = cand.astype(np.float64) / p.temperature
        e = np.exp(z - z.max())          # the best candidate has e == 1
        total = e.sum()                  # normaliser over all candidates, kept for top-p

        # ---- min-p as a threshold on prob / max_prob == e ----
        keep = np.flatnonzero(e >= p.min_p) if p.min_p > 0.0 else None
        if keep is not None:
            e = e[keep]
            ids = keep if ids is None else ids[keep]
        if ids is None:
            ids = np.arange(vocab)
        if p.top_p < 1.0 and e.size > 4 * _TOP_P_PEEK:
            # Without top-k, avoid sorting the whole vocab: if the best few hold top_p of the
            # mass, the top-p prefix lies among them (exact, not an approximation).
            best = np.argpartition(e, e.size - _TOP_P_PEEK)[e.size - _TOP_P_PEEK:]
            if e[best].sum() >= p.top_p * total:
                e, ids = e[best], ids[best]

        # Sort survivors by probability, ties by lower token id, so draws are well defined.
        order = np.lexsort((ids, -e))
        e, ids = e[order], ids[order]

        # ---- top-p: the smallest prefix whose mass reaches top_p ----
        if p.top_p < 1.0:
            n = int(np.searchsorted(np.cumsum(e) / total, p.top_p, side="left")) + 1
            e, ids = e[:n], ids[:n]

        cdf = np.cumsum(e)
        r = self._rng.random() * cdf[-1]
        i = min(int(np.searchsorted(cdf, r, side="right")), len(ids) - 1)
        return int(ids[i])

    def _bias_logits(self, x: np.ndarray) -> np.ndarray:
        """OpenAI's logit_bias: the bias added to each listed token's logit."""
        if not self._bias_ids.size:
            return x
        if self._bias_ids[-1] >= x.size:  # sorted ids: the last is the largest
            raise SamplingError(f"logit_bias token id {int(self._bias_ids[-1])} outside vocab of size {x.size}")
        x = x.copy()
        x[self._bias_ids] += self._bias
        return x

    def _penalize_drawn(self, x: np.ndarray) -> np.ndarray:
        """OpenAI's presence and frequency penalties over the tokens this sampler drew."""
        p = self.params
        if not self._counts or (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0):
            return x
        ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
        x = x.copy()
        x[ids] -= counts * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)
        return x

    def _penalize(self, x: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """llama.cpp's penalty: logit / rp if positive else logit * rp, once per distinct id."""
        p = self.params
        if p.repeat_penalty == 1.0 or p.repeat_last_n == 0 or len(history) == 0:
            return x
        if p.repeat_last_n != -1:
            try:
                history = history[-p.repeat_last_n:]
            except TypeError:  # a deque or other unsliceable sequence
                history = list(history)[-p.repeat_last_n:]
        recent = history
        ids = np.unique(np.asarray(recent, dtype=np.int64))
        if ids.size and (ids[0] < 0 or ids[-1] >= x.size):
            bad = ids[0] if ids[0] < 0 else ids[-1]
            raise SamplingError(f"history token id {int(bad)} outside vocab of size {x.size}")
        x = x.copy()
        v = x[ids]
        x[ids] = np.where(v > 0, v / p.repeat_penalty, v * p.repeat_penalty)
        return x
