"""Mixtures of experts (mixtral, qwen2moe, qwen3moe, olmoe) against transformers, and their choice records.

Tiny random models that transformers builds (tools/family_models.py: 4 layers, 8 experts of 256, top 2; qwen2moe
with its sigmoid-gated shared expert), as saved HF folders and as GGUFs in llama.cpp's layout (3-D `ffn_*_exps`,
tools/hf_to_gguf.py). Checked on the numpy backend (the reference) and the native CPU backend: logits at every
position of a 64-token prompt (one decode step each) within REL_TOL of transformers in float32 running the same
(for a quantized GGUF: dequantized) weights, and 32 greedy tokens equal; everything resident, and at a device
budget that holds all but the experts and a quarter of the experts' bytes, where only the experts the router
chose may be loaded. The Vulkan backend (lavapipe in CI, runtime/vk/moe.py) is checked against the numpy
backend on the same archive, the same way, and on batches of two sequences.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import family_models as fm
import hf_reference
import hf_to_gguf
from vkpack.compiler.build import build
from vkpack.pack_format import validate
from vkpack.pack_format.errors import FormatError, SourceError
from vkpack.pack_format.reader import Archive
from vkpack.runtime.cpu import ops
from vkpack.runtime.engine import Engine

REL_TOL = 1e-3     # the family tests' tolerance, for F32 and for quantized weights alike (same rounded weights)
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, fm.VOCAB, 64)]
FAMILIES = sorted(fm.MOE_FAMILIES)
N_CTX = len(PROMPT) + 32


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _saved(folder) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """family -> (HF folder, transformers model, reference logits [64, vocab], 32 greedy tokens), once each."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            folder = fm.make_hf(family, tmp_path_factory.mktemp(family) / "hf", seed=11 + FAMILIES.index(family))
            model = fm.load_reference(folder)
            cache[family] = (folder, model, hf_reference.hf_logits(model, PROMPT),
                             hf_reference.hf_greedy(model, PROMPT, 32))
        return cache[family]
    return get


def quarter_of_experts(archive) -> float:
    """GiB for every non-expert pack, a quarter of the expert packs' bytes (numpy's f32 form) and one session
    of N_CTX positions: the experts stream."""
    with Engine(archive, device="numpy") as eng:
        sizes = {p.id: eng.backend.pack_bytes(p.id) for p in eng.archive.packs}
        experts = sum(n for p, n in sizes.items() if eng.archive.packs[p].kind == "expert")
        fixed = sum(sizes.values()) - experts
        session = eng.session_bytes(N_CTX)
    return (fixed + experts // 4 + session) / 2**30


def matches(eng, ref: np.ndarray, tokens: list[int]) -> None:
    """Logits at every position of PROMPT (one decode step each) within REL_TOL of `ref`; 32 greedy tokens
    equal to `tokens`."""
    with eng.kv_session(N_CTX) as kv:
        for t in range(len(PROMPT)):
            got = eng.executor.forward(np.asarray(PROMPT[t:t + 1]), t, kv)[-1]
            assert rel_err(got, ref[t]) < REL_TOL, f"position {t}: {rel_err(got, ref[t]):.2e}"
    eng.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True)
    assert list(eng.last_ids) == tokens


def check_engine(archive, ref: np.ndarray, hf_tokens: list[int], device: str = "numpy",
                 vram_gb: float | None = None) -> dict:
    """Logits at every position within REL_TOL of `ref`, 32 greedy tokens equal to transformers'; the stats."""
    with Engine(archive, device=device, vram_gb=vram_gb) as eng:
        matches(eng, ref, hf_tokens)
        stats = eng.stats()
        if vram_gb is not None:  # the tier's real memory, and its peak, within the budget
            assert sum(b.nbytes for b in eng.tier.backing.blocks) <= vram_gb * 2**30
            assert stats["peak_device_bytes"] <= vram_gb * 2**30
        return stats


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_matches_transformers(made, tmp_path, family):
    folder, _model, ref, tokens = made(family)
    build(folder, tmp_path / "m.vkpack", progress=False)
    resident = check_engine(tmp_path / "m.vkpack", ref, tokens)
    n_experts = 4 * 8
    assert resident["expert_misses"] <= n_experts   # resident: each expert is loaded once at most
    streamed = check_engine(tmp_path / "m.vkpack", ref, tokens, vram_gb=quarter_of_experts(tmp_path / "m.vkpack"))
    assert streamed["expert_misses"] > 2 * n_experts   # a quarter fits: experts were evicted and loaded again
    assert streamed["expert_hits"] > 0


@pytest.mark.parametrize("family, dtype, device", [
    *[(f, "F32", "numpy") for f in FAMILIES],
    *[(f, "Q8_0", "numpy") if f == "qwen2moe" else pytest.param(f, "Q8_0", "numpy", marks=pytest.mark.slow)
      for f in FAMILIES],
    *[pytest.param(f, t, "numpy", marks=pytest.mark.slow) for f in FAMILIES for t in ("F16", "Q4_K")],
    *[pytest.param(f, t, "cpu", marks=pytest.mark.slow) for f in FAMILIES for t in ("F32", "Q8_0", "Q4_K")]])
