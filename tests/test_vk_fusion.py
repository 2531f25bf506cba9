"""Record-time fusion plan (runtime/vk/fusion.py) on the shared decoder graph's op patterns."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from vk_helpers import greedy, rel_err
from vkpack.runtime.vk.fusion import plan


def op(kind, ins, out, w=(), **attrs):
    return {"op": kind, "in": list(ins), "out": out, "w": list(w), "attrs": attrs}


ATTN = [op("rms_norm", ["x"], "h", ["n"], eps=1e-5), op("linear", ["h"], "q", ["wq"]), op("linear", ["h"], "k", ["wk"]),
        op("linear", ["h"], "v", ["wv"]), op("rope", ["q"], "q"), op("rope", ["k"], "k"),
        op("attention", ["q", "k", "v"], "o"), op("linear", ["o"], "a", ["wo"]), op("add", ["x", "a"], "x")]
MLP = [op("rms_norm", ["x"], "h", ["n2"], eps=1e-6), op("linear", ["h"], "g", ["wg"]), op("linear", ["h"], "u", ["wu"]),
       op("swiglu", ["g", "u"], "m"), op("linear", ["m"], "a", ["wd"]), op("add", ["x", "a"], "x")]


def kinds(ops):
    return [o["op"] for o in ops]


def test_decode_fuses_norms_glu_and_residuals():
    a = plan(ATTN, 1, 1, lambda rows, o: True)
    assert kinds(a) == ["linear", "linear", "linear", "rope", "attention", "linear"]
    assert a[3]["in"] == ["q"] and a[4]["_rope_k"] == ATTN[5]["attrs"]
    assert all(o["in"] == ["x"] and o["_norm"] == ("n", 1e-5) for o in a[:3])
    assert a[-1]["out"] == "x" and a[-1]["_accumulate"]
    m = plan(MLP, 1, 1, lambda rows, o: True)
    assert kinds(m) == ["linear", "linear", "linear"]
    assert m[2]["in"] == ["g"] and m[2]["_glu"] == "u" and m[2]["out"] == "x" and m[2]["_accumulate"]
    assert ATTN[1]["in"] == ["h"], "the graph's ops are not mutated"


ROPE = {"head_dim": 64, "rope_dim": 64, "theta": 1e4, "mode": "norm", "freq_factors": None}
ATTN_ROPE = [op("linear", ["x"], "q", ["wq"]), op("linear", ["x"], "k", ["wk"]), op("linear", ["x"], "v", ["wv"]),
             op("rope", ["q"], "q", n_heads=8, **ROPE), op("rope", ["k"], "k", n_heads=2, **ROPE),
             op("attention", ["q", "k", "v"], "o", layer=0)]


def test_split_attention_takes_rope_q_and_the_store():
    """Decode (the split kernel runs): rope(q) and rope(k) go; the attention is annotated with both and
    records no kv_store. Prefill (the one-pass kernel): rope(q) stays, the store rotates the keys."""
    seen = []
    a = plan(ATTN_ROPE, 3, 1, lambda rows, o: True, lambda rows, o: seen.append(rows) or rows <= 16)
    assert kinds(a) == ["linear", "linear", "linear", "attention"] and seen == [3]
    assert a[3]["_rope_q"] == ATTN_ROPE[3]["attrs"] and a[3]["_rope_k"] == ATTN_ROPE[4]["attrs"]
    p = plan(ATTN_ROPE, 64, 1, lambda rows, o: True, lambda rows, o: rows <= 16)
    assert kinds(p) == ["linear", "linear", "linear", "rope", "attention"]
    assert p[3]["in"] == ["q"] and "_rope_q" not in p[4] and "_rope_k" in p[4]
    assert "_rope_q" not in plan(ATTN_ROPE, 1, 1, lambda rows, o: True)[-1], "no predicate: no fusion"


def test_rope_q_stays_when_the_kernel_cannot_take_it():
    """q read by another op, ropes that differ beyond their head counts, or keys not rotated by the
    store: the split kernel applies one rotation to the new keys and q, so nothing more is fused."""
    other = ATTN_ROPE + [op("add", ["q", "o"], "z")]
    assert kinds(plan(other, 1, 1, lambda r, o: True, lambda r, o: True))[3] == "rope"
    theta = [*ATTN_ROPE[:3], op("rope", ["q"], "q", n_heads=8, **{**ROPE, "theta": 5e5}), *ATTN_ROPE[4:]]
    t = plan(theta, 1, 1, lambda r, o: True, lambda r, o: True)
    assert kinds(t) == ["linear", "linear", "linear", "rope", "attention"] and "_rope_q" not in t[-1]
    k_read = ATTN_ROPE + [op("add", ["k", "v"], "z")]
    kr = plan(k_read, 1, 1, lambda r, o: True, lambda r, o: True)
    assert kinds(kr).count("rope") == 2 and "_rope_q" not in kr[5] and "_rope_k" not in kr[5]


def test_prefill_keeps_norm_and_glu_but_accumulates():
    a = plan(ATTN, 64, 1, lambda rows, o: rows < 16)
    assert kinds(a)[:2] == ["rms_norm", "linear"] and a[-1]["_accumulate"]
    m = plan(MLP, 64, 1, lambda rows, o: rows < 16)
    assert "swiglu" in kinds(m)


def test_final_step_rows_after_last_token():
    final = [op("last_token", ["x"], "x"), op("rms_norm", ["x"], "h", ["on"], eps=1e-5),
             op("linear", ["h"], "logits", ["out"])]
    seen = []
    p = plan(final, 300, 2, lambda rows, o: seen.append(rows) or rows <= 2)
    assert seen == [2] and kinds(p) == ["last_token", "linear"]


def test_no_fusion_when_the_norm_output_has_other_readers_or_groups():
    ops = [op("rms_norm", ["x"], "h", ["n"], eps=1e-5), op("linear", ["h"], "q", ["wq"]), op("add", ["h", "q"], "z")]
    assert kinds(plan(ops, 1, 1, lambda r, o: True))[0] == "rms_norm"
    qk = [op("rms_norm", ["q"], "q2", ["qn"], eps=1e-5, group=64), op("linear", ["q2"], "y", ["w"])]
    assert kinds(plan(qk, 1, 1, lambda r, o: True))[0] == "rms_norm"


def test_row_parts_back_to_back_run_as_one_weight():
    from types import SimpleNamespace

    from vkpack.runtime.vk.graph_ops import merged_parts
    from vkpack.runtime.vk.ops import Weight

    buf, other = SimpleNamespace(size=1 << 20), SimpleNamespace(size=1 << 20)
    w = lambda b, off, rows: Weight(b, off, "F16", rows, 64)
    parts = [(0, 10, w(buf, 0, 10)), (10, 20, w(buf, 1280, 10)), (20, 25, w(buf, 4096, 5)),
             (25, 30, w(other, 4096 + 640, 5)), (30, 40, None), (40, 50, w(buf, 5376, 10))]
    merged = merged_parts(parts)
    assert [(r0, m.offset, m.rows) for r0, m in merged] == [(0, 0, 20), (20, 4096, 5), (25, 4736, 5), (40, 5376, 10)]


@contextmanager
def cpu_and_vulkan(tmp_path, seed: int, arch: str = "llama"):
    """A small synthetic model (8 heads over 2 kv heads) on the numpy and the Vulkan backends."""
    from vkpack.runtime import vk

    ok, why = vk.available()
    if not ok:
        pytest.skip(f"no Vulkan: {why}")
    import make_synthetic as ms
    from vkpack.compiler.build import build
    from vkpack.runtime.engine import Engine

    spec = ms.Spec(arch=arch, layers=2, hidden=256, heads=8, kv_heads=2, ffn=512, vocab=1024, std=0.1)
    build(ms.write_gguf(tmp_path / "m.gguf", spec, dtype="F16", seed=seed), tmp_path / "m.vkpack", progress=False)
    with Engine(tmp_path / "m.vkpack", device="numpy") as c, Engine(tmp_path / "m.vkpack", device="vulkan") as g:
        yield c, g, spec


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # rope modes norm and neox
def test_engine_decode_runs_rope_and_store_in_attention(tmp_path, arch):
    """The whole model on Vulkan: the replayed decode pass records no rope and no kv_store (the split
    attention kernel does both); greedy tokens, and a batch of two sequences at other positions, match
    the numpy backend."""
    with cpu_and_vulkan(tmp_path, 7, arch) as (c, g, spec):
        ids = c.encode("rope and the store inside the attention")
        assert greedy(g, ids, 12) == greedy(c, ids, 12)
        kernels = g.backend.last_replay()[1]
        assert not any(k.name.startswith(("rope", "kv_store")) for k in kernels)
        assert sum(k.name.startswith("attention_split") and k.spec[6] == 1 for k in kernels) == spec.layers
        a, b = ids, c.encode("another")
        with g.kv_session(64) as ka, g.kv_session(64) as kb, c.kv_session(64) as kc, c.kv_session(64) as kd:
            for e, (k1, k2) in ((g, (ka, kb)), (c, (kc, kd))):
                e.forward_batch([(a, 0, k1), (b, 0, k2)])
            nxt = [(a[-1:], len(a), ka), (b[-2:], len(b), kb)], [(a[-1:], len(a), kc), (b[-2:], len(b), kd)]
            got, ref = g.forward_batch(nxt[0]), c.forward_batch(nxt[1])
        assert rel_err(got, ref) < 1e-3


def test_engine_decode_without_the_attention_fusion_keeps_split_k(tmp_path):
    """Ops.attn_fused_store = False (the A/B switch): rope and kv_store dispatches come back, and the
    decode attention is still the split-K kernel (not the one-pass one); tokens match numpy."""
    with cpu_and_vulkan(tmp_path, 7) as (c, g, spec):
        g.backend.ops.attn_fused_store = False
        ids = c.encode("the store outside the attention")
        assert greedy(g, ids, 8) == greedy(c, ids, 8)
        names = [k.name for k in g.backend.last_replay()[1]]
        assert any(n.startswith("kv_store") for n in names) and any(n.startswith("rope") for n in names)
        assert sum(n.startswith("attention_split") for n in names) == spec.layers
        assert not any(n in ("attention_f32", "attention_f16") for n in names)


def test_engine_decode_with_per_fusion_matvec_configs(tmp_path):
    """Ops.mv_config: the decode linears take their (workgroup, rows, units) by fusion; odd choices
    (one row, eight rows, two units in flight) still give numpy's greedy tokens."""
    with cpu_and_vulkan(tmp_path, 9) as (c, g, _spec):
        sg = g.backend.dev.info.subgroup_size
        g.backend.ops.mv_config = {0: (sg, 1, 2), 1: (2 * sg, 8, 1), 2: (2 * sg, 4, 2)}
        ids = c.encode("per fusion matvec configurations")
        assert greedy(g, ids, 8) == greedy(c, ids, 8)
        specs = {(k.spec[4], k.spec[0], k.spec[1], k.spec[3]) for k in g.backend.last_replay()[1]
                 if k.name.startswith("matmul_")}
        assert {(0, sg, 1, 2), (1, 2 * sg, 8, 1), (2, 2 * sg, 4, 2)} <= specs, specs


