"""The hybrid backend (runtime/hybrid): its planner on stated rates, and whole models split between
the native CPU kernels and Vulkan (lavapipe in CI) against the numpy backend and transformers.

Tolerances as tests/test_correctness.py: logits within 1e-3 relative; greedy tokens equal for 32 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from vk_helpers import assert_device_peak_within, greedy, rel_err
from vkpack.runtime import native, vk
from vkpack.runtime.engine import Engine
from vkpack.runtime.hybrid.plan import StepCost, evaluate, plan_pass
from vkpack.runtime.hybrid.rates import Rates

GB = 10**9
REL_TOL = 1e-3


def _rates(cpu_gbs: float = 80.0, link_gbs: float = 49.0) -> Rates:
    """An H100 host's rough rates: a 16-core CPU reading F16 at `cpu_gbs`, slowing with tokens as a
    compute-bound product does."""
    return Rates(link=link_gbs * GB, gpu_read=3000 * GB, sync=50e-6,
                 cpu={"F16": {1: cpu_gbs * GB, 8: cpu_gbs * GB, 32: cpu_gbs * GB / 8}})


def _model_8b() -> list[StepCost]:
    """The 8B shape's steps: embedding gather, 32 x (attention 0.08 GiB + MLP 0.35 GiB), head 1 GiB."""
    steps = [StepCost(0, "embed", 0, (), False)]
    for layer in range(32):
        for kind, n in (("attn", 84 << 20), ("mlp", 352 << 20)):
            steps.append(StepCost(len(steps), f"blk.{layer}.{kind}", n, (("F16", n),), True))
    steps.append(StepCost(len(steps), "head", 1 << 30, (("F16", 1 << 30),), False))
    return steps


def test_plan_keeps_a_model_that_fits_on_the_gpu():
    steps = _model_8b()
    plan = plan_pass(steps, _rates(), 1, weight_room=sum(s.nbytes for s in steps), host_room=None)
    assert plan.host == frozenset() and plan.streamed_bytes == 0


def test_plan_decode_splits_between_cpu_and_link():
    steps = _model_8b()
    room, window = 3 << 30, 1 << 30
    plan = plan_pass(steps, _rates(), 1, room, None, window=window)
    gpu_only = plan_pass(steps, _rates(), 1, room, None, allowed=frozenset(), window=window)
    assert plan.host, "a model 4x the budget: the CPU takes part of it at one token"
    # the run of CPU steps is contiguous and ends at the last layer, the head stays on the GPU
    idx = sorted(plan.host)
    assert idx == list(range(idx[0], idx[-1] + 1)) and idx[-1] == len(steps) - 2
    assert plan.seconds < gpu_only.seconds / 1.6
    # streaming takes a window of the room and hides only half of it behind the CPU; beyond that a
    # streamed byte waits for the link (49 GB/s) where the CPU reads it at 80: the GPU keeps what fits
    assert plan.streamed_bytes == 0 and sum(s.nbytes for s in steps) - plan.host_bytes <= room
    # a prefill multiplies the CPU's time by its tokens, not the link's: it streams
    assert plan_pass(steps, _rates(), 512, room, None, allowed=plan.host, window=window).host == frozenset()


def test_plan_streams_nothing_where_the_gpu_steps_fit():
    """A plan whose GPU steps fit the tier's room streams nothing and needs no window for packs in
    flight: the GPU keeps all of its room, not the room less the window."""
    steps = _model_8b()
    room, window = 4 << 30, 1 << 30
    slow_link = _rates(link_gbs=1.0)
    plan = plan_pass(steps, slow_link, 1, room, None, window=window)
    gpu_bytes = sum(s.nbytes for s in steps) - plan.host_bytes
    assert plan.streamed_bytes == 0 and room - (436 << 20) < gpu_bytes <= room