def test_gguf_matches_transformers_on_the_same_weights(made, tmp_path, family, dtype, device):
    folder, _model, ref, tokens = made(family)
    path = hf_to_gguf.write_gguf(folder, tmp_path / "m.gguf", dtype)
    if dtype != "F32":  # transformers on the weights as the GGUF rounded them, saved as an HF folder again
        from safetensors.numpy import save_file

        cfg = json.loads((folder / "config.json").read_text())
        rounded = tmp_path / "rounded"
        rounded.mkdir()
        shutil.copy(folder / "config.json", rounded / "config.json")
        save_file(hf_to_gguf.reference_state_dict(path, cfg, list(_saved(folder))), rounded / "model.safetensors")
        model = fm.load_reference(rounded)
        ref, tokens = hf_reference.hf_logits(model, PROMPT), hf_reference.hf_greedy(model, PROMPT, 32)
    build(path, tmp_path / "m.vkpack", progress=False)
    check_engine(tmp_path / "m.vkpack", ref, tokens, device=device)
    if dtype == "F32" and device == "numpy":
        check_engine(tmp_path / "m.vkpack", ref, tokens, vram_gb=quarter_of_experts(tmp_path / "m.vkpack"))


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_native_backend_matches_transformers(made, tmp_path, family):
    """The native CPU backend computes the experts with its own products, at a quarter of the experts (slow: its
    OpenMP threads wait out time slices whenever the 2 cores are shared, 0.5 s to 80 s per case here)."""
    folder, _model, ref, tokens = made(family)
    build(folder, tmp_path / "m.vkpack", progress=False)
    check_engine(tmp_path / "m.vkpack", ref, tokens, device="cpu",
                 vram_gb=quarter_of_experts(tmp_path / "m.vkpack"))


def test_only_the_chosen_experts_are_loaded(made, tmp_path):
    """At the quarter budget, one decode pass acquires exactly the expert packs of the experts transformers'
    routers choose for that token, layer by layer, and no other expert pack."""
    folder, model, _ref, _tokens = made("qwen2moe")
    build(folder, tmp_path / "m.vkpack", progress=False)
    with torch.no_grad():
        routers = model(torch.tensor([PROMPT[:9]]), output_router_logits=True).router_logits  # per layer [9, n]
    with Engine(tmp_path / "m.vkpack", device="numpy", vram_gb=quarter_of_experts(tmp_path / "m.vkpack")) as eng:
        steps = eng.archive.graph["steps"]
        owner = {p: (s["layer"], e) for s in steps for c in s.get("choices", ()) for e, o in enumerate(c["options"])
                 for p in o}
        want = {(layer, int(e)) for layer, r in enumerate(routers) for e in torch.topk(r[-1], 2).indices}
        acquired: list[int] = []
        real = eng.loader.acquire
        eng.loader.acquire = lambda pack, cursor: (acquired.append(pack), real(pack, cursor))[1]
        with eng.kv_session(16) as kv:
            eng.executor.forward(np.asarray(PROMPT[:8]), 0, kv)
            acquired.clear()
            eng.executor.forward(np.asarray(PROMPT[8:9]), 8, kv)
    assert {owner[p] for p in acquired if p in owner} == want


@pytest.mark.parametrize("router, norm", [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)])
def test_route_matches_torch(router, norm):
    """ops.route against torch's softmax/sigmoid + topk (+ renormalization), the routers' own code."""
    logits = np.random.default_rng(5).standard_normal((40, 16)).astype(np.float32) * 3
    idx, w = ops.route(logits.copy(), 4, router, norm)
    t = torch.from_numpy(logits)
    scores = torch.softmax(t, dim=-1) if router == "softmax" else torch.sigmoid(t)
    want_w, want_idx = torch.topk(scores, 4, dim=-1)
    if norm:
        want_w = want_w / want_w.sum(dim=-1, keepdim=True)
    assert np.array_equal(idx, want_idx.numpy())
    np.testing.assert_allclose(w, want_w.numpy(), rtol=1e-6)


# ---- the choice record: written, validated, hostile ----
@pytest.fixture(scope="module")
def moe_archive(made, tmp_path_factory):
    folder, _, _, _ = made("qwen2moe")
    path = tmp_path_factory.mktemp("arch") / "m.vkpack"
    build(folder, path, progress=False)
    return path


def test_each_expert_is_its_own_pack(moe_archive):
    with Archive(moe_archive) as a:
        assert a.version[1] == 3
        for s in a.graph["steps"]:
            for c in s.get("choices", ()):
                op = s["ops"][c["op"]]
                assert op["op"] == "moe" and c["k"] == 2 and len(c["options"]) == 8
                for e, option in enumerate(c["options"]):
                    held = {t.name for p in option for t in a.tensors.values() for q in t.parts if q.pack == p}
                    assert held == set(op["attrs"]["experts"][e])
                    assert all(a.packs[p].kind == "expert" and a.packs[p].layer == s["layer"] for p in option)
                assert not set(s["packs"]) & {p for o in c["options"] for p in o}
                assert not {p for o in c["options"] for p in o} & set(a.graph["access"])


