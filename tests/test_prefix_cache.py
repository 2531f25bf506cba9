"""Issue 16's prefix caching: a request whose prompt starts with full blocks another sequence's KV cache
holds (running, or finished and kept) copies them and prefills only the rest (runtime/server/prefix.py).

On SmolLM2 through the real server and the openai client: the second request with a long shared system
prompt reports the shared full blocks as `usage.prompt_tokens_details.cached_tokens` and feeds only the
other prompt positions (counted through a wrapper of `engine.forward_batch`), greedy output equals a
server without the cache, kept sessions make room for new work under a small budget and never stretch it.
`Backend.copy_kv` on every backend (numpy, native CPU, Vulkan and hybrid on lavapipe), n > 1 on Vulkan
sharing one prefill, and ring caches (a tiny gemma3 with windowed layers): reused only while the ring
still holds what the new sequence reads.
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from server_helpers import LiveServer
from vkpack.runtime import native, vk
from vkpack.runtime.backend import copy_spans
from vkpack.runtime.engine import Engine
from vkpack.runtime.sampler import SamplingParams
from vkpack.runtime.server.batch import Failed, Finished, GenRequest, Scheduler
from vkpack.runtime.server.prefix import BLOCK

NAME = "smol"
SYSTEM = ("You are the support assistant of a bicycle shop. Answer in one short sentence, name the part a "
          "customer needs, never invent prices, and suggest visiting the shop for anything involving brakes. ") * 3
ok_vk, why_vk = vk.available()
ok_native, why_native = native.available()
needs_vk = pytest.mark.skipif(not ok_vk, reason=f"no Vulkan: {why_vk}")


class Served(LiveServer):
    def __init__(self, archive, device: str = "numpy", prefix_cache: bool = True, **engine_kw):
        super().__init__(Engine(archive, device=device, **engine_kw), timeout=600, model_name=NAME,
                         prefix_cache=prefix_cache)
        self.fed: list[tuple[int, int]] = []   # (tokens, first position) of every batch entry
        forward = self.engine.forward_batch
        self.engine.forward_batch = lambda seqs: (self.fed.extend((len(t), p) for t, p, _ in seqs), forward(seqs))[1]

    def chat(self, question: str, max_tokens: int = 6, **kw):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        return self.client.chat.completions.create(model=NAME, messages=msgs, max_tokens=max_tokens, temperature=0,
                                                   **kw)

    def prompt_ids(self, question: str) -> list[int]:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        r = httpx.post(self.url + "/tokenize", json={"content": self.engine.apply_chat_template(msgs),
                                                     "add_special": True}, timeout=60)
        return r.json()["tokens"]

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out


def _prompt_positions(fed: list[tuple[int, int]], n_prompt: int) -> int:
    """Prompt positions fed by these batch entries (of one request running alone)."""
    return sum(max(0, min(p + t, n_prompt) - p) for t, p in fed)


def _shared_blocks(a: list[int], b: list[int]) -> int:
    """Positions of `b` a cache holding `a` gives: full shared blocks, one token left to feed."""
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return min(common, len(b) - 1) // BLOCK * BLOCK


@pytest.fixture(scope="module")
def served(smollm2_archive):
    s = Served(smollm2_archive)
    yield s
    s.close()


@pytest.fixture(scope="module")
def uncached(smollm2_archive):
    s = Served(smollm2_archive, prefix_cache=False)
    yield s
    s.close()


# ---- the copy ----


def test_copy_spans_follow_both_rings():
    assert copy_spans(10, 100, 100) == [(0, 0, 10)]
    assert copy_spans(10, 4, 6) == [(2, 0, 2), (0, 2, 2)]        # positions 6, 7 | 8, 9
    assert copy_spans(30, 23, 100) == [(7, 7, 16), (0, 23, 7)]   # positions 7..22 | 23..29
    for n, a, b in [(57, 23, 23), (40, 17, 29), (5, 3, 8), (0, 4, 4)]:
        runs = copy_spans(n, a, b)
        positions = list(range(max(0, n - min(a, b)), n))
        assert [(p % a, p % b) for p in positions] == [(s + i, d + i) for s, d, k in runs for i in range(k)]


BACKENDS = ["numpy", pytest.param("cpu", marks=pytest.mark.skipif(not ok_native, reason=f"native: {why_native}")),
            pytest.param("vulkan", marks=needs_vk)]


@pytest.mark.parametrize("device", BACKENDS)
def test_copy_kv_continues_like_a_prefill(smollm2_archive, device):
    """A session given 24 positions by `copy_kv` and fed the rest gives a fresh prefill's logits."""
    ids = list(range(500, 540))
    with Engine(smollm2_archive, device=device) as eng:
        with eng.kv_session(48) as kv:
            want = eng.forward_batch([(ids, 0, kv)])[0]
        src, dst = eng.kv_session(48), eng.kv_session(64)
        with src, dst:
            eng.forward_batch([(ids[:30] + [7, 7], 0, src.views)])   # positions 30, 31 differ: not copied
            dst.copy_from(src, 24)
            got = eng.forward_batch([(ids[24:], 24, dst.views)])[0]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4