def test_plan_counts_streaming_beyond_the_window_against_the_pass():
    """The H100 host's sweep at 4 GiB (runtime/hybrid/plan.py): beside the CPU's steps, streaming a few
    hundred MB cost nothing and streaming 1.7 GiB more added 58 ms a token. The model now expects
    the plans that stream more to be slower, and plans the one that streams least."""
    rates = Rates(link=45.1 * GB, gpu_read=825 * GB, sync=125e-6, host_read=107 * GB,
                  cpu={"F16": {1: 100.4 * GB, 8: 87.7 * GB, 32: 25.3 * GB}})
    steps = _model_8b()
    room, window = 3_300_000_000, 1 << 30
    layers = [s.index for s in steps if s.movable]
    plans = [evaluate(steps, rates, 1, room, frozenset(layers[-k:]), window) for k in (56, 52, 48, 44)]
    assert [p.streamed_bytes for p in plans] == sorted(p.streamed_bytes for p in plans)
    assert plans[-1].seconds - plans[0].seconds > 0.015
    assert plan_pass(steps, rates, 1, room, None, window=window).streamed_bytes == plans[0].streamed_bytes == 0


def test_plan_prefill_streams_with_the_h100_hosts_rates():
    """The rates the H100 host measured (docs/benchmarks.md): a 512-token prefill is no repeating pass,
    so the CPU's time does not hide behind the link's; all-GPU streaming wins (it measured 1,408 tok/s
    against 798 with one MLP step on the CPU)."""
    rates = Rates(link=32.8 * GB, gpu_read=784 * GB, sync=99e-6, cpu={"F16": {1: 124 * GB, 8: 81.6 * GB, 32: 23.3 * GB}})
    steps = _model_8b()
    decode = plan_pass(steps, rates, 1, 3_900_000_000, None)
    assert decode.host
    assert plan_pass(steps, rates, 512, 3_900_000_000, None, allowed=decode.host).host == frozenset()


def test_plan_counts_system_memory_shared_by_cpu_and_stream():
    """The CPU's weights and the streamed ones are both read from DRAM each token: with that rate
    known, no plan beats the DRAM's time for what VRAM does not hold (the H100 host: the CPU alone
    91 GB/s, beside a 33 GB/s stream 66)."""
    base = Rates(link=32.8 * GB, gpu_read=784 * GB, sync=99e-6, cpu={"F16": {1: 124 * GB, 8: 81.6 * GB, 32: 23.3 * GB}})
    shared = Rates(**{**base.__dict__, "host_read": 100 * GB})
    steps, room = _model_8b(), 2_800_000_000
    free, bound = plan_pass(steps, base, 1, room, None), plan_pass(steps, shared, 1, room, None)
    assert bound.seconds > free.seconds
    beyond_vram = sum(s.nbytes for s in steps) - room
    assert bound.seconds >= beyond_vram / (100 * GB) * 0.99


def test_plan_respects_the_ram_budget_and_a_slow_cpu():
    steps = _model_8b()
    plan = plan_pass(steps, _rates(), 1, 3 << 30, host_room=2 << 30)
    assert 0 < plan.host_bytes <= 2 << 30
    slow = plan_pass(steps, _rates(cpu_gbs=0.5), 1, 3 << 30, None)
    assert slow.host == frozenset()


def test_rates_interpolate_between_batches():
    r = _rates()
    one = r.cpu_seconds("F16", GB, 1)
    assert one == pytest.approx(1 / 80)
    assert r.cpu_seconds("F16", GB, 20) == pytest.approx((1 / 80 + 8 / 80) / 2)
    assert r.cpu_seconds("F16", GB, 64) == pytest.approx(2 * 8 / 80)
    assert r.cpu_seconds("Q4_K", GB, 1) == pytest.approx(one)  # a type not measured: the slowest measured


# ---- whole models on lavapipe ----
ok_vk, why_vk = vk.available()
ok_native, why_native = native.available()
needs_both = pytest.mark.skipif(not (ok_vk and ok_native), reason=f"Vulkan: {why_vk or 'ok'}; native: {why_native or 'ok'}")


def _hybrid(host_steps):
    from vkpack.runtime.hybrid.backend import HybridBackend
    from vkpack.runtime.native.backend import NativeCpuBackend
    from vkpack.runtime.vk.backend import VulkanBackend

    return lambda a: HybridBackend(a, VulkanBackend(a), NativeCpuBackend(a), host_steps=host_steps)