def _mutated(path, edit) -> str:
    with Archive(path) as a:
        index, offset = copy.deepcopy(a.index), a.index_offset
    step = next(s for s in index["graph"]["steps"] if "choices" in s)
    edit(step, index)
    with pytest.raises(FormatError) as e:
        validate.validate_index(index, offset)
    return str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda s, i: s.pop("choices"), "missing key 'choices'"),
    (lambda s, i: s["choices"][0].pop("op"), "missing key 'op'"),
    (lambda s, i: s["choices"][0].pop("k"), "missing key 'k'"),
    (lambda s, i: s["choices"][0].pop("options"), "missing key 'options'"),
    (lambda s, i: s["choices"][0].update(k=9), "k: 9"),
    (lambda s, i: s["ops"][1]["attrs"].update(k=9), "9 experts chosen of 8"),
    (lambda s, i: s["choices"][0].update(op=0), "not a moe op"),
    (lambda s, i: s["choices"][0].update(op=99), "out of range"),
    (lambda s, i: s["choices"][0]["options"].pop(), "7 options for 8 experts"),
    (lambda s, i: s["choices"][0]["options"][3].__setitem__(0, 10**6), "is not a list of pack ids"),
    (lambda s, i: s["choices"][0]["options"][3].__setitem__(0, s["choices"][0]["options"][4][0]), "lie in packs"),
    (lambda s, i: s["choices"][0]["options"][3].append(s["packs"][0]), "lie in packs"),
    (lambda s, i: s["ops"][1]["attrs"].update(router="relu"), "unknown 'relu'"),
    (lambda s, i: s["ops"][1]["attrs"].update(norm=1), "expected bool"),
    (lambda s, i: s["ops"][1]["attrs"]["experts"][2].pop(), "is not 3 names"),
    (lambda s, i: s["ops"][1]["attrs"]["experts"][2].__setitem__(0, "nope"), "is not 3 names"),
    (lambda s, i: s["ops"][1]["w"].__delitem__(slice(3, None)), "moe takes 1, 4 or 5 weights"),
])
def test_bad_choice_records_are_rejected(moe_archive, edit, message):
    assert message in _mutated(moe_archive, edit)


def test_an_expert_sharing_the_steps_packs_is_rejected(moe_archive):
    """An expert whose tensor lies in a step pack would not move alone: rejected (rules 19 and 22)."""
    def edit(s, index):
        name = s["ops"][1]["attrs"]["experts"][0][0]
        t = next(t for t in index["tensors"] if t["name"] == name)
        s["choices"][0]["options"][0] = sorted({*s["choices"][0]["options"][0], s["packs"][0]})
        t["parts"][0]["pack"] = s["packs"][0]   # (the part's bytes are not checked against the new pack here)
    msg = _mutated(moe_archive, edit)
    assert "also the step's" in msg or "overlaps" in msg or "exceed" in msg


# ---- what the compiler and the runtime refuse ----
def test_a_router_without_an_expert_count_is_refused(made, tmp_path):
    folder, _, _, _ = made("qwen3moe")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("num_local_experts", None)
    cfg.pop("num_experts", None)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="states no expert count"):
        build(bad, tmp_path / "bad.vkpack", progress=False)


