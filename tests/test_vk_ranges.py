"""The recorder's hazard index (runtime/vk/recorder.py `_Ranges`): merged intervals answer "does this range
overlap anything recorded since the last barrier" as the pairwise check over every recorded range does."""

from __future__ import annotations

import random

from vkpack.runtime.vk.recorder import _Ranges


def test_ranges_answer_as_the_pairwise_check():
    rng = random.Random(3)
    for _ in range(200):
        ranges, index = [], _Ranges()
        for _ in range(rng.randrange(1, 40)):
            mem = rng.choice("ab")
            s = rng.randrange(0, 200)
            e = s + rng.randrange(1, 30)
            ranges.append((mem, s, e))
            index.add(mem, s, e)
            for _ in range(5):
                qm, qs = rng.choice("abc"), rng.randrange(0, 230)
                qe = qs + rng.randrange(1, 20)
                want = any(m == qm and s1 < qe and qs < e1 for m, s1, e1 in ranges)
                assert index.overlaps(qm, qs, qe) == want, (ranges, (qm, qs, qe))
        index.clear()
        assert not index.overlaps("a", 0, 1 << 30)


def test_touching_ranges_merge_without_overlapping():
    index = _Ranges()
    index.add("m", 0, 16)
    index.add("m", 32, 48)
    index.add("m", 16, 32)                      # touches both: one interval [0, 48)
    assert index._by_mem["m"] == ([0], [48])
    assert not index.overlaps("m", 48, 64) and index.overlaps("m", 47, 64)