@pytest.mark.skipif(not (ok_vk and ok_native), reason=f"Vulkan: {why_vk or 'ok'}; native: {why_native or 'ok'}")
def test_hybrid_copy_kv_takes_each_layer_from_where_it_is_current(smollm2_archive):
    """Decode passes put layers 15-29 on the CPU: their newest rows live only in host memory. A copy of
    more positions than the GPU holds current takes those layers from the host, the others from the GPU."""
    from vkpack.runtime.hybrid.backend import HybridBackend
    from vkpack.runtime.native.backend import NativeCpuBackend
    from vkpack.runtime.vk.backend import VulkanBackend

    cpu_steps = frozenset(range(31, 61))   # SmolLM2's steps of layers 15-29 (as tests/test_hybrid.py)
    make = lambda a: HybridBackend(a, VulkanBackend(a), NativeCpuBackend(a),
                                   host_steps=lambda t: cpu_steps if t == 1 else frozenset())
    prompt, more = list(range(600, 613)), [640, 641, 642]
    with Engine(smollm2_archive, device="numpy") as ref, ref.kv_session(32) as kv:
        want = ref.forward_batch([(prompt + more + [650], 0, kv)])[0]
    with Engine(smollm2_archive, device=make) as eng:
        src, dst = eng.kv_session(32), eng.kv_session(32)
        with src, dst:
            eng.forward_batch([(prompt, 0, src.views)])                 # all layers on the GPU
            for i, t in enumerate(more):                                 # layers 15-29 on the CPU
                eng.forward_batch([([t], len(prompt) + i, src.views)])
            k = src.views[20][0]
            assert k.device_rows == len(prompt) and k.host_rows == len(prompt) + len(more)
            dst.copy_from(src, 15)
            assert dst.views[20][0].host_rows == 15 and dst.views[3][0].device_rows == 15
            eng.forward_batch([([642], 15, dst.views)])
            got = eng.forward_batch([([650], 16, dst.views)])[0]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-3


# ---- the server ----


