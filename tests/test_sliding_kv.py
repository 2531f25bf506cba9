"""Sliding-window layers keep only a ring of their window (runtime/kv.py).

Tiny gemma2 / gemma3 / mistral models that transformers builds (tools/family_models.py, window 16) and a
64-token prompt: with passes of at most PASS tokens a windowed layer keeps WINDOW + PASS - 1 rows, so
positions 0..95 wrap its ring several times. Checked: numpy against transformers (logits within
REL_TOL, test_families' tolerance; 32 greedy tokens equal), the bytes a session reserves (smaller by
exactly the rows dropped), the Vulkan kernels and engine (lavapipe) against float64 and numpy without
rings, the hybrid mirror's row mapping, and two sequences in the server's scheduler under a budget that
holds two ring sessions but not two full ones.
"""

from __future__ import annotations

import math
import threading
from contextlib import ExitStack

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import family_models as fm
import hf_reference
from vkpack.compiler.build import build
from vkpack.pack_format.constants import align_up
from vkpack.pack_format.errors import VkpackError
from vkpack.runtime import engine as engine_mod
from vkpack.runtime.engine import Engine
from vkpack.runtime.kv import KvSession

REL_TOL = 1e-3        # as tests/test_families.py: float32 against transformers in float32
VK_REL_TOL = 1e-3     # Vulkan (f32 caches) against numpy
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, fm.VOCAB, 64)]
PROMPT2 = [int(t) for t in np.random.default_rng(8).integers(3, fm.VOCAB, 40)]
N_NEW = 32
N_CTX = len(PROMPT) + N_NEW
PASS = 8              # rings of fm.WINDOW + PASS - 1 = 23 rows
# windowed layers of each tiny config: gemma2 every other layer, gemma3 two of three, mistral all 12
WINDOWED = {"gemma2": 6, "gemma3": 8, "mistral": 12}
FAMILIES = sorted(WINDOWED)
KV_WIDTH = 2 * 64     # num_key_value_heads x head_dim of fm._COMMON


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _vulkan() -> None:
    from vkpack.runtime import vk

    ok, why = vk.available()
    if not ok:
        pytest.skip(f"no Vulkan: {why}")