@pytest.fixture(scope="module")
def smol_ref(smollm2_archive):
    with Engine(smollm2_archive, device="numpy") as eng:
        ids = eng.encode("Once upon a time, in a land far away,")
        yield ids, eng.logits(ids), greedy(eng, ids, 32), eng.model_bytes


LAYERS = frozenset(range(31, 61))  # SmolLM2's steps of layers 15-29 (embed is step 0, head step 61)
PLANS = {
    "decode-on-cpu": lambda t: LAYERS if t == 1 else frozenset(),   # prefill streams, decode splits: KV goes down
    "prefill-on-cpu": lambda t: LAYERS if t > 1 else frozenset(),   # and back up
    "alternating": lambda t: frozenset(range(1, 61, 2)),            # every attention on the CPU: 60 hand-overs
}


CASES = [("decode-on-cpu", True), ("prefill-on-cpu", False), ("alternating", False),
         pytest.param("decode-on-cpu", False, marks=pytest.mark.slow),
         pytest.param("prefill-on-cpu", True, marks=pytest.mark.slow),
         pytest.param("alternating", True, marks=pytest.mark.slow)]


@needs_both
@pytest.mark.parametrize(("plan", "quarter"), CASES)
def test_smollm2_hybrid_matches_numpy(smollm2_archive, smol_ref, plan, quarter):
    ids, ref_logits, ref_tokens, model_bytes = smol_ref
    vram = model_bytes / 4 / 2**30 if quarter else None
    with Engine(smollm2_archive, device=_hybrid(PLANS[plan]), vram_gb=vram) as eng:
        assert eng.backend.name == "hybrid"
        assert rel_err(eng.logits(ids), ref_logits) < REL_TOL
        assert greedy(eng, ids, 32) == ref_tokens
        passes = eng.backend.passes
        assert passes["split"] > 0
        if vram is not None:
            assert_device_peak_within(eng, vram)
            assert eng.stats()["peak_device_bytes"] <= eng.stats()["device_budget"]


@needs_both
def test_hybrid_leaves_cpu_packs_out_of_the_tier(smollm2_archive, smol_ref):
    """Packs of steps the CPU computes are never loaded into the device tier in such passes."""
    ids, _, ref_tokens, model_bytes = smol_ref
    with Engine(smollm2_archive, device=_hybrid(lambda t: LAYERS), vram_gb=model_bytes / 4 / 2**30) as eng:
        assert greedy(eng, ids, 8) == ref_tokens[:8]
        cpu_packs = {p for si in LAYERS for p in eng.archive.graph["steps"][si]["packs"]}
        assert cpu_packs and not cpu_packs & set(eng.tier.entries)
        assert eng.backend.host_bytes() >= sum(eng.archive.packs[p].raw_size for p in cpu_packs)


@needs_both
def test_hybrid_planned_from_rates(smollm2_archive, smol_ref):
    """With rates that make the CPU worth it (as given: not calibrated), a model 4x its budget decodes
    split, prefills on the GPU, and still gives the reference's tokens; the plans are printed."""
    from vkpack.runtime.hybrid.backend import HybridBackend
    from vkpack.runtime.native.backend import NativeCpuBackend
    from vkpack.runtime.vk.backend import VulkanBackend

    ids, _, ref_tokens, model_bytes = smol_ref
    dtypes = ("Q4_1", "Q6_K", "Q8_0", "F32", "F16")
    rates = Rates(link=1 * GB, gpu_read=100 * GB, sync=1e-5,
                  cpu={dt: {1: 10 * GB, 8: 0.1 * GB, 32: 0.01 * GB} for dt in dtypes})
    make = lambda a: HybridBackend(a, VulkanBackend(a), NativeCpuBackend(a), rates=rates, calibrate=False)
    with Engine(smollm2_archive, device=make, vram_gb=model_bytes / 4 / 2**30) as eng:
        assert greedy(eng, ids, 32) == ref_tokens
        decode, prefill = eng.backend.plan(1), eng.backend.plan(len(ids))
        assert decode.host and not prefill.host
        info = eng.backend.placement()
        text = "\n".join(info["lines"])
        assert "CPU computes" in text and "GPU computes every step" in text
        assert info["rates"]["link"] == rates.link and info["plans"][0]["tokens"] == 1
        # the gather is held only where the embedding fits the RAM budget beside the CPU's steps
        be = eng.backend
        steps_only = be.held_steps - be.gathers
        packs = {p for si in steps_only for p in be.steps[si]["packs"]}
        room = be.host_room
        try:
            be.host_room = sum(be.cpu.pack_bytes(p) for p in packs)
            assert be._gathers_within(steps_only) == frozenset()
        finally:
            be.host_room = room
        assert be._gathers_within(steps_only) == be.gathers
        # every pass splits: the prefill gathers its rows on the CPU (the GPU computes the rest)
        assert eng.backend.passes["split"] >= 32 and eng.backend.host_steps(len(ids)) == eng.backend.gathers


