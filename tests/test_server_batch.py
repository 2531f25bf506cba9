"""The batch scheduler on a fake engine: admission, KV waits, preemption, chunked prefill, cancel.

The fake's logits depend on every token in a sequence's KV cache, so a scheduler that feeds a
wrong position, skips a token or recomputes badly after preemption changes the output.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from vkpack.runtime.server.batch import (
    Failed,
    Finished,
    GenRequest,
    Piece,
    QueueFull,
    Scheduler,
)
from vkpack.runtime.generation import TokenStream
from vkpack.runtime.sampler import SamplingParams
from vkpack.runtime.tiers import BudgetError

V = 27          # vocab: 0 is EOS, 1..26 are letters
UNIT = 100      # bytes of KV per position
EOS = 0


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 1) for i in ids if i != EOS)


class FakeSession:
    def __init__(self, eng, n):
        self.eng, self.n, self.allocs = eng, n, []

    def __enter__(self):
        size = self.n * UNIT
        if self.eng.in_use + size > self.eng.tier.budget - 20:
            raise BudgetError(f"no room for {size}")
        self.eng.in_use += size
        self.allocs = [SimpleNamespace(size=size)]
        self.eng.live += 1
        return {}  # position -> token

    @property
    def reserved_bytes(self):
        return sum(a.size for a in self.allocs)

    def __exit__(self, *exc):
        if self.allocs:
            self.eng.in_use -= self.allocs[0].size
            self.eng.live -= 1
        self.allocs = []


class FakeEngine:
    """Next token = (sum of all tokens in the cache) mod 26 + 1; EOS when the sum hits `eos_at`."""

    def __init__(self, budget=10**9, fail_above=None, eos_at=None, context=4096):
        self.tier = SimpleNamespace(budget=budget)
        self.weight_room_bytes = 20  # two packs of 10 bytes
        self.tokenizer = FakeTokenizer()
        self.eos_ids = {EOS}
        self.context = context
        self.fail_above, self.eos_at = fail_above, eos_at
        self.in_use = self.live = 0
        self.calls: list[list[tuple[int, int]]] = []
        self.max_live = 0
        self.lock = threading.Lock()
        self.raise_next: Exception | None = None
        self.step_delay = 0.0  # seconds per step, for tests that must act while a request still runs

    def kv_session(self, n, max_pass_tokens=None):
        return FakeSession(self, n)

    def token_stream(self, prompt_ids, params, max_tokens, stop=(), ignore_eos=False):
        return TokenStream(self.tokenizer, prompt_ids, params, max_tokens, self.eos_ids, stop, ignore_eos)

    def forward_batch(self, seqs):
        if self.step_delay:
            time.sleep(self.step_delay)
        self.calls.append([(len(t), p) for t, p, _ in seqs])
        self.max_live = max(self.max_live, len(seqs))
        if self.raise_next is not None:
            e, self.raise_next = self.raise_next, None
            raise e
        if self.fail_above is not None and len(seqs) > self.fail_above:
            raise BudgetError(f"cannot stream weights beside {len(seqs)} caches")
        out = np.zeros((len(seqs), V), np.float32)
        for i, (toks, p, kv) in enumerate(seqs):
            for j, t in enumerate(toks):
                kv[p + j] = int(t)
            n = p + len(toks)
            assert sorted(kv)[:n] == list(range(n)), "a position was skipped"
            total = sum(kv[k] for k in range(n))
            out[i, EOS if total == self.eos_at else total % 26 + 1] = 1.0
        return out


class Collector:
    def __init__(self):
        self.events: list = []
        self.done = threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, (Finished, Failed)):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Piece))

    @property
    def end(self):
        return self.events[-1]


def _req(prompt, n, **kw) -> tuple[GenRequest, Collector]:
    c = Collector()
    return GenRequest(list(prompt), SamplingParams(temperature=0), n, c, **kw), c


def _run(eng, reqs, **kw) -> list[Collector]:
    sched = Scheduler(eng, **kw)
    try:
        out = []
        for prompt, n, extra in reqs:
            r, c = _req(prompt, n, **extra)
            sched.submit(r)  # all queued before the thread starts: the first step sees them all
            out.append(c)
        sched.start()
        for c in out:
            assert c.done.wait(10)
        return out
    finally:
        sched.stop()


PROMPTS = [([3, 1, 4, 1, 5], 12, {}), ([2, 7], 20, {}), ([9] * 30, 7, {}), ([1], 15, {}), ([5, 5, 5], 9, {})]


@pytest.fixture(scope="module")
def alone() -> list[str]:
    return [_run(FakeEngine(), [p])[0].text for p in PROMPTS]


def test_batched_equals_alone_and_runs_together(alone):
    eng = FakeEngine()
    got = _run(eng, PROMPTS, max_batch=8)
    assert [c.text for c in got] == alone
    assert all(isinstance(c.end, Finished) and c.end.reason == "length" for c in got)
    assert got[0].end.completion_tokens == 12 and got[0].end.prompt_tokens == 5
    assert eng.max_live == 5 and eng.live == 0 and eng.in_use == 0


def test_kv_budget_full_waits(alone):
    eng = FakeEngine(budget=45 * UNIT + 40)  # 45 positions of KV (12..37 each), plus the pack room
    sched_out = _run(eng, PROMPTS, max_batch=8)
    assert [c.text for c in sched_out] == alone
    assert 2 <= eng.max_live <= 3 and eng.in_use == 0


def test_preemption_recomputes_and_output_is_unchanged(alone):
    eng = FakeEngine(fail_above=2)
    sched = Scheduler(eng, max_batch=4)
    try:
        pairs = [_req(p, n) for p, n, _ in PROMPTS]
        for r, _ in pairs:
            sched.submit(r)
        sched.start()
        for _, c in pairs:
            assert c.done.wait(10)
        assert [c.text for _, c in pairs] == alone
        assert sched.preemptions > 0
    finally:
        sched.stop()
    assert eng.in_use == 0


def test_budget_error_alone_fails_request_not_scheduler():
    eng = FakeEngine(fail_above=0)
    sched = Scheduler(eng).start()
    try:
        r, c = _req([1, 2], 4)
        sched.submit(r)
        assert c.done.wait(10) and isinstance(c.end, Failed) and c.end.status == 500
        eng.fail_above = None
        r, c = _req([1, 2], 4)
        sched.submit(r)
        assert c.done.wait(10) and isinstance(c.end, Finished)
    finally:
        sched.stop()


def test_request_that_never_fits_is_400():
    eng = FakeEngine(budget=10 * UNIT + 40)
    [c] = _run(eng, [([1] * 20, 5, {})])
    assert isinstance(c.end, Failed) and c.end.status == 400 and c.end.code == "context_length_exceeded"


def test_forward_error_fails_batch_and_keeps_serving():
    eng = FakeEngine()
    eng.raise_next = RuntimeError("pack 3 is corrupt")
    sched = Scheduler(eng).start()
    try:
        r, c = _req([1, 2], 4)
        sched.submit(r)
        assert c.done.wait(10) and isinstance(c.end, Failed) and "pack 3 is corrupt" in c.end.message
        r, c = _req([1, 2], 4)
        sched.submit(r)
        assert c.done.wait(10) and isinstance(c.end, Finished)
    finally:
        sched.stop()


def test_chunked_prefill_does_not_stall_decoding():
    eng = FakeEngine()
    eng.step_delay = 0.002  # the short request must still be decoding when the long one ends
    sched = Scheduler(eng, max_batch=4, prefill_chunk=256).start()
    try:
        short, c_short = _req([1, 2], 3000)
        sched.submit(short)
        while not c_short.events:  # decoding
            threading.Event().wait(0.001)
        long, c_long = _req([7] * 1000, 3)
        sched.submit(long)
        assert c_long.done.wait(10) and isinstance(c_long.end, Finished)
        assert not c_short.done.is_set()
    finally:
        sched.stop()
    # no step feeds more than 256 prompt tokens, and the short request decodes meanwhile
    for call in eng.calls:
        assert sum(n for n, _ in call if n > 1) <= 256
    mixed = [call for call in eng.calls if any(n >= 100 for n, _ in call) and any(n == 1 for n, _ in call)]
    assert len(mixed) == 4, eng.calls[:6]  # 1000 = 3 * 256 + 232, each chunk beside a decode


def test_eos_and_stop_strings_and_ignore_eos():
    # prompt [1] sums: 1 -> token 2 (sum 3) -> token 4 (sum 7) -> token 8 (sum 15) -> token 16 (sum 31)...
    [c] = _run(FakeEngine(eos_at=15), [([1], 10, {})])
    assert c.text == "bdh" and c.end.reason == "stop" and c.end.completion_tokens == 3
    [c] = _run(FakeEngine(eos_at=15), [([1], 5, {"ignore_eos": True})])
    assert c.end.reason == "length" and c.end.completion_tokens == 5 and c.text == "bdh"  # EOS decodes to ""
    [c] = _run(FakeEngine(), [([1], 10, {"stop": ("dh",)})])
    assert c.text == "b" and c.end.reason == "stop"


def test_cancel_waiting_and_running_frees_kv():
    eng = FakeEngine()
    eng.step_delay = 0.005  # the first request must still be running when it is cancelled
    sched = Scheduler(eng, max_batch=1).start()
    try:
        first, c1 = _req([1], 4000 - 1)
        second, c2 = _req([2], 10)
        sched.submit(first)
        sched.submit(second)
        sched.cancel(second)  # still waiting behind the first
        sched.cancel(first)
        third, c3 = _req([3], 5)
        sched.submit(third)
        assert c3.done.wait(10) and isinstance(c3.end, Finished)
        assert not c1.done.is_set() and not c2.done.is_set()  # cancelled requests get no terminal event
        assert sched.finished["cancelled"] == 2
    finally:
        sched.stop()
    assert eng.in_use == 0 and eng.live == 0


def test_queue_bound():
    eng = FakeEngine()
    sched = Scheduler(eng, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(2):
        sched.submit(_req([1], 3)[0])
    with pytest.raises(QueueFull, match="max-queue 2"):
        sched.submit(_req([1], 3)[0])
    with pytest.raises(ValueError, match="context"):
        sched.submit(_req([1] * 10, 5000)[0])


def test_transient_budget_error_is_retried(alone):
    eng = FakeEngine()
    eng.raise_next = BudgetError("a prefetched pack has not landed yet")
    [c] = _run(eng, PROMPTS[:1])
    assert c.text == alone[0] and isinstance(c.end, Finished)
