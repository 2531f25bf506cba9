"""Sampler: greedy, seeded draws, top-k/top-p/min-p filtering, repetition, presence and frequency penalties,
logit bias, validation."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from vkpack.pack_format.errors import VkpackError
from vkpack.runtime.sampler import Sampler, SamplingError, SamplingParams


def _logits_from_probs(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def _draws(params: SamplingParams, logits, n: int = 4000, history=()) -> Counter:
    s = Sampler(params)
    return Counter(s.sample(logits, history) for _ in range(n))


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = rng.standard_normal(1000).astype(np.float32)
        assert Sampler(SamplingParams(temperature=0.0)).sample(x, []) == int(np.argmax(x))


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(5000).astype(np.float32)
    s = Sampler(SamplingParams(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=3))
    assert {s.sample(x, []) for _ in range(50)} == {int(np.argmax(x))}


def test_same_seed_same_tokens_and_different_seed_differs():
    x = np.zeros(100, dtype=np.float32)  # uniform: draws depend only on the RNG
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a = [Sampler(p).sample(x, []) for _ in range(1)]
    s1, s2 = Sampler(p), Sampler(p)
    seq1 = [s1.sample(x, []) for _ in range(50)]
    seq2 = [s2.sample(x, []) for _ in range(50)]
    assert seq1 == seq2 and a[0] == seq1[0]
    s3 = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=99))
    assert [s3.sample(x, []) for _ in range(50)] != seq1


def test_top_k_only_draws_from_k_best():
    x = np.arange(50, dtype=np.float32) * 0.01  # nearly flat, best ids are 49, 48, 47
    c = _draws(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=0), x, 600)
    assert set(c) == {47, 48, 49}


def test_top_p_excludes_tail():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps {0, 1} (0.5 + 0.3 passes 0.75).
    x = _logits_from_probs([0.5, 0.3, 0.15, 0.05])
    c = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0, seed=7), x)
    assert set(c) == {0, 1}
    assert abs(c[0] / sum(c.values()) - 0.5 / 0.8) < 0.03   # renormalised 0.625
    # top_p = 1 keeps everything, in proportion.
    c = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7), x)
    assert set(c) == {0, 1, 2, 3}
    assert abs(c[3] / sum(c.values()) - 0.05) < 0.015


def test_min_p_excludes_tokens_below_fraction_of_best():
    # max prob 0.5; min_p=0.2 keeps tokens with p >= 0.1: ids 0, 1, 2 (not 3 at 0.05).
    x = _logits_from_probs([0.5, 0.3, 0.15, 0.05])
    c = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=5), x)
    assert set(c) == {0, 1, 2}
    # With top-k set too, the same survivors.
    c = _draws(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.2, seed=5), x, 1000)
    assert set(c) == {0, 1, 2}


def test_temperature_sharpens_distribution():
    x = _logits_from_probs([0.6, 0.4])
    hot = _draws(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), x)
    cold = _draws(SamplingParams(temperature=0.25, top_k=0, top_p=1.0, min_p=0.0, seed=1), x)
    assert cold[0] / 4000 > 0.8 > hot[0] / 4000 > 0.5


def test_repetition_penalty_changes_argmax():
    x = np.array([2.0, 1.8, -1.0, -1.1], dtype=np.float32)
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=64)
    assert Sampler(greedy).sample(x, []) == 0
    assert Sampler(greedy).sample(x, [0]) == 1          # 2.0 / 1.3 < 1.8
    # Negative logits are multiplied (pushed further down), not divided toward zero.
    y = np.array([-1.0, -1.1], dtype=np.float32)
    assert Sampler(greedy).sample(y, [0]) == 1          # -1.3 < -1.1
    # Penalty 1.0 disables; a token outside the last n is not penalised.
    assert Sampler(SamplingParams(temperature=0.0)).sample(x, [0]) == 0
    short = SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=1)
    assert Sampler(short).sample(x, [0, 3]) == 0
    # Repeats in history are penalised once, like llama.cpp.
    assert Sampler(greedy).sample(np.array([2.0, 1.0], np.float32), [0, 0, 0, 0]) == 0


def test_input_logits_not_modified():
    x = np.array([3.0, 1.0], dtype=np.float32)
    Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0)).sample(x, [0])
    assert x.tolist() == [3.0, 1.0]


def test_masked_logits_never_drawn():
    x = np.full(1000, -np.inf, dtype=np.float32)
    x[[10, 20]] = [0.0, 0.1]
    c = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=2), x, 500)
    assert set(c) == {10, 20}


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": 1.0}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"top_k": 2.5}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ("",)}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": float("inf")}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"logit_bias": {3: 100.5}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {2.0: 1.0}}, "logit_bias"),
    ({"logit_bias": ((1, float("nan")),)}, "logit_bias"),
    ({"logit_bias": [(1, 1.0)]}, "logit_bias"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(SamplingError) as ei:
        SamplingParams(**kwargs)
    msg = str(ei.value)
    assert msg.startswith(field) and "\n" not in msg
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, VkpackError)


def test_stop_accepts_a_single_string_or_list():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_bad_inputs():
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.1))
    with pytest.raises(SamplingError, match="NaN"):
        s.sample(np.array([0.0, np.nan], np.float32), [])
    with pytest.raises(SamplingError, match="1-D"):
        s.sample(np.zeros((2, 2), np.float32), [])
    with pytest.raises(SamplingError, match="history token id 5"):
        s.sample(np.zeros(3, np.float32), [5])


def test_fast_on_150k_vocab():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(151_936).astype(np.float32) * 3
    hist = rng.integers(0, x.size, 512).tolist()
    s = Sampler(SamplingParams(seed=0, repeat_penalty=1.1))  # llama.cpp-like defaults
    s.sample(x, hist)
    t = time.perf_counter()
    for _ in range(20):
        s.sample(x, hist)
    per_call = (time.perf_counter() - t) / 20
    assert per_call < 0.02, f"{per_call * 1e3:.1f} ms per sample"


def _reference_sample(x, p: SamplingParams, rng) -> int:
    """Full-sort reference (no shortcuts) for temperature > 0, top_k off."""
    z = x.astype(np.float64) / p.temperature
    e = np.exp(z - z.max())
    total = e.sum()
    order = np.lexsort((np.arange(x.size), -e))
    e, ids = e[order], order
    n = int(np.searchsorted(np.cumsum(e) / total, p.top_p, side="left")) + 1
    e, ids = e[:n], ids[:n]
    e, ids = e[e >= p.min_p], ids[e >= p.min_p]
    cdf = np.cumsum(e)
    return int(ids[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), n - 1)])


@pytest.mark.parametrize("scale", [1.0, 12.0])  # flat (full sort) and peaked (shortcut) cases
def test_matches_full_sort_reference(scale):
    x = (np.random.default_rng(4).standard_normal(20_000) * scale).astype(np.float32)
    p = SamplingParams(temperature=0.9, top_k=0, top_p=0.9, min_p=0.0, seed=11)
    s, rng = Sampler(p), np.random.Generator(np.random.PCG64(11))
    assert [s.sample(x, []) for _ in range(200)] == [_reference_sample(x, p, rng) for _ in range(200)]


# ---- OpenAI's presence and frequency penalties, and logit_bias ----


def _greedy_run(params: SamplingParams, x: np.ndarray, n: int, history=()) -> list[int]:
    s = Sampler(params)
    return [s.sample(x, history) for _ in range(n)]


def test_frequency_penalty_subtracts_per_draw():
    # logit0 = 5 - 0.3 * count: 5, 4.7 beat 4.5; at 4.4 token 1 wins; then 1 at 4.2 loses to 4.4
    x = np.array([5.0, 4.5, 0.0], np.float32)
    assert _greedy_run(SamplingParams(temperature=0, frequency_penalty=0.3), x, 4) == [0, 0, 1, 0]
    # a negative penalty makes a drawn token ever more likely
    assert _greedy_run(SamplingParams(temperature=0, frequency_penalty=-2.0), np.array([4.5, 5.0], np.float32), 5) \
        == [1] * 5


def test_presence_penalty_subtracts_once():
    # after one draw of 0: 5 - 0.6 = 4.4 < 4.5 -> 1; then both drawn: 4.4 vs 3.9 -> 0, and so on, never lower
    x = np.array([5.0, 4.5, 0.0], np.float32)
    assert _greedy_run(SamplingParams(temperature=0, presence_penalty=0.6), x, 5) == [0, 1, 0, 0, 0]


def test_presence_and_frequency_count_drawn_tokens_not_the_history():
    # vLLM's rule: the prompt (history) is not penalised by these two, only by repeat_penalty
    x = np.array([5.0, 4.5], np.float32)
    s = Sampler(SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0))
    assert s.sample(x, [0] * 50) == 0
    assert s.sample(x, [0] * 50) == 1
    assert s.last_token == 1


def test_penalties_apply_before_temperature_sampling():
    # equal logits; once a token is drawn, a presence penalty of 2 leaves it p = e^-2 / (e^-2 + 1) ~ 0.119
    # of being drawn again at temperature 1 (0.5 without the penalty)
    x = np.zeros(2, np.float32)
    again = 0
    for seed in range(600):
        s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=2.0, seed=seed))
        again += s.sample(x) == s.sample(x)
    assert 0.08 < again / 600 < 0.16


def test_logit_bias_forces_and_bans():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(500).astype(np.float32)
    low = int(np.argmin(x))
    forced = _draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1, logit_bias={low: 100}), x, 300)
    assert forced == Counter({low: 300})
    best = int(np.argmax(x))
    banned = Sampler(SamplingParams(temperature=0, logit_bias={best: -100})).sample(x)
    assert banned != best and banned == int(np.argsort(x)[-2])
    # a small bias shifts the argmax exactly by its amount
    gap = float(x[best] - x[banned])
    assert Sampler(SamplingParams(temperature=0, logit_bias={banned: gap + 1e-3})).sample(x) == banned
    assert Sampler(SamplingParams(temperature=0, logit_bias={banned: gap - 1e-3})).sample(x) == best
    assert x[best] == float(np.max(x))  # the caller's logits untouched


def test_logit_bias_is_stored_sorted_and_checked_against_the_logits():
    p = SamplingParams(logit_bias={9: 1.0, 2: -3})
    assert p.logit_bias == ((2, -3), (9, 1.0))
    with pytest.raises(SamplingError, match="logit_bias token id 9 outside vocab of size 5"):
        Sampler(p).sample(np.zeros(5, np.float32))