def _slow_but(default: str) -> list:
    return [f if f == default else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """family -> (archive, transformers logits [64, vocab], its 32 greedy tokens), made once."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            folder = fm.make_hf(family, root / "hf", seed=FAMILIES.index(family))
            build(folder, root / "m.vkpack", progress=False)
            model = fm.load_reference(folder)
            with torch.no_grad():
                ref = model(torch.tensor([PROMPT])).logits[0].float().numpy()
            cache[family] = (root / "m.vkpack", ref, hf_reference.hf_greedy(model, PROMPT, N_NEW), model)
        return cache[family]
    return get


def _ring_rows(eng: Engine, max_pass: int) -> list[int]:
    """Rows each layer should keep, from the graph's attention ops (independent of KvSession)."""
    rows = [N_CTX] * eng.archive.graph["kv_cache"]["n_layers"]
    for s in eng.archive.graph["steps"]:
        for op in s["ops"]:
            if op["op"] == "attention" and op["attrs"].get("window"):
                rows[op["attrs"]["layer"]] = min(N_CTX, op["attrs"]["window"] + max_pass - 1)
    return rows


def _run(eng: Engine, kv, chunk: int, ref_tokens: list[int] | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Prefill PROMPT in passes of `chunk`, then N_NEW greedy steps (teacher-forced with `ref_tokens`
    when given); returns each pass's last logits and the greedy tokens."""
    outs, toks = [], []
    for a in range(0, len(PROMPT), chunk):
        outs.append(eng.forward_batch([(PROMPT[a:a + chunk], a, kv)])[-1].copy())
    for i in range(N_NEW):
        toks.append(int(np.argmax(outs[-1])))
        feed = toks[-1] if ref_tokens is None else ref_tokens[i]
        outs.append(eng.forward_batch([([feed], len(PROMPT) + i, kv)])[-1].copy())
    return outs, toks


# ---- numpy against transformers ----
@pytest.mark.parametrize("family", FAMILIES)
def test_numpy_rings_match_transformers(made, family):
    archive, ref, hf_tokens, _ = made(family)
    with Engine(archive, device="numpy") as eng:
        session = eng.kv_session(N_CTX, PASS)
        assert session.rows == _ring_rows(eng, PASS)
        assert sum(r < N_CTX for r in session.rows) == WINDOWED[family]
        with session as kv:
            outs, toks = _run(eng, kv, PASS)
        for i, a in enumerate(range(0, len(PROMPT), PASS)):
            assert rel_err(outs[i], ref[a + PASS - 1]) < REL_TOL, f"pass at {a}"
        assert toks == hf_tokens
        with eng.kv_session(len(PROMPT), 1) as kv:   # a ring of exactly the window: every position
            for t in range(len(PROMPT)):
                got = eng.forward_batch([(PROMPT[t:t + 1], t, kv)])[-1]
                assert rel_err(got, ref[t]) < REL_TOL, f"position {t}"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_chunks_the_prefill_to_the_ring(made, family, monkeypatch):
    """Engine.stream gives its session rings (PREFILL_CHUNK) and feeds the prompt in passes that fit."""
    archive, _, hf_tokens, _ = made(family)
    monkeypatch.setattr(engine_mod, "PREFILL_CHUNK", 24)
    with Engine(archive, device="numpy") as eng:
        passes: list[int] = []
        forward = eng.executor.forward
        eng.executor.forward = lambda t, p, kv: (passes.append(len(t)), forward(t, p, kv))[1]
        eng.generate(PROMPT, max_tokens=N_NEW, temperature=0, ignore_eos=True)
        assert list(eng.last_ids) == hf_tokens
        assert passes[:3] == [24, 24, 16] and set(passes[3:]) == {1}
        assert eng.session_bytes(N_CTX, 24) < eng.session_bytes(N_CTX)


def test_a_pass_longer_than_the_ring_is_refused(made):
    archive, _, _, _ = made("gemma3")
    with Engine(archive, device="numpy") as eng, eng.kv_session(N_CTX, PASS) as kv:
        with pytest.raises(VkpackError, match="at most 8 per pass"):
            eng.forward_batch([(PROMPT[:PASS + 1], 0, kv)])
        with pytest.raises(ValueError, match="reads 24 KV rows at once; the cache holds 23"):
            eng.executor.forward(np.asarray(PROMPT[:PASS + 1]), 16, kv)   # the backend's own check


# ---- what the budget sees ----
@pytest.mark.parametrize("family", FAMILIES)
def test_session_bytes_drop_exactly_the_ring_rows(made, family):
    archive, _, _, _ = made(family)
    with Engine(archive, device="numpy") as eng:
        plain = KvSession(eng.tier, eng.backend, eng.archive.graph["kv_cache"], N_CTX, eng.context, PASS)
        ring = eng.kv_session(N_CTX, PASS)
        row = KV_WIDTH * 4
        saved = 2 * WINDOWED[family] * (align_up(N_CTX * row, 256) - align_up((fm.WINDOW + PASS - 1) * row, 256))
        assert plain.nbytes - ring.nbytes == saved > 0
        assert eng.session_bytes(N_CTX, PASS) == ring.nbytes
        before = eng.tier.in_use
        with ring:
            assert eng.tier.in_use - before == ring.reserved_bytes >= ring.nbytes
            assert ring.reserved_bytes < plain.nbytes


def test_budget_plan_counts_the_rings(made):
    # the streaming decision (and the unlimited budget) size the KV cache as the sessions keep it
    from vkpack.runtime.tiers import kv_bytes, plan_budgets

    archive, _, _, _ = made("gemma3")
    with Engine(archive, device="numpy") as eng:
        kv, ctx, chunk = eng.archive.graph["kv_cache"], eng.context, PASS   # the tiny context is < the 512 chunk's ring
        rings, full = kv_bytes(kv, ctx, eng.windows, chunk), kv_bytes(kv, ctx)
        with eng.kv_session(ctx, chunk) as views:
            assert rings == sum(k.nbytes + v.nbytes for k, v in views)
        assert rings < full
        sizes = [eng.backend.pack_bytes(p.id) for p in eng.archive.packs]
        vram_gb = (eng.model_bytes + (rings + full) // 2 + eng.backend.reserved_bytes) / 2**30
        assert not plan_budgets(sizes, eng.backend, kv, ctx, vram_gb, None, eng.windows, chunk).streaming
        assert plan_budgets(sizes, eng.backend, kv, ctx, vram_gb, None).streaming


def test_gemma3_27b_shape_at_32k():
    """The formula at the 27B shape (62 layers, 16 KV heads x 128, window 1024, every sixth layer full),
    32768 positions, passes of 512 tokens: 52 rings of 1535 rows instead of 32768."""
    from vkpack.runtime.kv import ring_rows

    layers, width, n_ctx = 62, 16 * 128, 32768
    windows = {i: 1024 for i in range(layers) if i % 6 != 5}
    rows = [ring_rows(n_ctx, windows.get(i), 512) for i in range(layers)]
    full, kept = 2 * layers * n_ctx * width * 4, sum(2 * r * width * 4 for r in rows)
    assert len(windows) == 52 and set(rows) == {1535, n_ctx}
    assert (full, kept) == (33285996544, 6676480000)   # 31.0 GiB -> 6.2 GiB (f32 caches)


# ---- Vulkan (lavapipe) ----
@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("kernel", ["fused", "split", "one_pass"])
def test_vk_ring_kernels_replayed_past_wraps(f16, kernel):
    """One recording replayed per position (the engine's decode) over 60 positions of a ring of 9 rows
    with a window of 8: store and attention index rows position % 9, against float64 over every position."""
    _vulkan()
    from vk_helpers import attention_ref, nmse, rope_ref

    from vkpack.runtime import vk as gpu

    dev = gpu.Device()
    try:
        ops = gpu.Ops(dev)
        ops.attn_split_rows = 4
        rng = np.random.default_rng(5)
        n_heads, n_kv, hd, window, ring, steps = 4, 2, 64, 8, 9, 60
        kvd, cdt = n_kv * hd, np.float16 if f16 else np.float32
        qs = rng.standard_normal((steps, n_heads * hd)).astype(np.float32)
        ks, vs = (rng.standard_normal((steps, kvd)).astype(np.float32) for _ in range(2))
        ab, ob = dev.alloc(3 * 256 * 4), dev.alloc(qs[0].nbytes)
        qb, kb, vb = (gpu.BufferSlice(ab, 1024 * i, a[0].nbytes) for i, a in enumerate((qs, ks, vs)))
        kc, vc = (dev.alloc(ring * kvd * np.dtype(cdt).itemsize) for _ in range(2))
        pb = dev.alloc(16, "upload")
        sb = dev.alloc(max(16, ops.attention_scratch_bytes(1, n_heads, hd, ring, window)))
        rope = {"head_dim": hd, "mode": "neox", "base": 10000.0}
        rec = gpu.Recorder(dev)
        kw = {"f16": f16, "window": window, "ring": ring}
        if kernel == "fused":
            ops.attention(rec, qb, kc, vc, pb, ob, 1, n_heads, n_kv, hd, ring, scratch=sb, new_kv=(kb, vb),
                          rope=rope, **kw)
        else:
            ops.rope(rec, qb, pb, 1, n_heads, hd, n_rot=hd, mode="neox", base=10000.0)
            ops.kv_store(rec, kb, vb, kc, vc, pb, 1, kvd, ring, f16=f16, rope=rope, ring=ring)
            rec.barrier()
            ops.attention(rec, qb, kc, vc, pb, ob, 1, n_heads, n_kv, hd, ring,
                          scratch=sb if kernel == "split" else None, **kw)
        rec.finish()
        K = rope_ref(ks, np.arange(steps), n_kv, hd, hd, "neox", 10000.0).astype(cdt)
        for p in range(steps):
            dev.upload(pb, np.array([p], np.uint32))
            for b, a in ((qb, qs[p]), (kb, ks[p]), (vb, vs[p])):
                dev.upload(ab, a, b.offset)
            rec.run()
            out = np.frombuffer(dev.download(ob, ob.size), np.float32).reshape(1, -1)
            q = rope_ref(qs[p:p + 1], [p], n_heads, hd, hd, "neox", 10000.0)
            ref = attention_ref(q, K[:p + 1], vs[:p + 1].astype(cdt), [p], n_heads, n_kv, hd, 1 / math.sqrt(hd),
                                window)
            assert nmse(out, ref) < (1e-5 if f16 else 1e-6), p
        got_v = np.frombuffer(dev.download(vc, vc.size), cdt).reshape(ring, kvd)
        assert np.array_equal(got_v, vs[steps - ring:].astype(cdt)[(np.arange(ring) - steps) % ring])
        rec.destroy()
        for b in (ab, ob, kc, vc, pb, sb):
            b.destroy()
    finally:
        dev.close()


@pytest.mark.parametrize("family", _slow_but("gemma3"))
def test_vulkan_rings_match_numpy(made, family):
    """Rings on Vulkan against numpy without rings: a prefill in passes of 24 and 16 tokens (the one-pass
    and the split kernel) and 32 replayed decode steps over a ring of 39 rows; then every position
    decoded one by one, replayed, over a ring of exactly the window (six wraps)."""
    _vulkan()
    archive, _, hf_tokens, _ = made(family)
    with Engine(archive, device="numpy") as c, Engine(archive, device="vulkan") as g:
        with c.kv_session(N_CTX) as kv:
            want, want_toks = _run(c, kv, 24)
        session = g.kv_session(N_CTX, 24)
        assert sum(r == fm.WINDOW + 23 for r in session.rows) == WINDOWED[family]
        with session as kv:
            got, toks = _run(g, kv, 24, want_toks)
        fast, _ = g.backend.last_replay()
        assert fast is not None and fast.whole is not None   # decode replayed one whole-pass command buffer
        assert toks[0] == want_toks[0] and want_toks == hf_tokens
        for i, (a, b) in enumerate(zip(got, want)):
            assert rel_err(a, b) < VK_REL_TOL, f"pass {i}"
        seq = PROMPT + want_toks
        with c.kv_session(N_CTX) as kc, g.kv_session(N_CTX, 1) as kg:
            for t in range(N_CTX):
                a = g.forward_batch([(seq[t:t + 1], t, kg)])[-1]
                b = c.forward_batch([(seq[t:t + 1], t, kc)])[-1]
                assert rel_err(a, b) < VK_REL_TOL, f"position {t}"


# ---- the hybrid mirror ----
def test_hybrid_mirror_copies_ring_rows():
    """HybridKv over a ring of 5 rows: positions travel to the row p % 5 on the other side, only the last
    five of them, and a side that a ring already overwrote is never read."""
    from vkpack.runtime.hybrid.kv import HybridKv

    class Dev:
        def __init__(self):
            self.mem = np.zeros(5 * 2, np.float32)

        def download(self, buf, n, off):
            return self.mem[off // 4:off // 4 + n // 4].tobytes()

        def upload(self, buf, a, off):
            self.mem[off // 4:off // 4 + a.size] = np.ravel(a)

    class Slice:
        buffer, offset = None, 0

    dev = Dev()
    kv = HybridKv(type("K", (), {"slice": Slice()})(), 5, 2)
    for p in range(12):                          # the GPU wrote positions 0..11: row p % 5 holds p
        dev.mem[p % 5 * 2:p % 5 * 2 + 2] = p
    kv.written(False, 0, 12)
    kv.ready_on(True, 12, dev)                   # the host gets positions 7..11
    assert np.array_equal(kv.host_array()[:, 0], [10, 11, 7, 8, 9])
    kv.host_array()[12 % 5] = 12                 # the host writes position 12
    kv.written(True, 12, 1)
    kv.ready_on(False, 13, dev)                  # the GPU gets position 12 back, nothing else
    assert np.array_equal(dev.mem[::2], [10, 11, 12, 8, 9])
    late = HybridKv(kv.device, 5, 2)
    late.written(False, 0, 20)
    with pytest.raises(RuntimeError, match="current on neither side"):
        late.ready_on(True, 12, dev)             # positions 7..11 were overwritten by 15..19


# ---- the server's scheduler ----
@pytest.mark.parametrize("device", ["numpy", pytest.param("vulkan", marks=pytest.mark.slow)])
def test_scheduler_batches_two_ring_sequences(made, device):
    """Two requests in one batch with ring sessions (the scheduler's prefill_chunk is their pass limit),
    under a budget that holds both beside two packs but could not hold two full-size sessions: both run
    side by side, tokens equal transformers', and the tier stays within its budget."""
    from vkpack.runtime.sampler import SamplingParams
    from vkpack.runtime.server.batch import Failed, Finished, GenRequest, Piece, Scheduler

    if device == "vulkan":
        _vulkan()
    archive, _, hf_tokens, model = made("gemma3")
    hf2 = hf_reference.hf_greedy(model, PROMPT2, N_NEW)
    with Engine(archive, device=device) as probe:
        ring = probe.session_bytes(N_CTX, PASS)
        full = probe.session_bytes(N_CTX, None)
        room = probe.weight_room_bytes
        budget = max(probe.min_bytes, room + 2 * ring + probe.backend.reserved_bytes + (64 << 10))
        assert room + 2 * full + probe.backend.reserved_bytes > budget   # two full sessions would not fit
    with Engine(archive, device=device, vram_gb=budget / 2**30) as eng, ExitStack() as stack:
        widths: list[int] = []
        forward = eng.forward_batch
        eng.forward_batch = lambda seqs: (widths.append(len(seqs)), forward(seqs))[1]
        sched = Scheduler(eng, max_batch=2, prefill_chunk=PASS)
        stack.callback(sched.stop)
        done = []
        for prompt in (PROMPT, PROMPT2):
            events: list = []
            finished = threading.Event()
            sched.submit(GenRequest(list(prompt), SamplingParams(temperature=0), N_NEW,
                                    lambda ev, events=events, finished=finished: (
                                        events.append(ev), isinstance(ev, (Finished, Failed)) and finished.set()),
                                    ignore_eos=True))
            done.append((events, finished))
        sched.start()
        for events, finished in done:
            assert finished.wait(300)
            assert isinstance(events[-1], Finished) and events[-1].completion_tokens == N_NEW, events[-1]
        assert sched.preemptions == 0 and max(widths) == 2
        assert eng.tier.peak <= eng.tier.budget
        if device == "vulkan":
            from vk_helpers import assert_device_peak_within

            assert_device_peak_within(eng, budget / 2**30)
        texts = ["".join(e.text for e in events if isinstance(e, Piece)) for events, _ in done]
        assert texts == [eng.decode(hf_tokens), eng.decode(hf2)]
