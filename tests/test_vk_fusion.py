"""Record-time fusion plan (runtime/vk/fusion.py) on the shared decoder graph's op patterns."""

from __future__ import annotations

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

    from vkpack.runtime.vk.backend import _merged_parts
    from vkpack.runtime.vk.ops import Weight

    buf, other = SimpleNamespace(size=1 << 20), SimpleNamespace(size=1 << 20)
    w = lambda b, off, rows: Weight(b, off, "F16", rows, 64)  # noqa: E731 - 128 bytes a row
    parts = [(0, 10, w(buf, 0, 10)), (10, 20, w(buf, 1280, 10)), (20, 25, w(buf, 4096, 5)),
             (25, 30, w(other, 4096 + 640, 5)), (30, 40, None), (40, 50, w(buf, 5376, 10))]
    merged = _merged_parts(parts)
    assert [(r0, m.offset, m.rows) for r0, m in merged] == [(0, 0, 20), (20, 4096, 5), (25, 4736, 5), (40, 5376, 10)]