def test_second_request_reuses_the_system_prompt(served):
    served.chat("Which tyre fits a road bike?")
    ids = served.prompt_ids("My chain squeaks, what do I need?")
    want = _shared_blocks(served.prompt_ids("Which tyre fits a road bike?"), ids)
    assert want >= 64, "the shared system prompt spans several blocks"
    before = served.metrics()
    served.fed.clear()
    r = served.chat("My chain squeaks, what do I need?")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.prompt_tokens_details.cached_tokens == want
    assert _prompt_positions(served.fed, len(ids)) == len(ids) - want    # only the rest was prefilled
    after = served.metrics()
    assert after["vkpack_prefix_cache_hits_total"] == before["vkpack_prefix_cache_hits_total"] + 1
    assert after["vkpack_prompt_tokens_cached_total"] == before["vkpack_prompt_tokens_cached_total"] + want
    assert after["vkpack_prefix_cache_sessions"] >= 1 and after["vkpack_prefix_cache_bytes"] > 0
    # streamed: the usage chunk says the same
    chunks = list(served.chat("My chain squeaks, what do I need?", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= want


def test_greedy_output_is_the_same_without_the_cache(served, uncached):
    questions = ["Do you sell helmets?", "Do you sell locks?", "Do you sell lights?"]
    with_cache = [served.chat(q, 12).choices[0].message.content for q in questions]
    without = [uncached.chat(q, 12) for q in questions]
    assert with_cache == [r.choices[0].message.content for r in without]
    assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in without)
    assert uncached.metrics()["vkpack_prefix_cache_sessions"] == 0
    assert served.scheduler.prefix.hits >= 2


def test_concurrent_requests_share_a_running_prefill(served):
    """Requests admitted together: the later ones wait for their prefill chunk and copy what the first
    has written by then (a running sequence is a holder too)."""
    qs = [f"Question {i}: what does a derailleur do?" for i in range(3)]
    served.scheduler.prefix.clear()          # nothing kept: only the running sequences can give blocks
    out: list = [None] * 3
    go = threading.Barrier(3)

    def ask(i: int) -> None:
        go.wait()
        out[i] = served.chat(qs[i], 4, extra_body={"ignore_eos": True})
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cached = sorted(r.usage.prompt_tokens_details.cached_tokens for r in out)
    assert cached[0] == 0 and cached[-1] >= 64, cached


def _one_session_budget(archive, n_ctx: int, sessions: float) -> tuple[float, int]:
    """A device budget (GiB) holding `sessions` KV sessions of n_ctx positions beside the weights' room."""
    with Engine(archive, device="numpy") as probe:
        one = probe.session_bytes(n_ctx, 512)
        budget = max(probe.min_bytes, probe.weight_room_bytes + int(sessions * one) + probe.backend.reserved_bytes)
    return budget / 2**30, one


def test_a_budget_too_small_to_keep_anything(smollm2_archive):
    ids_len = 130   # about the chat prompt's length; max_tokens 6
    vram, _ = _one_session_budget(smollm2_archive, ids_len + 6, 1.5)
    s = Served(smollm2_archive, vram_gb=vram)
    try:
        seen: list[int] = []
        forward = s.engine.forward_batch
        sch = s.scheduler

        def checked(seqs):   # the scheduler's own accounting, at every step
            seen.append(sum(r.reserved for r in sch._running) + sch.prefix.retained_bytes + sch._pack_room)
            return forward(seqs)
        s.engine.forward_batch = checked
        first = s.chat("Which tyre fits a road bike?")
        second = s.chat("My chain squeaks, what do I need?")
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == 0   # the first's session made room for it
        assert sch.prefix.evictions >= 1 and sch.kv_waits == 0
        assert max(seen) <= s.engine.tier.budget
        assert s.engine.tier.peak <= s.engine.tier.budget
    finally:
        s.close()


def test_kept_sessions_make_room_for_new_work(smollm2_archive):
    """Two sessions fit: A and B are kept; C shares A's system prompt, so B (not sharing) goes, and C
    reuses A without waiting for room."""
    vram, _ = _one_session_budget(smollm2_archive, 140, 2.3)
    s = Served(smollm2_archive, vram_gb=vram)
    try:
        s.chat("Which tyre fits a road bike?")
        s.client.completions.create(model=NAME, prompt=[int(t) for t in range(900, 1020)], max_tokens=6)
        sch = s.scheduler
        assert len(sch.prefix.retained) == 2 and sch.prefix.evictions == 0
        c = s.chat("My chain squeaks, what do I need?")
        assert c.usage.prompt_tokens_details.cached_tokens >= 64
        assert sch.prefix.evictions == 1 and sch.kv_waits == 0
        assert s.engine.tier.peak <= s.engine.tier.budget
    finally:
        s.close()


# ---- Vulkan (lavapipe): n > 1 shares one prefill, the cache gives the same tokens ----


@pytest.fixture(scope="module")
def served_vk(smollm2_archive):
    if not ok_vk:
        pytest.skip(f"no Vulkan: {why_vk}")
    s = Served(smollm2_archive, device="vulkan")
    yield s
    s.close()


def test_vulkan_n_choices_prefill_once(served_vk):
    s = served_vk
    prompt = "The three best things about cycling to work are"
    n_prompt = len(s.engine.encode(prompt))
    s.fed.clear()
    copied = s.scheduler.prompt_tokens_copied
    r = s.client.completions.create(model=NAME, prompt=prompt, n=3, max_tokens=2, temperature=0)
    assert len(r.choices) == 3 and len({c.text for c in r.choices}) == 1
    assert _prompt_positions(s.fed, n_prompt) == n_prompt + 2, s.fed   # the others re-feed its last token only
    assert s.scheduler.prompt_tokens_copied - copied == 2 * (n_prompt - 1)


def test_vulkan_greedy_output_is_the_same_with_the_cache(served_vk, monkeypatch):
    s = served_vk
    prompt = [int(t) for t in range(700, 740)]
    asks = [prompt + [5, 6, 7], prompt + [8, 9]]
    monkeypatch.setattr(s.scheduler, "prefix_cache", False)
    without = [s.client.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0) for p in asks]
    monkeypatch.setattr(s.scheduler, "prefix_cache", True)
    with_cache = [s.client.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0) for p in asks]
    assert [r.choices[0].text for r in with_cache] == [r.choices[0].text for r in without]
    assert with_cache[1].usage.prompt_tokens_details.cached_tokens == 32