def test_calibration_scales_the_one_token_cpu_rate():
    """Eight decode passes after the skipped ones: CPU time 1.25x the expected one scales the one-token rates
    by 0.8 (the batched ones stay) and raises the host's read rate to what the CPU read."""
    from vkpack.runtime.hybrid.calibrate import PASSES, SKIP_PASSES, CpuCalibration
    from vkpack.runtime.hybrid.plan import Plan

    rates = Rates(link=30 * GB, gpu_read=2000 * GB, sync=1e-4, host_read=60 * GB,
                  cpu={"F16": {1: 100 * GB, 8: 70 * GB, 32: 25 * GB}})
    plan = Plan(1, frozenset({5, 6}), 0.1, 0.1, 0.001, 0.0, 10 * GB, 0)
    cal = CpuCalibration()
    results = [cal.add(plan, 0.125) for _ in range(SKIP_PASSES + PASSES)]
    assert results == [False] * (SKIP_PASSES + PASSES - 1) + [True] and cal.ratio == pytest.approx(1.25)
    out = cal.corrected(rates)
    assert out.cpu["F16"] == {1: pytest.approx(80 * GB), 8: 70 * GB, 32: 25 * GB}
    assert out.host_read == pytest.approx(80 * GB)
    assert not cal.add(plan, 1.0), "corrects once"
    assert cal.room_excess == 0, "nothing uploaded"
    slow_start = CpuCalibration()
    for i in range(SKIP_PASSES + PASSES):
        slow_start.add(plan, 1.0 if i == SKIP_PASSES else 0.125)   # one slow pass among the counted: the median
    assert slow_start.ratio == pytest.approx(1.25)
    near = CpuCalibration()
    assert [near.add(plan, 0.102) for _ in range(SKIP_PASSES + PASSES)][-1] and near.ratio == pytest.approx(1.02)
    assert near.corrected(rates) is rates, "within the tolerance: the rates stay"
    prefill = Plan(512, frozenset(), 1.0, 0.0, 0.1, 0.5, 0, 10 * GB)
    assert not CpuCalibration().add(prefill, 0.0)


def test_calibration_finds_the_room_a_plan_overestimated():
    """A plan that should stream nothing but uploads 100 MB a pass: the room was too big by 1.25x that;
    a plan that streams by design says nothing about the room."""
    from vkpack.runtime.hybrid.calibrate import PASSES, SKIP_PASSES, CpuCalibration
    from vkpack.runtime.hybrid.plan import Plan

    fits = Plan(1, frozenset({5, 6}), 0.1, 0.1, 0.001, 0.0, 10 * GB, 0)
    cal = CpuCalibration()
    for i in range(SKIP_PASSES + PASSES):
        cal.add(fits, 0.1, uploaded=(10**9 if i < SKIP_PASSES else 100 * 10**6))   # skipped passes uncounted
    assert cal.room_excess == 125 * 10**6
    streams = Plan(1, frozenset({5, 6}), 0.1, 0.1, 0.001, 0.01, 10 * GB, 500 * 10**6)
    cal = CpuCalibration()
    for _ in range(SKIP_PASSES + PASSES):
        cal.add(streams, 0.1, uploaded=500 * 10**6)
    assert cal.room_excess == 0