def test_a_missing_expert_is_refused(made, tmp_path):
    from safetensors.numpy import save_file

    folder, _, _, _ = made("olmoe")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(folder / "config.json", bad / "config.json")
    shutil.copy(folder / "tokenizer.json", bad / "tokenizer.json")
    weights = _saved(folder)
    del weights["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(SourceError, match="blk.2.ffn_up.5.weight' missing"):
        build(bad, tmp_path / "bad.vkpack", progress=False)


def test_auto_picks_a_backend(moe_archive):
    """`auto` runs a mixture of experts (lavapipe is a CPU driver: on the CPU; on a GPU: the Vulkan backend
    alone, which measured faster than the hybrid's CPU experts so far); `--device hybrid` takes it."""
    with Engine(moe_archive) as eng:
        assert eng.backend.name in ("cpu", "numpy", "vulkan")
    if VK_OK and NATIVE_OK:
        with Engine(moe_archive, device="hybrid") as eng:
            assert eng.backend.name == "hybrid"


def test_routers_table_matches_the_code():
    from pathlib import Path

    from test_format_doc import parse_tables

    from vkpack.pack_format.constants import MOE_ROUTERS

    doc = (Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    assert tuple(r["router"] for r in parse_tables(doc)["moe_routers"]) == MOE_ROUTERS


# ---- the Vulkan backend (lavapipe here; runtime/vk/moe.py) against the numpy backend on the same archive ----
def _vulkan() -> tuple[bool, str]:
    from vkpack.runtime import vk

    return vk.available()


VK_OK, VK_WHY = _vulkan()
needs_vulkan = pytest.mark.skipif(not VK_OK, reason=f"no Vulkan: {VK_WHY}")


def vk_quarter_of_experts(archive, hybrid: bool = False) -> float:
    """As `quarter_of_experts`, for the Vulkan backend (or the hybrid one over it): its packs as stored, one
    session, the activation room of the 64-token prefill and the buffers it keeps outside the tier (the moe
    route and readback among them)."""
    with Engine(archive, device="hybrid" if hybrid else "vulkan") as eng:
        b = eng.backend
        sizes = {p.id: b.pack_bytes(p.id) for p in eng.archive.packs}
        experts = sum(n for p, n in sizes.items() if eng.archive.packs[p].kind == "expert")
        fixed = sum(sizes.values()) - experts
        room = eng.session_bytes(N_CTX) + b.activation_bytes(len(PROMPT), N_CTX) + b.reserved_bytes
    return (fixed + experts // 4 + room) / 2**30


def numpy_run(archive) -> tuple[np.ndarray, list[int], dict]:
    """The numpy backend, resident: logits at every position (one decode step each), 32 greedy tokens, stats."""
    with Engine(archive, device="numpy") as eng:
        with eng.kv_session(N_CTX) as kv:
            logits = np.stack([eng.executor.forward(np.asarray(PROMPT[t:t + 1]), t, kv)[-1]
                               for t in range(len(PROMPT))])
        eng.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True)
        return logits, list(eng.last_ids), eng.stats()


def check_vulkan(archive, vram_gb: float | None = None, grouped: bool = True) -> dict:
    """check_engine on the Vulkan backend against the numpy backend, the device memory it really allocated
    within the budget; the stats, with the moe ops' router waits. grouped=False: the prefill must have run
    its experts one by one."""
    from vk_helpers import assert_device_peak_within

    ref, tokens, cpu = numpy_run(archive)
    with Engine(archive, device="vulkan", vram_gb=vram_gb) as eng:
        assert eng.backend.name == "vulkan"
        matches(eng, ref, tokens)
        fast, _ = eng.backend.last_replay()
        assert fast is None   # the experts change per pass: no replay of a fixed whole-pass recording
        moe = eng.backend.runner.moe
        if moe.table is not None:   # decode steps ran the chosen experts batched: one recording per layer
            batched = {k[:2] for k in moe._cache if len(k) > 2 and k[2] == "batched"}
            routed = {k[0] for k in moe._cache if len(k) > 1 and k[1] == "routed"}
            if vram_gb is None and moe.places is not None:   # resident: the device routed them (moe_route.comp)
                assert len(routed) == 4 and moe.routed_on_device > 0, (routed, moe.routed_on_device)
            else:
                assert len(batched) == 4, batched
        if moe.gtable is not None:  # and the 64-token prefill grouped (64 rows x k slots > MAX_SLOTS)
            assert (moe.grouped_passes >= 4) if grouped else moe.grouped_passes == 0, moe.grouped_passes
        stats = eng.stats()
        # the same choices as the numpy backend's: as many expert uses; resident, the same hits and misses
        assert stats["expert_hits"] + stats["expert_misses"] == cpu["expert_hits"] + cpu["expert_misses"]
        if vram_gb is None and moe.routed_on_device:   # routing on the device loaded every expert once: no
            assert stats["expert_misses"] <= cpu["expert_misses"]   # first-use misses after that
        elif vram_gb is None:
            assert (stats["expert_hits"], stats["expert_misses"]) == (cpu["expert_hits"], cpu["expert_misses"])
        else:
            assert_device_peak_within(eng, vram_gb)
            assert stats["peak_device_bytes"] <= vram_gb * 2**30
        return {**stats, "router_waits": moe.router_waits, "routed": moe.routed_on_device}


@needs_vulkan
@pytest.mark.parametrize("family, dtype", [
    ("qwen2moe", "F32"), ("qwen2moe", "Q8_0"),
    *[pytest.param(f, t, marks=pytest.mark.slow) for f in FAMILIES for t in ("F32", "Q8_0", "Q4_K")
      if (f, t) not in (("qwen2moe", "F32"), ("qwen2moe", "Q8_0"))]])
def test_vulkan_matches_numpy(made, tmp_path, family, dtype):
    """Resident and at the budget that holds a quarter of the experts: logits at every position within
    REL_TOL of the numpy backend, 32 greedy tokens equal, one router readback per moe layer and pass."""
    folder, _model, _ref, _tokens = made(family)
    src = folder if dtype == "F32" else hf_to_gguf.write_gguf(folder, tmp_path / "m.gguf", dtype)
    build(src, tmp_path / "m.vkpack", progress=False)
    n_experts = 4 * 8
    resident = check_vulkan(tmp_path / "m.vkpack")
    assert resident["expert_misses"] <= n_experts
    passes = len(PROMPT) + 1 + 31   # 64 single steps, the 64-token prefill, 31 more decode steps
    # one router readback per moe layer and pass; resident, only the prefill's (its 128 slots are past the
    # device routing's 64): the single steps routed on the device
    assert resident["router_waits"] == 4 * (1 if resident["routed"] else passes)
    assert resident["routed"] in (0, 4 * (passes - 1))
    streamed = check_vulkan(tmp_path / "m.vkpack", vk_quarter_of_experts(tmp_path / "m.vkpack"))
    assert streamed["expert_misses"] > 2 * n_experts   # a quarter fits: experts were evicted and loaded again
    assert streamed["expert_hits"] > 0


@needs_vulkan
def test_vulkan_tier_blocks_fit_one_binding_for_moe(moe_archive):
    """A MoE archive's device tier is cut into blocks no larger than one storage binding's range, so that the
    batched and grouped experts can bind them whole (lavapipe: 128 MiB; a 0.3 GiB budget was one block)."""
    with Engine(moe_archive, device="vulkan", vram_gb=0.3) as eng:
        rng = eng.backend.dev.info.max_storage_buffer_range
        assert eng.tier.blocks and all(b <= rng for b in eng.tier.blocks)
        if eng.backend.runner.moe.table is not None:
            assert eng.backend.runner.moe.blocks


@needs_vulkan
def test_vulkan_grouped_experts_in_small_chunks(moe_archive, monkeypatch):
    """The grouped prefill with chunks of 16 slots and 2 table regions: experts with more rows than a chunk
    split over several, the host waiting for the device to free the regions; as the numpy backend computes."""
    from vkpack.runtime.vk import moe, moe_grouped

    monkeypatch.setattr(moe_grouped, "CHUNK_SLOTS", 16)
    monkeypatch.setattr(moe_grouped, "TABLE_REGIONS", 2)
    split = []
    real = moe.MoeSteps._chunks

    def chunks(self, *a, **kw):
        out = real(self, *a, **kw)
        split.append(len({e for c in out for e, _, _ in c}) < sum(len(c) for c in out))
        return out
    monkeypatch.setattr(moe.MoeSteps, "_chunks", chunks)
    stats = check_vulkan(moe_archive)
    assert any(split), "no expert had more rows than a chunk"
    assert stats["expert_hits"] > 0


@needs_vulkan
def test_vulkan_grouped_needs_its_shared_memory(moe_archive, monkeypatch):
    """moe_matmul.comp's K-quant tiles take 24.7 KB of shared memory and Vulkan guarantees 16 KB: a device
    without the room runs the prefill's experts one by one (as numpy computes), and the kernel refuses it."""
    from vkpack.runtime.vk import Device, Ops, VulkanError

    dev = Device()
    try:
        ops = Ops(dev)
        small = type(dev.info)(**{**dev.info.__dict__, "max_shared_memory": 16384})
        monkeypatch.setattr(dev, "info", small)
        assert ops.moe_matmul_fits("Q8_0") and not ops.moe_matmul_fits("Q4_K")
        with pytest.raises(VulkanError, match="shared memory"):
            ops.moe_matmul(None, "Q4_K", [], None, None, None, 64, 256, 1, 256, 64, 0, None)
        monkeypatch.undo()
    finally:
        dev.close()
    monkeypatch.setattr(Ops, "moe_matmul_fits", lambda self, dtype: False)
    check_vulkan(moe_archive, grouped=False)


@needs_vulkan
@pytest.mark.parametrize("quarter", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["resident", "quarter"])
def test_vulkan_batch_of_two_sequences(moe_archive, quarter, monkeypatch):
    """Two sequences in one pass (prefills of different lengths, then decode steps of both) as the numpy
    backend computes them, from the same experts; in each pass every chosen expert's pack is acquired once,
    for all its rows (the numpy backend acquires it once per matrix). The host routes (a resident tier's
    device routing acquires no expert: check_vulkan covers it)."""
    from vkpack.runtime.vk import moe

    monkeypatch.setattr(moe, "DEVICE_ROUTING", False)
    rng = np.random.default_rng(3)
    a, b = ([int(t) for t in rng.integers(3, fm.VOCAB, n)] for n in (40, 23))
    vram = vk_quarter_of_experts(moe_archive) if quarter else None
    out, chosen = {}, {}
    for device in ("numpy", "vulkan"):
        with Engine(moe_archive, device=device, vram_gb=vram if device == "vulkan" else None) as eng:
            expert_packs = {p.id for p in eng.archive.packs if p.kind == "expert"}
            acquired: list[int] = []
            real = eng.loader.acquire
            eng.loader.acquire = lambda pack, cursor, acquired=acquired, real=real: (acquired.append(pack),
                                                                         real(pack, cursor))[1]
            rows, chosen[device] = [], []
            with eng.kv_session(N_CTX) as ka, eng.kv_session(N_CTX) as kb:
                steps = [[(a, 0, ka), (b, 0, kb)], [(a[:1], 40, ka), (b[:3], 23, kb)],
                         [(b[3:4], 26, kb), (a[1:2], 41, ka)]]
                for batch in steps:
                    acquired.clear()
                    rows.append(eng.forward_batch(batch))
                    used = [p for p in acquired if p in expert_packs]
                    chosen[device].append(set(used))
                    if device == "vulkan":
                        assert len(used) == len(set(used)), "an expert's pack acquired twice in one pass"
            out[device] = rows
    assert chosen["vulkan"] == chosen["numpy"]
    for got, want in zip(out["vulkan"], out["numpy"]):
        assert got.shape == want.shape == (2, fm.VOCAB)
        assert rel_err(got, want) < REL_TOL


@needs_vulkan
def test_vulkan_moe_rows_kernels(dev, ops):
    """gather_rows and scatter_add_rows (shaders/moe_rows.comp) against numpy: the gather exact, the scaled add
    within 1e-6 (a driver may fuse its multiply-add, one rounding instead of two)."""
    from vk_helpers import from_dev, to_dev

    from vkpack.runtime.vk.recorder import Recorder

    rng = np.random.default_rng(2)
    t, n, m = 13, 40, 5
    src = rng.standard_normal((t, n)).astype(np.float32)
    out0 = rng.standard_normal((t, n)).astype(np.float32)
    rows = np.sort(rng.choice(t, m, replace=False)).astype(np.uint32)
    w = rng.random(m).astype(np.float32)
    route = np.concatenate([np.zeros(3, np.uint32), rows, w.view(np.uint32)])  # idx at 3, w at 3 + m
    sb, rb, gb, ob = (to_dev(dev, x) for x in (src, route, np.zeros((t, n), np.float32), out0))
    rec = Recorder(dev)
    ops.gather_rows(rec, sb, gb, rb, m, n, 3)
    ops.scatter_add_rows(rec, gb, ob, rb, m, n, 3, 3 + m)
    rec.run()
    rec.destroy()
    gathered = from_dev(dev, gb, np.float32, (t, n))
    assert np.array_equal(gathered[:m], src[rows])
    want = out0.copy()
    want[rows] += w[:, None] * src[rows]
    np.testing.assert_allclose(from_dev(dev, ob, np.float32, (t, n)), want, rtol=1e-6, atol=1e-6)
    for x in (sb, rb, gb, ob):
        x.destroy()


# ---- the hybrid backend: missing experts computed on the CPU (runtime/hybrid/experts.py) ----
def _native_ok() -> tuple[bool, str]:
    from vkpack.runtime import native

    return native.available()


NATIVE_OK, NATIVE_WHY = _native_ok()
needs_hybrid = pytest.mark.skipif(not (VK_OK and NATIVE_OK), reason=f"Vulkan: {VK_WHY or 'ok'}; native: {NATIVE_WHY or 'ok'}")
GB = 1e9


def _rates(link_gbs: float):
    """Rates as if measured: the CPU at 10 GB/s a token; the link as given."""
    from vkpack.runtime.hybrid.rates import Rates

    return Rates(link=link_gbs * GB, gpu_read=100 * GB, sync=1e-5,
                 cpu={dt: {1: 10 * GB, 8: 5 * GB, 32: 2 * GB} for dt in ("F32", "Q8_0", "Q4_0", "Q4_K", "Q6_K")})


@pytest.fixture(scope="module")
def raw_moe_archive(made, tmp_path_factory):
    """qwen2moe stored raw: lavapipe's device memory is system memory (no pinned cache of streamed packs),
    so the CPU reads experts from the archive's mapping."""
    folder, _, _, _ = made("qwen2moe")
    path = tmp_path_factory.mktemp("raw") / "m.vkpack"
    build(folder, path, codec="none", progress=False)
    return path


@needs_hybrid
@pytest.mark.parametrize("link_gbs", [0.001, 3.0], ids=["slow-link", "balanced"])
def test_hybrid_computes_missing_experts_on_the_cpu(raw_moe_archive, link_gbs):
    """At the budget holding a quarter of the experts, with rates that make the CPU worth it for all the
    misses (slow link) or some (balanced): logits at every position within REL_TOL of the numpy backend,
    32 greedy tokens equal, the same choices, the device budget kept, and the split counted."""
    from vk_helpers import assert_device_peak_within

    from vkpack.runtime.hybrid.backend import HybridBackend
    from vkpack.runtime.native.backend import NativeCpuBackend
    from vkpack.runtime.vk.backend import VulkanBackend

    ref, tokens, cpu = numpy_run(raw_moe_archive)
    vram = vk_quarter_of_experts(raw_moe_archive, hybrid=True)
    make = lambda a: HybridBackend(a, VulkanBackend(a), NativeCpuBackend(a), rates=_rates(link_gbs))
    with Engine(raw_moe_archive, device=make, vram_gb=vram) as eng:
        matches(eng, ref, tokens)
        stats, info = eng.stats(), eng.backend.placement()
        assert stats["expert_hits"] + stats["expert_misses"] == cpu["expert_hits"] + cpu["expert_misses"]
        assert_device_peak_within(eng, vram)
        on_cpu, over_link = info["experts_on_cpu"], info["experts_over_link"]
        assert on_cpu + over_link == stats["expert_misses"]
        if link_gbs < 0.01:
            assert over_link == 0 and on_cpu > 0
        else:
            assert on_cpu > 0 and over_link > 0
        assert any("the CPU computed" in line for line in info["lines"])


@needs_hybrid
def test_expert_split_balances_cpu_and_link(raw_moe_archive, moe_archive):
    """The CPU takes the misses that bring max(CPU, link) down, cheapest first, and only those readable
    from system memory: a compressed pack outside the pinned cache goes over the link."""
    from vkpack.runtime.hybrid.experts import ExpertOffload
    from vkpack.runtime.native.backend import NativeCpuBackend

    with Archive(raw_moe_archive) as a:
        op = next(op for st in a.graph["steps"] for op in st["ops"] if op["op"] == "moe")
        experts = {e: tuple(names) for e, names in enumerate(op["attrs"]["experts"])}
        packs = {e: sorted({p.pack for n in names for p in a.tensors[n].parts}) for e, names in experts.items()}
        cpu = NativeCpuBackend(a)
        off = ExpertOffload(a, cpu, _rates(10.0), lambda pack: None)   # CPU and link alike for one row
        ones = dict.fromkeys(experts, 1)
        assert len(off.split(experts, ones, packs)) == len(experts) // 2
        many = {e: 1 if e < 2 else 32 for e in experts}   # 32 rows cost the CPU 6.4x: it takes the 1-row ones
        assert off.split(experts, many, packs) == [0, 1]
        off = ExpertOffload(a, cpu, _rates(0.001), lambda pack: None)
        assert off.split(experts, ones, packs) == sorted(experts)
        # the CPU's measured slowness is kept per bucket of rows: slow 40-row experts leave 1-row ones alone
        off = ExpertOffload(a, cpu, _rates(10.0), lambda pack: None)
        off.scales[-1] = 40.0
        assert off.split(experts, dict.fromkeys(experts, 40), packs) == []
        assert len(off.split(experts, ones, packs)) == len(experts) // 2
        x = np.random.default_rng(0).standard_normal((1, a.tensors[experts[0][0]].shape[1])).astype(np.float32)
        out = np.empty_like(x)
        before = list(off.scales)
        off.compute({0: experts[0]}, {0: packs[0]}, np.array([[0]]), np.ones((1, 1), np.float32), x, out)
        assert off.scales[0] != before[0] and off.scales[1:] == before[1:]
    with Archive(moe_archive) as a:   # compressed packs: readable only where the pinned cache holds them
        assert any(p.codec != "none" for p in a.packs if p.kind == "expert")
        op = next(op for st in a.graph["steps"] for op in st["ops"] if op["op"] == "moe")
        experts = {e: tuple(names) for e, names in enumerate(op["attrs"]["experts"])}
        packs = {e: sorted({p.pack for n in names for p in a.tensors[n].parts}) for e, names in experts.items()}
        compressed = {e for e in experts if any(a.packs[p].codec != "none" for p in packs[e])}
        off = ExpertOffload(a, NativeCpuBackend(a), _rates(0.001), lambda pack: None)
        assert not set(off.split(experts, dict.fromkeys(experts, 1), packs)) & compressed


@needs_vulkan
@pytest.mark.parametrize("dtype", ["F32", "Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_vulkan_moe_matvec_reads_weights_anywhere_in_the_tier(dev, ops, dtype):
    """moe_matvec.comp: every slot's weight read from the tier block and offset its table entry names (two
    blocks, weights at scattered 16-aligned offsets, two slots sharing one x row), as numpy's x @ W.T within
    1e-4 relative; sum_rows adds the slots to their rows in order."""
    from vk_helpers import from_dev, random_weight, to_dev

    from vkpack.runtime.vk.recorder import Recorder

    if not dev.features.get("shaderStorageBufferArrayDynamicIndexing"):
        pytest.skip("no dynamic indexing of buffer arrays")
    rng = np.random.default_rng(4)
    rows, cols, slots = 96, 256, 5
    blocks = [dev.alloc(1 << 20, "device"), dev.alloc(1 << 20, "device")]
    table, dense = [], []
    for s in range(slots):
        raw, w = random_weight(rng, dtype, rows, cols)
        blk, off = s % 2, (s // 2) * (raw.nbytes + 4096) // 16 * 16 + 16 * (s + 1)   # apart, 16-aligned
        dev.upload(blocks[blk], np.ascontiguousarray(raw).view(np.uint8).reshape(-1), off)
        table += [blk, off, s // 2, s]   # slots 0 and 1 read x row 0, 2 and 3 row 1, 4 row 2
        dense.append(w)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    idx = np.array([0, 0, 1, 1, 0], np.uint32)
    wts = rng.random(slots).astype(np.float32)
    tb = to_dev(dev, np.concatenate([np.zeros(2, np.uint32), np.array(table, np.uint32), idx, wts.view(np.uint32)]),
                "upload")
    xb, yb = to_dev(dev, x), to_dev(dev, np.zeros((slots, rows), np.float32))
    out0 = rng.standard_normal((2, rows)).astype(np.float32)
    ob = to_dev(dev, out0)
    rec = Recorder(dev)
    ops.moe_matvec(rec, dtype, blocks, xb, tb, yb, rows, cols, slots, cols, rows, 2)
    ops.sum_rows(rec, yb, ob, tb, slots, rows, 2, 2 + 4 * slots, 2 + 5 * slots)
    rec.run()
    rec.destroy()
    got = from_dev(dev, yb, np.float32, (slots, rows))
    want = np.stack([dense[s] @ x[s // 2] for s in range(slots)])
    assert [rel_err(got[s], want[s]) < 1e-4 for s in range(slots)] == [True] * slots, \
        [f"{rel_err(got[s], want[s]):.1e}" for s in range(slots)]
    want_out = out0.astype(np.float64)
    for s in range(slots):
        want_out[idx[s]] += wts[s] * got[s]
    np.testing.assert_allclose(from_dev(dev, ob, np.float32, (2, rows)), want_out, rtol=1e-5, atol=1e-5)
    for b in (*blocks, tb, xb, yb, ob):
        b.destroy()


@needs_vulkan
@pytest.mark.parametrize("dtype", ["F32", "Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_vulkan_moe_matmul_groups_rows_of_each_expert(dev, ops, dtype):
    """moe_matmul.comp (the grouped prefill path): groups of up to MOE_GROUP_SLOTS slots, each group's weight
    wherever its table entry says (two blocks), x rows gathered through the table or read in slot order, an
    unused group (count 0) left alone; as numpy's x @ W.T within 1e-4 relative. sum_rows_by_list then adds
    each listed row's slots in its list's order."""
    from vk_helpers import from_dev, random_weight, to_dev

    from vkpack.runtime.vk.ops import MOE_GROUP_SLOTS
    from vkpack.runtime.vk.recorder import Recorder

    if not dev.features.get("shaderStorageBufferArrayDynamicIndexing"):
        pytest.skip("no dynamic indexing of buffer arrays")
    rng = np.random.default_rng(5)
    rows, cols, t = 80, 512, 90   # t > the slots: read in slot order, slot j reads x row j
    counts = [MOE_GROUP_SLOTS + 7, 3, MOE_GROUP_SLOTS]   # expert 0 spans two groups; one group stays unused
    n = sum(counts)
    blocks = [dev.alloc(1 << 20, "device"), dev.alloc(1 << 20, "device")]
    dense, place = [], []
    for e in range(len(counts)):
        raw, w = random_weight(rng, dtype, rows, cols)
        blk, off = (e + 1) % 2, 16 * (e + 3) + e * (raw.nbytes // 16 * 16 + 4096)
        dev.upload(blocks[blk], np.ascontiguousarray(raw).view(np.uint8).reshape(-1), off)
        dense.append(w)
        place.append((blk, off))
    slot_expert = np.repeat(np.arange(len(counts)), counts)
    slot_row = np.concatenate([np.sort(rng.choice(t, c, replace=False)) for c in counts]).astype(np.uint32)
    groups, j = [], 0
    for e, c in enumerate(counts):
        for j0 in range(j, j + c, MOE_GROUP_SLOTS):
            groups.append([*place[e], j0, min(MOE_GROUP_SLOTS, j + c - j0)])
        j += c
    groups.append([0, 0, 0, 0])
    # the sum's lists: R, rows[n], offsets[n + 1], slot[n], w[n] (as moe.py writes a chunk's region)
    order = np.argsort(slot_row, kind="stable")
    touched, per_row = np.unique(slot_row[order], return_counts=True)
    wts = rng.random(n).astype(np.float32)
    lists = np.zeros(2 + 4 * n, np.uint32)
    lists[0] = len(touched)
    lists[1:1 + len(touched)] = touched
    lists[2 + n:2 + n + len(touched)] = np.cumsum(per_row)
    lists[2 + 2 * n:2 + 3 * n] = order
    lists[2 + 3 * n:2 + 4 * n] = wts.view(np.uint32)
    rows_off, tbl_off = len(lists), len(lists) + n
    tb = to_dev(dev, np.concatenate([lists, slot_row, np.array(groups, np.uint32).reshape(-1)]))
    x = rng.standard_normal((t, cols)).astype(np.float32)
    xb = to_dev(dev, x)
    ya = to_dev(dev, np.full((n, rows), 7.0, np.float32))
    yb = to_dev(dev, np.full((n, rows), 7.0, np.float32))
    out0 = rng.standard_normal((t, rows)).astype(np.float32)
    ob = to_dev(dev, out0)
    rec = Recorder(dev)
    ops.moe_matmul(rec, dtype, blocks, xb, tb, ya, rows, cols, len(groups), cols, rows, tbl_off, rows_off)
    ops.moe_matmul(rec, dtype, blocks, xb, tb, yb, rows, cols, len(groups), cols, rows, tbl_off, None)
    ops.sum_rows_by_list(rec, ya, ob, tb, n, rows, 0, t)
    rec.run()
    rec.destroy()
    gathered, in_order = from_dev(dev, ya, np.float32, (n, rows)), from_dev(dev, yb, np.float32, (n, rows))
    want_g = np.stack([dense[slot_expert[s]] @ x[slot_row[s]] for s in range(n)])
    want_o = np.stack([dense[slot_expert[s]] @ x[s] for s in range(n)])
    errs = [rel_err(gathered[s], want_g[s]) for s in range(n)] + [rel_err(in_order[s], want_o[s]) for s in range(n)]
    assert max(errs) < 1e-4, f"{max(errs):.1e}"
    want_out = out0.astype(np.float64)
    for s in order:
        want_out[slot_row[s]] += wts[s] * gathered[s]
    np.testing.assert_allclose(from_dev(dev, ob, np.float32, (t, rows)), want_out, rtol=1e-5, atol=1e-5)
    for b in (*blocks, tb, xb, ya, yb, ob):
        b.destroy()


@needs_vulkan
@pytest.mark.parametrize("router, norm", [("softmax", True), ("softmax", False), ("sigmoid", True)])
def test_vulkan_moe_route_matches_the_host_routing(dev, ops, router, norm):
    """moe_route.comp against the numpy backend's `route` on the same logits (a tie included: the lower
    expert wins): the chosen experts, in expert order per row, their weights within 1e-6, each slot's
    places, rows and weights in the batched table, and the shared expert's gate weights."""
    from vk_helpers import from_dev, to_dev

    from vkpack.runtime.cpu import ops as cpu_ops
    from vkpack.runtime.vk.recorder import Recorder

    rng = np.random.default_rng(6)
    t, n, k = 5, 12, 3
    logits = rng.standard_normal((t, n + 1)).astype(np.float32)
    logits[1, 4] = logits[1, 9] = logits[1, :n].max() + 1.0     # a tie for the first choice of row 1
    places = rng.integers(0, 1 << 20, (n, 3, 2)).astype(np.uint32)
    m = t * k
    lb, pb = to_dev(dev, logits), to_dev(dev, np.concatenate([np.zeros(6, np.uint32), places.reshape(-1)]))
    tb, sb = to_dev(dev, np.zeros(14 * m, np.uint32)), to_dev(dev, np.zeros(2 * t, np.uint32))
    ib = to_dev(dev, np.zeros(3 + m, np.uint32))
    rec = Recorder(dev)
    ops.moe_route(rec, lb, pb, tb, sb, ib, t, n, k, router == "sigmoid", norm, True, 3, 6)
    rec.run()
    rec.destroy()
    idx, gate = cpu_ops.route(logits[:, :n].copy(), k, router, norm)
    order = np.argsort(idx, axis=1, kind="stable")
    want_e, want_w = np.take_along_axis(idx, order, 1), np.take_along_axis(gate, order, 1)
    ids = from_dev(dev, ib, np.uint32, (3 + m,))[3:].reshape(t, k)
    assert np.array_equal(ids, want_e)
    assert 4 in ids[1] and 9 in ids[1]
    tbl = from_dev(dev, tb, np.uint32, (14 * m,))
    j = np.arange(m)
    r = j // k
    e = want_e.reshape(-1)
    entries = tbl[:12 * m].reshape(3, m, 4)
    for role in range(3):
        assert np.array_equal(entries[role, :, :2], places[e, role])
        assert np.array_equal(entries[role, :, 2], r if role < 2 else j)
        assert np.array_equal(entries[role, :, 3], j)
    assert np.array_equal(tbl[12 * m:13 * m], r)
    np.testing.assert_allclose(tbl[13 * m:].view(np.float32), want_w.reshape(-1), rtol=1e-6, atol=1e-7)
    shared = from_dev(dev, sb, np.uint32, (2 * t,))
    assert np.array_equal(shared[:t], np.arange(t))
    np.testing.assert_allclose(shared[t:].view(np.float32), cpu_ops.sigmoid(logits[:, n].copy()), rtol=1e-6)
    for b in (lb, pb, tb, sb, ib):
        b.destroy()