# ---- rings: windowed layers ----


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A tiny gemma3 (window 16 on two layers of three) that transformers builds (tools/family_models.py)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import family_models as fm
    from vkpack.compiler.build import build

    root = tmp_path_factory.mktemp("gemma3")
    folder = fm.make_hf("gemma3", root / "hf", seed=1)
    build(folder, root / "m.vkpack", progress=False)
    return root / "m.vkpack", fm


def _ids_through(sched: Scheduler, runs: list[tuple[list[int], int]]) -> tuple[list[list[int]], list[Finished]]:
    """Each (prompt, max_tokens) greedy request alone, in order: its generated ids (from logprobs) and Finished."""
    ids_out, ends = [], []
    for ids, n in runs:
        done, evs = threading.Event(), []

        def emit(ev, evs=evs, done=done):
            evs.append(ev)
            if isinstance(ev, (Finished, Failed)):
                done.set()
        sched.submit(GenRequest(ids, SamplingParams(temperature=0), n, emit, ignore_eos=True, logprobs=0))
        assert done.wait(300) and isinstance(evs[-1], Finished), evs[-1]
        ends.append(evs[-1])
        ids_out.append([lp.token for e in evs[:-1] for lp in e.logprobs])
    return ids_out, ends


def test_ring_prefix_reused_only_while_the_ring_holds_it(gemma3):
    """Window 16, passes of 8: a windowed layer keeps 23 rows, and a sequence going on at position n reads
    positions from n - 15. A finished sequence fed [0, w) gives a prefix of n only if w - 23 <= n - 15:
    A (64-token prompt, 2 new: fed 65) gives its 64 to B; C (20 new: fed 83) no longer holds what D
    would need at 64, so D prefills all. Every output equals the uncached run's (a reused ring whose rows
    were overwritten would change D's tokens)."""
    archive, fm = gemma3
    rng = np.random.default_rng(3)
    base = [int(t) for t in rng.integers(3, fm.VOCAB, 64)]
    other = [int(t) for t in rng.integers(3, fm.VOCAB, 64)]
    runs = [(base, 2), (base + [11, 12, 13], 4), (other, 20), (other + [14, 15, 16], 4)]
    got, hits = {}, 0
    with Engine(archive, device="numpy") as eng:
        assert eng.windows, "the tiny gemma3 has windowed layers"
        for flag in (True, False):
            sched = Scheduler(eng, max_batch=2, prefill_chunk=8, prefix_cache=flag).start()
            try:
                got[flag] = _ids_through(sched, runs)
                hits = sched.prefix.hits if flag else hits
            finally:
                sched.stop()
    (ids_on, on), (ids_off, _) = got[True], got[False]
    assert [e.cached_tokens for e in on] == [0, 64, 0, 0]
    assert hits == 1
    assert ids_on == ids_off
    assert [len(x) for x in ids_on] == [n for _, n in runs]