@needs_both
def test_hybrid_calibrates_a_wrong_cpu_rate(smollm2_archive, smol_ref):
    """Rates that claim a CPU 1000x faster than this one put every held step on it; the decode passes
    measure the truth, the one-token plan is made again from it (the CPU keeps less, the link streams
    more), nothing is written to the rates cache (the rates were given), and the tokens stay the reference's."""
    from vkpack.runtime.hybrid.backend import HybridBackend
    from vkpack.runtime.native.backend import NativeCpuBackend
    from vkpack.runtime.vk.backend import VulkanBackend

    ids, _, ref_tokens, model_bytes = smol_ref
    dtypes = ("Q4_1", "Q6_K", "Q8_0", "F32", "F16")
    rates = Rates(link=20 * GB, gpu_read=1000 * GB, sync=1e-5,
                  cpu={dt: {1: 5000 * GB, 8: 0.1 * GB, 32: 0.01 * GB} for dt in dtypes})
    make = lambda a: HybridBackend(a, VulkanBackend(a), NativeCpuBackend(a), rates=rates)
    with Engine(smollm2_archive, device=make, vram_gb=model_bytes / 4 / 2**30) as eng:
        be = eng.backend
        before = be.plan(1)
        assert before.host < be.held_steps and be.gathers <= be.held_steps   # the gather and a margin held too
        assert greedy(eng, ids, 32) == ref_tokens
        assert be.calibration.ratio > 20
        assert be.rates.cpu["Q4_1"][1] < rates.cpu["Q4_1"][1] / 20 and be.rates.cpu["Q4_1"][8] == rates.cpu["Q4_1"][8]
        after = be.plan(1)
        assert after.host < before.host
        assert any(line.startswith("calibrated:") for line in be.describe())
        assert be.placement()["cpu_calibration"] == be.calibration.ratio


@needs_both
def test_hybrid_gathers_on_the_cpu_where_it_computes_no_layer(smollm2_archive, smol_ref):
    """A CPU too slow to take any layer, a model 4x its budget: the CPU still gathers the embedding's rows
    (held; every pass split at the gather), and the tokens stay the reference's."""
    from vkpack.runtime.hybrid.backend import HybridBackend
    from vkpack.runtime.native.backend import NativeCpuBackend
    from vkpack.runtime.vk.backend import VulkanBackend

    ids, _, ref_tokens, model_bytes = smol_ref
    dtypes = ("Q4_1", "Q6_K", "Q8_0", "F32", "F16")
    rates = Rates(link=10 * GB, gpu_read=100 * GB, sync=1e-5,
                  cpu={dt: {1: 1e-3 * GB, 8: 1e-3 * GB, 32: 1e-3 * GB} for dt in dtypes})
    make = lambda a: HybridBackend(a, VulkanBackend(a), NativeCpuBackend(a), rates=rates, calibrate=False)
    with Engine(smollm2_archive, device=make, vram_gb=model_bytes / 4 / 2**30) as eng:
        be = eng.backend
        assert be.held_steps == be.gathers and not be.plan(1).host
        assert greedy(eng, ids, 8) == ref_tokens[:8]
        assert be.passes["split"] >= 8 and be.passes["gpu_only"] == 0
        assert "the CPU gathers the embedding's rows" in be.describe()


@needs_both
@pytest.mark.parametrize("vram_fraction", [0.25, pytest.param(None, marks=pytest.mark.slow)],
                         ids=["vram-25pct", "unlimited"])