def test_engine_decode_leaves_unfused_weight_types_to_their_own_config(tmp_path):
    """Ops.mv_unfused: a weight type listed there runs its decode products unfused with its own
    (workgroup, rows, units), so the norms and SwiGLU come back as dispatches; tokens still match numpy."""
    with cpu_and_vulkan(tmp_path, 9) as (c, g, _spec):
        sg = g.backend.dev.info.subgroup_size
        g.backend.ops.mv_unfused = {"F16": (sg, 1, 1)}
        ids = c.encode("weight types that run unfused")
        assert greedy(g, ids, 8) == greedy(c, ids, 8)
        kernels = g.backend.last_replay()[1]
        names = [k.name for k in kernels]
        assert any(n.startswith("rms_norm") for n in names) and any(n.startswith("swiglu") for n in names)
        specs = {(k.spec[4], k.spec[0], k.spec[1], k.spec[3]) for k in kernels if k.name.startswith("matmul_")}
        assert specs == {(0, sg, 1, 1)}, specs
        # a step of two sequences (up to Ops.unfused_max_tokens rows) runs unfused too
        assert g.backend.ops.unfused_max_tokens >= 2 and not g.backend.ops.fuses(2, "F16")
        a, b = ids, c.encode("another one")
        with g.kv_session(64) as ka, g.kv_session(64) as kb, c.kv_session(64) as kc, c.kv_session(64) as kd:
            for e, (k1, k2) in ((g, (ka, kb)), (c, (kc, kd))):
                e.forward_batch([(a, 0, k1), (b, 0, k2)])
            got = g.forward_batch([(a[-1:], len(a), ka), (b[-1:], len(b), kb)])
            ref = c.forward_batch([(a[-1:], len(a), kc), (b[-1:], len(b), kd)])
        assert rel_err(got, ref) < 1e-3
