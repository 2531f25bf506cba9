"""make_synthetic's qwen3moe GGUFs are laid out as llama.cpp's converter writes them, build and run, and
tools/bench_moe.py runs end to end (issue 14's benchmark, checked here on the CPU in seconds)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import stat
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import bench_moe
import make_synthetic as ms
from vkpack.runtime import vk
from vkpack.runtime.cli import main as vkpack_main
from vkpack.runtime.engine import Engine

GT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    return {dt: ms.write_gguf(d / f"tiny-{dt}.gguf", ms.Spec.moe_tiny(), dt, seed=3) for dt in ("F16", "Q4_0", "Q8_0")}


@pytest.mark.parametrize("dtype", ["F16", "Q4_0", "Q8_0"])
def test_experts_and_metadata_are_as_llama_cpp_writes_them(tiny, dtype):
    spec = ms.Spec.moe_tiny()
    r = gguf.GGUFReader(tiny[dtype])
    t = {x.name: x for x in r.tensors}
    h, e, f = spec.hidden, spec.experts, spec.expert_ffn
    for i in range(spec.layers):  # ne order, as llama.cpp's loader asks for them (src/models/qwen3moe.cpp)
        b = f"blk.{i}."
        assert list(t[b + "ffn_gate_inp.weight"].shape) == [h, e] and t[b + "ffn_gate_inp.weight"].tensor_type == GT.F32
        assert list(t[b + "ffn_gate_exps.weight"].shape) == [h, f, e]
        assert list(t[b + "ffn_up_exps.weight"].shape) == [h, f, e]
        assert list(t[b + "ffn_down_exps.weight"].shape) == [f, h, e]
        assert {t[b + f"ffn_{m}_exps.weight"].tensor_type for m in ("gate", "up", "down")} == {GT[dtype]}
        assert list(t[b + "attn_q_norm.weight"].shape) == [spec.hd] and b + "ffn_gate.weight" not in t
    assert "output.weight" in t
    fields = {k: v.parts[-1] for k, v in r.fields.items()}
    want = {"expert_count": e, "expert_used_count": spec.experts_used, "expert_feed_forward_length": f,
            "feed_forward_length": spec.ffn, "block_count": spec.layers, "embedding_length": h,
            "attention.head_count": spec.heads, "attention.head_count_kv": spec.kv_heads,
            "attention.key_length": spec.hd, "attention.value_length": spec.hd, "context_length": spec.context}
    assert {k: int(fields[f"qwen3moe.{k}"][0]) for k in want} == want
    assert fields["qwen3moe.rope.freq_base"][0] == 1e6
    assert bytes(fields["general.architecture"]).decode() == "qwen3moe"
    assert bytes(fields["tokenizer.ggml.model"]).decode() == "gpt2"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == spec.vocab


@pytest.mark.parametrize("dtype", ["Q4_0", "Q8_0"])
def test_random_blocks_have_the_specs_std_and_signed_scales(dtype):
    t = ms.TensorDef("x", "x", (4, 96, 256))
    b = ms._random_sym_blocks(t, GT[dtype], 0, 0.02, 0, 4)
    assert b.nbytes == ms._tensor_nbytes(t, GT[dtype])
    v = gguf.quants.dequantize(b, GT[dtype])
    assert abs(float(v.std()) - 0.02) < 0.001 and abs(float(v.mean())) < 0.001
    d = b.reshape(-1, gguf.GGML_QUANT_SIZES[GT[dtype]][1])[:, :2].copy().view("<f2").astype(np.float32).ravel()
    assert 0.4 < float((d < 0).mean()) < 0.6
    np.testing.assert_array_equal(b, ms._random_sym_blocks(t, GT[dtype], 0, 0.02, 0, 4))  # seeded


def test_the_30b_preset_has_qwen3_30b_a3b_shapes():
    s = ms.Spec.qwen3_30b_a3b()
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.hd, s.experts, s.experts_used, s.expert_ffn, s.vocab) == \
        (48, 2048, 32, 4, 128, 128, 8, 768, 151936)
    assert round(s.n_params() / 1e9, 1) == 30.5
    assert 17.0e9 < ms._nbytes(s.tensors(), "Q4_0") < 17.5e9


def test_moe_specs_are_refused_where_they_cannot_be_written(tmp_path):
    with pytest.raises(ValueError, match="experts"):
        ms.Spec(arch="qwen3", experts=4, experts_used=2, expert_ffn=32)
    with pytest.raises(ValueError, match="experts"):
        ms.Spec(arch="qwen3moe")
    with pytest.raises(ValueError, match="GGUF only"):
        ms.write_hf(tmp_path / "hf", ms.Spec.moe_tiny())
    with pytest.raises(ValueError, match="mix"):
        ms.gguf_types(ms.Spec.moe_tiny().tensors(), "Q4_K_M")


def test_cli_writes_the_tiny_preset(tmp_path):
    out = tmp_path / "m.gguf"
    assert ms.main(["--preset", "moe_tiny", "--dtype", "Q8_0", "--experts", "4", "-o", str(out)]) == 0
    assert int(gguf.GGUFReader(out).fields["qwen3moe.expert_count"].parts[-1][0]) == 4


@pytest.mark.parametrize("dtype", ["F16", "Q4_0"])
def test_tiny_moe_builds_with_vkpack_build_and_runs_on_numpy(tiny, tmp_path, dtype):
    out = tmp_path / "m.vkpack"
    assert vkpack_main(["build", str(tiny[dtype]), "-o", str(out)]) == 0
    with Engine(out, device="numpy", vram_gb=0.0015) as eng:  # about half the experts fit
        ids = list(eng.stream([5, 6, 7, 8], max_tokens=6, temperature=0, ignore_eos=True))
        s = eng.stats()
    assert len("".join(ids)) > 0 and s["expert_hits"] + s["expert_misses"] > 0
    assert 0 <= s["expert_hit_rate"] <= 1


FAKE_LLAMA_BENCH = """#!{py}
import json, sys
a = sys.argv
ncpu = int(a[a.index("-ncmoe") + 1]) if "-ncmoe" in a else (99 if "-ot" in a else 200)
print(json.dumps([{{"n_prompt": int(a[a.index("-p") + 1]), "n_gen": 0, "avg_ts": 1000.0 - ncpu}},
                  {{"n_prompt": 0, "n_gen": int(a[a.index("-n") + 1]), "avg_ts": 100.0 - ncpu / 4}}]))
