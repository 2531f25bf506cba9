"""Experts in the tiers: eviction by how often a router chooses them (runtime/policy.py ExpertHeat), within the
device budget, without changing a logit; and their hits and misses in /metrics.

The scripted test drives the policy alone (a cache of a few expert slots, a router that prefers two experts);
the others run a tiny transformers qwen2moe (tools/family_models.py) on the numpy backend at the budget that
holds every non-expert pack and a quarter of the experts' bytes (tests/test_moe.py `quarter_of_experts`).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import family_models as fm
from test_moe import quarter_of_experts

from vkpack.compiler.build import build
from vkpack.runtime.engine import Engine
from vkpack.runtime.policy import NEVER, AccessSchedule, BeladyPolicy, ExpertHeat
from vkpack.runtime.server.app import create_app
from vkpack.runtime.server.runner import BackgroundServer

PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, fm.VOCAB, 64)]
N_CTX = len(PROMPT) + 24


# ---- the policy alone, on a scripted choice sequence ----
def scripted_hit_rate(heat_on: bool) -> tuple[float, set[int], BeladyPolicy]:
    """One moe op (8 experts, packs 10..17, top 2) after packs 0, 1, 2; room for 4 expert packs. Two of experts
    0, 1, 2 are chosen in 80 % of the passes, two at random otherwise; the hit rate of 400 passes and the
    experts kept at the end."""
    schedule = AccessSchedule([0, 1, 2])
    key = (1, 0)
    heat = ExpertHeat({key: [[10 + e] for e in range(8)]}, {key: 2}, {key: 2}, schedule.length)
    schedule.experts = heat if heat_on else None
    policy = BeladyPolicy(schedule)
    rng = np.random.default_rng(0)
    resident: set[int] = set()
    hits = uses = 0
    for _ in range(400):
        n = 3 if rng.random() < 0.8 else 8
        chosen = sorted(rng.choice(n, 2, replace=False).tolist())
        heat.chose(key, chosen)
        for e in chosen:
            uses += 1
            if 10 + e in resident:
                hits += 1
                continue
            if len(resident) == 4:   # the chosen ones being read are pinned: not candidates
                resident.discard(policy.victim([p for p in resident if p - 10 not in chosen], 2))
            resident.add(10 + e)
    return hits / uses, resident, policy


def test_eviction_keeps_the_most_chosen_experts():
    rate, resident, policy = scripted_hit_rate(heat_on=True)
    assert {10, 11, 12} <= resident
    blind, _, _ = scripted_hit_rate(heat_on=False)   # every expert "never used again": any one may go
    assert rate > 0.7 and rate > blind + 0.1, (rate, blind)
    # hot experts rank among the graph's packs by expected reuse; a never-chosen expert still goes first
    heat = policy.schedule.experts
    assert heat.next_use(10, 0) < heat.next_use(13, 0) < NEVER
    assert policy.victim([0, 1, 10, 11, 12, 16], 0) == 16
    assert policy.schedule.next_use(1, 0) == 1   # the graph's own packs keep their Belady distances


def test_chosen_and_predicted_experts_count_as_used_at_their_op():
    key, nxt = (1, 0), (3, 0)
    heat = ExpertHeat({key: [[10], [11]], nxt: [[20], [21]]}, {key: 1, nxt: 1}, {key: 2, nxt: 5}, 8)
    heat.chose(nxt, [0])
    heat.chose(key, [1])
    assert heat.next_use(11, 2) == 0              # chosen now, read at this op
    assert heat.next_use(11, 3) >= 8              # once past its op: by its share of passes again
    assert heat.predict(nxt, "last") == [20]
    assert heat.next_use(20, 2) == 3              # expected at the next moe op
    assert heat.predict(nxt, "popular") == [20]
    assert heat.next_use(21, 2) == NEVER          # never chosen


# ---- a real tiny mixture of experts ----
@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    folder = fm.make_hf("qwen2moe", tmp_path_factory.mktemp("moe") / "hf", seed=11)
    path = folder.parent / "m.vkpack"
    build(folder, path, progress=False)
    return path, quarter_of_experts(path)


def greedy(path, vram_gb: float | None, heat: bool = True, prefetch: str | None = None) -> tuple[list[int], dict]:
    with Engine(path, device="numpy", vram_gb=vram_gb, context=N_CTX) as eng:
        if not heat:
            eng.schedule.experts = None
        eng.executor.weights.expert_prefetch = prefetch
        eng.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True)
        stats = eng.stats()
        if vram_gb is not None:   # the tier's real memory and its peak within the budget
            assert sum(b.nbytes for b in eng.tier.backing.blocks) <= vram_gb * 2**30
            assert stats["peak_device_bytes"] <= vram_gb * 2**30
            assert eng.tier.evictions > 0
        return list(eng.last_ids), stats


def test_budget_held_and_tokens_unchanged(moe):
    path, quarter = moe
    want, _ = greedy(path, None)
    blind_ids, blind = greedy(path, quarter, heat=False)
    ids, hot = greedy(path, quarter)
    assert ids == blind_ids == want          # the numpy logits do not depend on what stays resident
    assert hot["expert_hits"] + hot["expert_misses"] == blind["expert_hits"] + blind["expert_misses"]
    assert hot["expert_misses"] < blind["expert_misses"]
    for how in ("last", "popular"):
        assert greedy(path, quarter, prefetch=how)[0] == want


def test_expert_counters_in_metrics(moe):
    path, quarter = moe
    with (Engine(path, device="numpy", vram_gb=quarter, context=N_CTX) as eng,
          BackgroundServer(create_app(eng, model_name="m")) as srv):
        eng.generate(PROMPT[:8], max_tokens=4, temperature=0, ignore_eos=True)
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        stats = eng.stats()
    got = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("vkpack_expert")}
    assert got == {"vkpack_expert_hits_total": stats["expert_hits"],
                   "vkpack_expert_misses_total": stats["expert_misses"]}
    assert got["vkpack_expert_misses_total"] > 0