def test_smollm2_hybrid_greedy_matches_transformers(smollm2_archive, smollm2_gguf, vram_fraction):
    """The issue's bar: greedy tokens of the hybrid path (prefill on the GPU, decode split) equal
    transformers' for 32 steps, at 25 % (and unlimited, with -m slow)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_reference

    model, _tok = hf_reference.load_hf_gguf(smollm2_gguf)
    with Engine(smollm2_archive, device="numpy") as probe:
        vram = None if vram_fraction is None else probe.model_bytes * vram_fraction / 2**30
        ids = probe.encode("The capital of France is")
    with Engine(smollm2_archive, device=_hybrid(PLANS["decode-on-cpu"]), vram_gb=vram) as eng:
        assert greedy(eng, ids, 32) == hf_reference.hf_greedy(model, ids, 32)


@needs_both
def test_rates_measured_once_per_machine(tmp_path, monkeypatch, smollm2_archive):
    """Rates are measured on a cache miss, read back on the next start, and measured again only for a
    weight type not measured before."""
    from vkpack.pack_format.reader import Archive
    from vkpack.runtime.hybrid import rates as rates_mod
    from vkpack.runtime.native.backend import NativeCpuBackend

    monkeypatch.setenv("VKPACK_CACHE", str(tmp_path))
    monkeypatch.setattr(rates_mod, "PROBE_BYTES", 1 << 20)
    monkeypatch.setattr(rates_mod, "CPU_PROBE_BYTES", 4 << 20)
    dev = vk.Device()
    try:
        cpu = NativeCpuBackend(Archive(smollm2_archive))
        first = rates_mod.measure_rates(dev, cpu, {"Q4_1"})
        assert first.link > 0 and first.gpu_read > 0 and first.sync > 0 and set(first.cpu) == {"Q4_1"}
        assert sorted(first.cpu["Q4_1"]) == [1, 8, 32] and all(r > 0 for r in first.cpu["Q4_1"].values())
        monkeypatch.setattr(rates_mod, "_measure_link", lambda d: pytest.fail("measured again"))
        assert rates_mod.measure_rates(dev, cpu, {"Q4_1"}) == first
        more = rates_mod.measure_rates(dev, cpu, {"Q4_1", "Q8_0"})
        assert more.cpu["Q4_1"] == first.cpu["Q4_1"] and set(more.cpu) == {"Q4_1", "Q8_0"}
        assert (tmp_path / "rates.json").exists()
    finally:
        dev.close()


@needs_both
def test_hybrid_by_name_resident_is_the_gpu_pass(smollm2_archive, smol_ref):
    """`--device hybrid` with a model that fits: nothing is held for the CPU, no rates are measured,
    and every pass is the Vulkan backend's own."""
    ids, ref_logits, ref_tokens, _ = smol_ref
    with Engine(smollm2_archive, device="hybrid") as eng:
        assert eng.backend.name == "hybrid" and eng.backend.host_bytes() == 0
        assert rel_err(eng.logits(ids), ref_logits) < REL_TOL
        assert greedy(eng, ids, 8) == ref_tokens[:8]
        info = eng.backend.placement()
        assert info["rates"] is None and info["held_steps"] == [] and info["passes"]["split"] == 0


def test_inspect_plan_prints_where_passes_run(smollm2_archive, capsys):
    from vkpack.runtime.cli import main

    assert main(["inspect", str(smollm2_archive), "--plan", "--device", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "plan: backend numpy" in out and "numpy computes every step of every pass" in out


@needs_both
def test_hybrid_batch_of_sequences_matches_numpy(smollm2_archive):
    """Two sequences in one pass (the server's batches): prefilled together on the GPU, then decoded
    together with layers on the CPU, each sequence's KV rows moved down for its own positions."""
    plan = lambda t: LAYERS if t <= 2 else frozenset()
    a, b = list(range(200, 213)), list(range(300, 307))
    outs = []
    for device in ("numpy", _hybrid(plan)):
        with Engine(smollm2_archive, device=device) as eng, eng.kv_session(32) as ka, eng.kv_session(32) as kb:
            first = eng.forward_batch([(a, 0, ka), (b, 0, kb)])
            ta, tb = (int(np.argmax(r)) for r in first)
            rows = [first]
            for i in range(3):
                nxt = eng.forward_batch([([ta], len(a) + i, ka), ([tb], len(b) + i, kb)])
                ta, tb = (int(np.argmax(r)) for r in nxt)
                rows.append(nxt)
            outs.append(np.concatenate(rows))
            if device != "numpy":
                assert eng.backend.passes["split"] == 3 and eng.backend.passes["gpu_only"] == 1
    assert rel_err(outs[1], outs[0]) < REL_TOL