"""


def test_bench_moe_quick_runs_end_to_end(tmp_path):
    """--quick --device cpu with a stand-in llama-bench (prints llama-bench's JSON rows): every row saved,
    the --n-cpu-moe sweep starts at the fit of each budget, ratios against the best that fits."""
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(py=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    assert bench_moe.main(["--quick", "--device", "cpu", "--work", str(tmp_path / "w"), "--out", str(out),
                           "--llama-bench", str(fake), "--threads", "2"]) == 0
    rep = json.loads((out / "bench_moe.json").read_text())
    assert [r["vram_gb"] for r in rep["runs"]] == [0.003, 0.004]
    for r in rep["runs"]:
        assert "error" not in r, r
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and 0 <= r["expert_hit_rate"] <= 1
        assert r["expert_hits"] + r["expert_misses"] > 0
    split = rep["split"]
    n_ctx = rep["prompt"] + rep["decode"]
    ks = [int(r["flags"][-1]) for r in rep["llama_cpp"] if "-ncmoe" in r["flags"]]
    for b in rep["budgets"]:
        k = bench_moe.fitting_ncmoe(split, b * 2**30, n_ctx)
        assert k in ks and (k == 0 or bench_moe.ncmoe_bytes(split, k - 1, n_ctx) > b * 2**30)
    assert [r["label"] for r in rep["llama_cpp"][-2:]] == ["-ngl 99 -ot exps=CPU", "-ngl 0"]
    assert all(r["decode_tps"] for r in rep["llama_cpp"])
    md = (out / "bench_moe.md").read_text()
    assert md.count("x (`-ngl 99 --n-cpu-moe") >= 2 and "| llama.cpp |" in md
    docs = tmp_path / "benchmarks.md"
    text = bench_moe.render(rep, "note")
    bench_moe.write_section("bench_moe", f"## {bench_moe.SECTION}", text, docs=docs)
    assert "## Mixture of experts on the GPU (issue 14)" in docs.read_text()


@pytest.mark.skipif(not vk.available()[0], reason="no Vulkan device")
def test_bench_moe_quick_budgets_fit_the_device_backends(tmp_path):
    """--quick on the vulkan and hybrid devices: its default budgets hold what their tiers need besides the
    experts (they were the cpu device's, under the Vulkan tier's minimum), so every row runs."""
    out = tmp_path / "out"
    assert bench_moe.main(["--quick", "--device", "vulkan,hybrid", "--work", str(tmp_path / "w"), "--out", str(out),
                           "--threads", "2", "--decode", "4"]) == 0
    rep = json.loads((out / "bench_moe.json").read_text())
    assert {r["device"] for r in rep["runs"]} == {"vulkan", "hybrid"} and len(rep["runs"]) == 4
    for r in rep["runs"]:
        assert "error" not in r, r
        assert r["decode_tps"] > 0 and r["expert_hits"] + r["expert_misses"] > 0


def test_gguf_split_counts_every_byte(tiny):
    split = bench_moe.gguf_split(tiny["Q4_0"])
    r = gguf.GGUFReader(tiny["Q4_0"])
    assert split["non_expert_bytes"] + sum(split["expert_bytes_per_layer"]) == sum(int(t.n_bytes) for t in r.tensors)
    spec = ms.Spec.moe_tiny()
    assert split["kv_bytes_per_token"] == 2 * spec.layers * spec.kv_heads * spec.hd * 2
    assert Path(tiny["Q4_0"]).exists()


def _consecutive_overlap(path: Path, layers: int, k: int, tokens: int, monkeypatch) -> list[float]:
    """Per layer: the mean share of its k experts a decode token has in common with the token before."""
    import vkpack.runtime.cpu.ops as cpu_ops
    from vkpack.compiler.build import build

    chosen: list[set] = []
    real = cpu_ops.route

    def spy(logits, k_, router, norm):
        ids, w = real(logits, k_, router, norm)
        chosen.append(set(np.ravel(ids).tolist()))
        return ids, w

    monkeypatch.setattr(cpu_ops, "route", spy)
    build(path, path.with_suffix(".vkpack"), progress=False)
    with Engine(path.with_suffix(".vkpack"), device="numpy") as eng, eng.kv_session(tokens + 1) as kv:
        ids = np.random.default_rng(0).integers(3, eng.hp["vocab"], tokens)
        for i, t in enumerate(ids):
            eng.forward_batch([([int(t)], i, kv)])
    per_layer = [chosen[i::layers] for i in range(layers)]
    return [float(np.mean([len(a & b) / k for a, b in itertools.pairwise(s)])) for s in per_layer]


def test_embed_std_makes_routing_near_uniform(tmp_path, monkeypatch):
    """make_synthetic's module doc: with every weight at std 0.02 the routers of deeper layers pick nearly the
    same experts for every token; with the embedding at std 1.0 they pick near-uniformly (k of n at random:
    k / n in common with the token before)."""
    spec = ms.Spec(arch="qwen3moe", layers=4, hidden=512, heads=4, kv_heads=2, ffn=512, vocab=2048,
                   experts=32, experts_used=4, expert_ffn=64)
    k, n = spec.experts_used, spec.experts
    collapsed = _consecutive_overlap(ms.write_gguf(tmp_path / "c.gguf", spec, "Q4_0", seed=1), 4, k, 24, monkeypatch)
    spec = dataclasses.replace(spec, embed_std=1.0)
    uniform = _consecutive_overlap(ms.write_gguf(tmp_path / "u.gguf", spec, "Q4_0", seed=1), 4, k, 24, monkeypatch)
    assert max(uniform) < 2.5 * k / n
    assert min(collapsed[1:]) > 3 * k / n
