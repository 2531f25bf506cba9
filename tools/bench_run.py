"""Benchmark `vkpack run` on the numpy backend: speed, memory and streaming under device budgets.

For SmolLM2-135M (Q4_1) and a synthetic ~1 GB F16 llama model, each configuration in a fresh
subprocess (so the peak RSS is that configuration's):
- prefill tokens/s (128-token prompt, and 512 for SmolLM2) and greedy decode tokens/s, at an
  unlimited device budget and at 25 % of the model; bytes read / decompressed / uploaded per
  decoded token, prefetch hit rate, stall time per token, peak device bytes against the budget;
- the same prompt ids through llama.cpp's CPU backend (`llama-cpp-python`, when importable), as
  a ratio measured in the same run;
- eviction: bytes uploaded per decoded token under the graph (Belady) policy and LRU at 25/50/75 %
  budgets with prefetch lookahead 0 and 3, against the ideal (model - budget);
- prefetch: stall time per token at lookahead 0, 1, 3 and 8;
- where decode time goes: every backend op and every pack acquire timed, linear layers as GB/s
  against the f32 matrix-vector bandwidth measured in the same run.

"Model" and "budget" sizes are the device tier's: the numpy backend holds every weight as float32
(4 bytes per weight, whatever the stored type), so the model is `Engine.model_bytes`, not the
archive size. A budget of x % means x % of that for weights, plus the reservation the KV cache and
activations of the run need, so that the weights get exactly x %.

Usage: python tools/bench_run.py [--work DIR] [--quick] [--write-docs]
Not part of the test suite (a full run takes about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import make_synthetic as ms
import smollm2
from bench_docs import DOCS, write_section

GIB = 1 << 30
MB = 1e6
PROMPT_TEXT = (
    "The history of computing is a story of memory. Early machines kept their programs on punched cards and "
    "their data on drums that turned slowly under fixed heads; a programmer who wanted speed arranged the "
    "instructions around the drum so that the next word arrived just as it was needed. Later, core memory "
    "made every word equally close, and for a while the problem seemed solved. Then processors became fast "
    "and memory did not, and caches appeared: small, quick stores that hold what was used recently, in the "
    "hope that it will be used again soon. Large language models bring the old problem back in a new form. "
    "Their weights are read once for every token they produce, in the same order each time, and they are "
    "often larger than the fastest memory available. A runtime that knows the order in advance can do what "
    "the drum programmers did: fetch each piece just before it is needed, keep what will be needed soonest, "
    "and let go of what will not be needed for the longest time. "
)


@dataclass
class Model:
    key: str
    label: str
    archive: Path
    gguf: Path
    note: str
    prompts: tuple[int, ...]
    llama_overrides: dict[str, str] | None = None
    prefetch_only: bool = False  # a model for the prefetch table alone


# ---- models and prompts ----


def synthetic_spec() -> ms.Spec:
    return ms.Spec.llama_1b().with_target_gb(1.0, "F16")


def _generated(gguf: Path, arch: Path, spec: ms.Spec, dtype: str) -> None:
    """Write the synthetic GGUF and build its archive unless they exist and are up to date."""
    from vkpack.compiler.build import build

    if not gguf.exists():
        print(f"writing {gguf}", file=sys.stderr)
        ms.write_gguf(gguf, spec, dtype=dtype, seed=0)
    if not arch.exists() or arch.stat().st_mtime < gguf.stat().st_mtime:
        print(f"building {arch}", file=sys.stderr)
        build(gguf, arch, progress=False)


def models(work: Path) -> list[Model]:
    """The two models, building the synthetic one (GGUF and archive) into `work` on first use."""
    out = [Model("smollm2", "SmolLM2-135M Q4_1", smollm2.default_archive(), smollm2.smollm2_gguf(),
                 "real trained weights: Q4_1 matrices, one Q8_0, F32 norms; tied 49152-token head", (128, 512))]
    spec = synthetic_spec()
    gguf = work / f"synthetic-llama-{spec.layers}L-F16.gguf"
    arch = gguf.with_suffix(".vkpack")
    _generated(gguf, arch, spec, "F16")
    out.append(Model("synthetic", "synthetic 1 GB F16", arch, gguf,
                     f"llama, {spec.layers} layers, hidden {spec.hidden}, ffn {spec.ffn}, vocab {spec.vocab}, tied; "
                     "random N(0, 0.02) weights", (128,),
                     # synthetic GGUFs cached from before make_synthetic wrote "gpt-2" say "gpt2", which llama.cpp
                     # rejects; the ids are passed in directly, so the tokenizer itself is never used
                     {"tokenizer.ggml.pre": "gpt-2"}))
    # F32 weights convert by a plain copy, faster than decode reads them: the case where prefetch can hide loads
    f32 = ms.Spec(layers=8, hidden=1024, heads=16, kv_heads=4, ffn=4096, vocab=16384)
    g32 = work / "synthetic-llama-8L-1024-F32.gguf"
    a32 = g32.with_suffix(".vkpack")
    _generated(g32, a32, f32, "F32")
    out.append(Model("synthetic_f32", "synthetic 0.5 GB F32", a32, g32,
                     "llama, 8 layers, hidden 1024, ffn 4096, vocab 16384, untied; random N(0, 0.02) weights", (128,),
                     prefetch_only=True))
    return out


def prompt_ids(archive: Path, n: int) -> list[int]:
    """`n` token ids of PROMPT_TEXT (repeated as needed) under the archive's own tokenizer."""
    from tokenizers import Tokenizer
    from vkpack.pack_format.reader import Archive

    a = Archive(archive)
    try:
        tok = Tokenizer.from_str(a.tokenizer["json"])
    finally:
        a.close()
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
    return ids[:n]


# ---- children: each measurement runs in its own process ----


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in b if isinstance(b[k], (int, float)) and not isinstance(b[k], bool)}


def child_vk(cfg: dict[str, Any]) -> dict[str, Any]:
    """Prefill and decode through the Engine; the budget is cfg['frac'] of the f32 model plus the run's KV room."""
    from vkpack.runtime.engine import Engine

    ids = cfg["ids"]
    n_dec = cfg["n_decode"]
    n_ctx = max([*cfg["prompts"], cfg["decode_prompt"]]) + n_dec + 1
    device = cfg.get("device", "numpy")  # bench_cpu.py runs the native CPU backend ("cpu") through here
    probe = Engine(cfg["archive"], device=device, context=n_ctx)
    model_bytes = probe.model_bytes
    reserve = probe.session_bytes(n_ctx)
    layers = probe.archive.graph["kv_cache"]["n_layers"]
    probe.close()
    frac = cfg["frac"]
    vram = None
    weight_room = model_bytes
    if frac is not None:
        weight_room = int(frac * model_bytes)
        vram = (weight_room + reserve + (2 * layers + 2) * 256) / GIB  # + the sub-allocator's alignment
    t0 = time.perf_counter()
    eng = Engine(cfg["archive"], vram_gb=vram, ram_gb=cfg.get("ram_gb"), device=device,
                 prefetch_lookahead=cfg["lookahead"], policy=cfg["policy"], context=n_ctx)
    if cfg.get("threads"):
        eng.backend.set_threads(*cfg["threads"])
    res: dict[str, Any] = {"threads": [eng.backend.threads_few_rows, eng.backend.threads_many_rows],
                           "model_bytes": model_bytes, "reserve": reserve, "weight_room": weight_room,
                           "budget": eng.tier.budget, "archive_bytes": Path(cfg["archive"]).stat().st_size}
    timers = _instrument(eng) if cfg.get("profile") else None

    # cold pass: every pack read, verified, decompressed and converted once
    with eng.kv_session(n_ctx) as kv:
        eng.forward_batch([(ids[:8], 0, kv)])
    res["cold_s"] = time.perf_counter() - t0
    for p in cfg["prompts"]:
        best = None
        for _ in range(cfg.get("prefill_repeat", 1)):
            s0 = eng.stats()
            with eng.kv_session(n_ctx) as kv:
                t = time.perf_counter()
                eng.forward_batch([(ids[:p], 0, kv)])
                dt = time.perf_counter() - t
            if best is None or dt < best[0]:
                best = (dt, _delta(s0, eng.stats()))
        res[f"prefill_{p}"] = {"tps": p / best[0], "s": best[0], "uploaded": best[1]["bytes_uploaded"]}
    if n_dec:
        with eng.kv_session(n_ctx) as kv:
            p = cfg["decode_prompt"]
            logits = eng.forward_batch([(ids[:p], 0, kv)])[-1]
            if timers is not None:
                timers.clear()
            s0 = eng.stats()
            times, toks = [], []
            for i in range(n_dec):
                tok = int(np.argmax(logits))
                toks.append(tok)
                t = time.perf_counter()
                logits = eng.forward_batch([(np.asarray([tok]), p + i, kv)])[-1]
                times.append(time.perf_counter() - t)
            d = _delta(s0, eng.stats())
        n = n_dec
        res["decode"] = {"tps": 1 / float(np.median(times)), "mean_tps": n / sum(times), "tokens": toks,
                         "read": d["bytes_read"] / n, "decompressed": d["bytes_decompressed"] / n,
                         "uploaded": d["bytes_uploaded"] / n, "stall_ms": 1e3 * d["stall_seconds"] / n,
                         "upload_ms": 1e3 * d["upload_seconds"] / n, "read_ms": 1e3 * d["read_seconds"] / n,
                         "hits": d["prefetch_hits"], "late": d["prefetch_late"], "misses": d["misses"],
                         "resident": d["resident_hits"], "errors": d["prefetch_errors"]}
        loads = d["prefetch_hits"] + d["prefetch_late"] + d["misses"]
        res["decode"]["hit_rate"] = d["prefetch_hits"] / loads if loads else None
        if timers is not None:
            res["profile"] = _profile_summary(eng, timers, n)
    st = eng.stats()
    res["peak_device"] = st["peak_device_bytes"]
    res["peak_ram_tier"] = st["peak_ram_bytes"]
    res["evictions"] = eng.tier.evictions
    eng.close()
    res["peak_rss"] = peak_rss()
    res["cpu_s"] = time.process_time()
    return res


def _instrument(eng: Any) -> dict[str, list[float]]:
    """Wrap the numpy backend's op dispatch and the loader's acquire with timers: {kind: [calls, seconds]}."""
    timers: dict[str, list[float]] = {}
    run, acquire = eng.backend.run_op, eng.loader.acquire

    def timed_run(op: dict[str, Any], env: dict[str, Any], weights: Any) -> None:
        t = time.perf_counter()
        run(op, env, weights)
        c = timers.setdefault(op["op"], [0, 0.0])
        c[0] += 1
        c[1] += time.perf_counter() - t

    def timed_acquire(pack: int, cursor: int) -> Any:
        t = time.perf_counter()
        e = acquire(pack, cursor)
        c = timers.setdefault("(acquire, inside ops)", [0, 0.0])
        c[0] += 1
        c[1] += time.perf_counter() - t
        return e

    eng.backend.run_op = timed_run
    eng.loader.acquire = timed_acquire
    return timers


def _profile_summary(eng: Any, timers: dict[str, list[float]], n: int) -> dict[str, Any]:
    tensors = eng.archive.tensors
    lin = [op for s in eng.archive.graph["steps"] for op in s["ops"] if op["op"] == "linear"]
    lin_bytes = sum(4 * int(np.prod(tensors[op["w"][0]].shape)) for op in lin)
    head = [op for s in eng.archive.graph["steps"] if s.get("kind") == "head"
            for op in s["ops"] if op["op"] == "linear"]
    return {"ops": {k: [c / n, s / n] for k, (c, s) in timers.items()}, "linear_bytes": lin_bytes,
            "head_bytes": sum(4 * int(np.prod(tensors[op["w"][0]].shape)) for op in head)}


def child_sgemv(cfg: dict[str, Any]) -> dict[str, Any]:
    """numpy's f32 matrix-vector bandwidth here (the numpy backend's decode limit) at 1 BLAS thread and
    at all of them, called as the backend calls it (`out=`), best of 10, the settings interleaved."""
    from threadpoolctl import ThreadpoolController

    blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    rng = np.random.default_rng(0)
    res: dict[str, Any] = {}
    for rows, cols in ((14336, 4096), (4096, 14336)):
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        x = rng.standard_normal((1, cols), dtype=np.float32)
        y = np.empty((1, rows), np.float32)
        best: dict[int, float] = {}
        for _ in range(10):
            for th in sorted({1, os.cpu_count() or 1}):
                for c in blas:
                    c.set_num_threads(th)
                t = time.perf_counter()
                np.matmul(x, w.T, out=y)
                best[th] = min(best.get(th, 1e9), time.perf_counter() - t)
        for th, sec in best.items():
            res[f"{rows}x{cols}@{th}"] = w.nbytes / sec
    return res


def child_threads(cfg: dict[str, Any]) -> dict[str, Any]:
    """BLAS thread settings compared on one engine, alternating pass by pass so that they share the
    machine's load: prefill 128 and 8 decoded tokens per setting per round."""
    from vkpack.runtime.engine import Engine

    ids, n_ctx = cfg["ids"], 128 + 8 * cfg["rounds"] + 16
    probe = Engine(cfg["archive"], device="numpy", context=n_ctx)
    vram = None
    if cfg["frac"] is not None:
        vram = (cfg["frac"] * probe.model_bytes + probe.session_bytes(n_ctx) + (1 << 20)) / GIB
    probe.close()
    eng = Engine(cfg["archive"], vram_gb=vram, device="numpy", context=n_ctx)
    res: dict[str, Any] = {"load_start": loadavg(),
                           "default": [eng.backend.threads_few_rows, eng.backend.threads_many_rows]}
    settings = [tuple(t) for t in cfg["settings"]]
    pre: dict[tuple, list[float]] = {t: [] for t in settings}
    dec: dict[tuple, list[float]] = {t: [] for t in settings}
    with eng.kv_session(n_ctx) as kv:
        eng.forward_batch([(ids[:8], 0, kv)])
    for _ in range(cfg["rounds"]):
        for th in settings:
            eng.backend.set_threads(*th)
            with eng.kv_session(n_ctx) as kv:
                t = time.perf_counter()
                logits = eng.forward_batch([(ids[:128], 0, kv)])[-1]
                pre[th].append(time.perf_counter() - t)
                for i in range(8):
                    tok = int(np.argmax(logits))
                    t = time.perf_counter()
                    logits = eng.forward_batch([(np.asarray([tok]), 128 + i, kv)])[-1]
                    dec[th].append(time.perf_counter() - t)
    eng.close()
    res["rows"] = [{"threads": list(th), "prefill_best": 128 / min(pre[th]),
                    "prefill_median": 128 / float(np.median(pre[th])),
                    "decode_best": 1 / min(dec[th]), "decode_median": 1 / float(np.median(dec[th]))} for th in settings]
    res["load_end"] = loadavg()
    return res


def child_llama(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same prompt ids through llama.cpp (CPU), greedy; timed around each eval like the vkpack side."""
    import llama_cpp
    from llama_cpp import Llama

    ids, n_dec = cfg["ids"], cfg["n_decode"]
    n_ctx = max([*cfg["prompts"], cfg["decode_prompt"]]) + n_dec + 8
    t0 = time.perf_counter()
    llm = Llama(model_path=cfg["gguf"], n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=cfg["threads"],
                n_threads_batch=cfg["threads"], verbose=False, seed=0, kv_overrides=cfg.get("kv_overrides"))
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # llama-cpp-python keeps no logits without logits_all; read the context's
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    llm.eval(ids[:8])
    res: dict[str, Any] = {"cold_s": time.perf_counter() - t0}
    for p in cfg["prompts"]:
        best = None
        for _ in range(cfg.get("prefill_repeat", 1)):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids[:p])
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        res[f"prefill_{p}"] = {"tps": p / best, "s": best}
    if n_dec:
        llm.reset()
        p = cfg["decode_prompt"]
        llm.eval(ids[:p])
        times, toks = [], []
        for _ in range(n_dec):
            tok = int(np.argmax(last_logits()))
            toks.append(tok)
            t = time.perf_counter()
            llm.eval([tok])
            times.append(time.perf_counter() - t)
        res["decode"] = {"tps": 1 / float(np.median(times)), "mean_tps": n_dec / sum(times), "tokens": toks}

    res["version"] = getattr(llama_cpp, "__version__", "?")
    res["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    llm.close()
    res["peak_rss"] = peak_rss()
    return res


CHILDREN = {"vk": child_vk, "sgemv": child_sgemv, "llama": child_llama, "threads": child_threads}


def spawn(kind: str, cfg: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(cfg)],
                       capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{kind} child failed: {tail}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    return res


# ---- machine ----


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                   if x.startswith("MemTotal")) * 1024
    except (OSError, StopIteration):
        mem = 0
    blas = "?"
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{cfg.get('name')} {cfg.get('version')}"
    except (KeyError, TypeError, AttributeError):  # the layout of show_config differs across numpy versions
        blas = "?"
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p.get('internal_api')} {p.get('num_threads')} threads, {p.get('architecture')} kernels"
                 for p in threadpool_info() if p.get("user_api") == "blas"]
        blas += " (" + "; ".join(pools) + ")" if pools else ""
    except ImportError:
        pass
    return {"cpu": f"{cpu}, {os.cpu_count()} cores", "ram": f"{mem / GIB:.1f} GiB",
            "python": platform.python_version(), "numpy": f"numpy {np.__version__}, {blas}",
            "os": platform.platform()}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def llama_available() -> str | None:
    """None when llama_cpp imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its shared library fails to load
        return f"`import llama_cpp` failed ({type(e).__name__}: {e})"
    return None


# ---- the plan ----


def run(work: Path, quick: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    R: dict[str, Any] = {"machine": machine(), "load_start": loadavg(), "quick": quick,
                         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         "command": "python " + shlex.join(["tools/bench_run.py", *sys.argv[1:]]),
                         "main": [], "llama": {}, "profile": {}, "evict": [], "prefetch": [], "threads": [],
                         "models": {}}
    n_dec = 16 if quick else 64
    cores = os.cpu_count() or 1

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    mods = models(work)
    R["sgemv"] = spawn("sgemv", {})
    log(f"sgemv {', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in R['sgemv'].items() if '@' in k)}")
    R["llama_missing"] = llama_available()
    for m in mods:
        ids = prompt_ids(m.archive, max(m.prompts))
        R["models"][m.key] = {"label": m.label, "note": m.note, "archive_bytes": m.archive.stat().st_size,
                              "gguf_bytes": m.gguf.stat().st_size}
        base = {"archive": str(m.archive), "ids": ids, "decode_prompt": 128, "policy": "graph", "lookahead": 3}
        if m.prefetch_only:
            short = {**base, "prompts": [], "decode_prompt": 32, "n_decode": 8 if quick else 16}
            full = spawn("vk", {**short, "frac": None})
            full.update(model=m.key, frac=None)
            R["models"][m.key]["model_bytes"] = full["model_bytes"]
            R["main_extra"] = [*R.get("main_extra", []), full]
            for la in (0, 1, 3, 8):
                r = spawn("vk", {**short, "frac": 0.5, "lookahead": la})
                r.update(model=m.key, frac=0.5, lookahead=la, policy="graph")
                R["prefetch"].append(r)
                log(f"{m.key} prefetch la {la}: stall {r['decode']['stall_ms']:.1f} ms/token")
            continue
        # 1. the headline: unlimited and 25 % (and 25 % without the RAM tier), then llama.cpp on the same ids
        for frac, ram in ((None, None), (0.25, None), (0.25, 0)):
            nd = n_dec if ram is None else max(4, n_dec // 4)
            r = spawn("vk", {**base, "prompts": list(m.prompts), "n_decode": nd, "frac": frac, "ram_gb": ram,
                             "prefill_repeat": 1 if quick or frac else 2})
            r.update(model=m.key, frac=frac, ram_gb=ram)
            R["main"].append(r)
            R["models"][m.key]["model_bytes"] = r["model_bytes"]
            log(f"{m.key} budget {frac}: prefill {r[f'prefill_{m.prompts[0]}']['tps']:.1f} tok/s, "
                f"decode {r['decode']['tps']:.2f} tok/s, {r['decode']['uploaded'] / MB:.0f} MB/token uploaded")
        if R["llama_missing"] is None:
            R["llama"][m.key] = {}
            for th in sorted({cores, 1}, reverse=True):
                try:
                    r = spawn("llama", {"gguf": str(m.gguf), "ids": ids, "prompts": list(m.prompts),
                                        "decode_prompt": 128,
                                        "n_decode": n_dec, "threads": th, "prefill_repeat": 1 if quick else 2,
                                        "kv_overrides": m.llama_overrides})
                    log(f"{m.key} llama.cpp {th} threads: prefill {r[f'prefill_{m.prompts[0]}']['tps']:.1f} tok/s, "
                        f"decode {r['decode']['tps']:.2f} tok/s")
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    r = {"error": str(e)}
                    log(f"{m.key} llama.cpp failed: {e}")
                R["llama"][m.key][th] = r
        # 2. BLAS threads: the backend's default (one core spare) against every core, alternating
        if cores > 1:
            for frac in (None, 0.25) if m.key == "smollm2" else (None,):
                r = spawn("threads", {"archive": str(m.archive), "ids": ids, "frac": frac, "rounds": 2 if quick else 4,
                                      "settings": [[cores - 1, cores - 1], [cores - 1, cores], [cores, cores]]})
                r.update(model=m.key, frac=frac)
                R["threads"].append(r)
                log(f"{m.key} budget {frac} threads: " + ", ".join(
                    f"{x['threads']}: prefill {x['prefill_median']:.0f}, decode {x['decode_median']:.1f}"
                    for x in r["rows"]))
        # 3. where decode time goes
        r = spawn("vk", {**base, "prompts": [], "n_decode": 8 if quick else 32, "frac": None, "profile": True})
        R["profile"][m.key] = r
        log(f"{m.key} profile: {r['decode']['mean_tps']:.2f} tok/s instrumented")
        # 4. eviction (graph vs LRU) and 5. prefetch (lookahead sweep; its 50 % rows are shared)
        if quick and m.key != "smollm2":
            continue
        short = {**base, "prompts": [], "decode_prompt": 32, "n_decode": 8 if quick or m.key != "smollm2" else 16}
        lookaheads = (0, 3)
        for frac in (0.25, 0.5, 0.75):
            for la in lookaheads:
                for pol in ("graph", "lru"):
                    r = spawn("vk", {**short, "frac": frac, "lookahead": la, "policy": pol})
                    r.update(model=m.key, frac=frac, lookahead=la, policy=pol)
                    R["evict"].append(r)
                    log(f"{m.key} evict {pol} {frac} la {la}: {r['decode']['uploaded'] / MB:.0f} MB/token "
                        f"(ideal {(r['model_bytes'] - r['weight_room']) / MB:.0f}), {r['decode']['tps']:.2f} tok/s")
        for la in (0, 1, 3, 8):
            old = [r for r in R["evict"] if r["model"] == m.key and r["frac"] == 0.5 and r["policy"] == "graph"
                   and r["lookahead"] == la]
            r = old[0] if old else spawn("vk", {**short, "frac": 0.5, "lookahead": la})
            r.update(model=m.key, frac=0.5, lookahead=la, policy="graph")
            R["prefetch"].append(r)
            log(f"{m.key} prefetch la {la}: stall {r['decode']['stall_ms']:.1f} ms/token")
    R["load_end"] = loadavg()
    R["seconds"] = time.perf_counter() - t_start
    return R


# ---- the report ----


def _mb(x: float) -> str:
    return f"{x / MB:.0f}" if x >= 10 * MB or x == 0 else f"{x / MB:.1f}"


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f}"


def _budget(frac: float | None) -> str:
    return "unlimited" if frac is None else f"{frac:.0%}"


def _cfg(r: dict[str, Any]) -> str:
    return _budget(r["frac"]) + (", no RAM tier" if r.get("ram_gb") == 0 else "")


def _agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(R: dict[str, Any]) -> str:
    m = R["machine"]
    sg = {k: v for k, v in R["sgemv"].items() if "@" in k}

    def bw_at(threads: int | None) -> float:  # the best matrix-vector bandwidth at that many BLAS threads
        at = [v for k, v in sg.items() if k.endswith(f"@{threads}")]
        return max(at) if at else max(sg.values())

    L = [f"Machine: {m['cpu']}, {m['ram']} RAM; Python {m['python']}; {m['numpy']}; {m['os']}.",
         (f"Date: {R['date']}. Command: `{R['command']}` ({R['seconds'] / 60:.1f} min). "
         f"Load average (1/5/15 min) before: {R['load_start']}, after: {R['load_end']}: other jobs share this "
         "2-core VM, and any BLAS or ggml call split over both cores collapses while they run "
         "(see *BLAS threads*)."), "",
         ("Models (the numpy backend's device tier holds float32, 4 bytes per weight, so budgets are fractions of the "
         "f32 size, not of the file):"), "",
         "| model | GGUF MB | archive MB | f32 in the device tier MB | what |", "|---|--:|--:|--:|---|"]
    for k, mm in R["models"].items():
        L.append(f"| {mm['label']} | {_mb(mm['gguf_bytes'])} | {_mb(mm['archive_bytes'])} | "
                 f"{_mb(mm.get('model_bytes', 0))} | {mm['note']} |")
    L += ["", "numpy f32 matrix-vector (`np.matmul(x, W.T, out=y)`, one row, as the backend calls it; best of 10): "
          + ", ".join(f"{k.split('@')[0]} at {k.split('@')[1]} thread(s) {v / 1e9:.1f} GB/s" for k, v in sg.items())
          + ". The *limit* column is decode at that bandwidth (for the backend's decode thread count) over the f32 "
          "model: every weight read once per token and nothing else."]

    # generation table
    cores = max([1, *(int(t) for lc in R["llama"].values() for t in lc)])
    L += ["", "### Prefill and decode (greedy, prefetch lookahead 3, graph eviction, default BLAS threads)", "",
          ("Prefill: one forward pass over the first N ids of the same English prompt (best of 2 at unlimited budget). "
          "Decode: a 128-token prompt, then tokens/s from the median time per decoded token (ignore EOS). llama.cpp "
          f"runs the same ids on the same GGUF file, with {cores} threads and with 1 (shown as {cores}t / 1t); *ratio* "
          "is vkpack / the faster llama.cpp setting; *same greedy tokens*: the common prefix of the two decodes."), "",
          ("| model | budget | prefill 128 tok/s | prefill 512 tok/s | decode tok/s | decode vs limit | "
          f"llama.cpp prefill 128 ({cores}t / 1t) | llama.cpp prefill 512 | llama.cpp decode | ratio prefill 128 | "
          "ratio decode | same greedy tokens |"),
          "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]

    def pair(lc: dict[Any, Any], key: str) -> tuple[str, float]:
        vals = [lc[t][key]["tps"] if key in lc[t] else None for t in sorted(lc, key=int, reverse=True)]
        ok = [v for v in vals if v]
        return " / ".join("-" if v is None else f"{v:.1f}" for v in vals), max(ok) if ok else 0.0

    for r in R["main"]:
        mk = r["model"]
        lim = bw_at(r["threads"][0]) / r["model_bytes"]
        lc = {t: x for t, x in R["llama"].get(mk, {}).items() if "decode" in x}
        p128, p512 = r.get("prefill_128"), r.get("prefill_512")
        row = [R["models"][mk]["label"], _cfg(r), f"{p128['tps']:.1f}", f"{p512['tps']:.1f}" if p512 else "-",
               f"{r['decode']['tps']:.2f}", f"{r['decode']['tps'] / lim:.0%} of {lim:.0f}"]
        if lc:
            s128, b128 = pair(lc, "prefill_128")
            s512, _ = pair(lc, "prefill_512")
            sdec, bdec = pair(lc, "decode")
            ref = lc[max(lc, key=int)]["decode"]["tokens"]
            row += [s128, s512 if p512 else "-", sdec, f"{p128['tps'] / b128:.2f}", f"{r['decode']['tps'] / bdec:.2f}",
                    f"{_agree(r['decode']['tokens'], ref)} of {min(len(ref), len(r['decode']['tokens']))}"]
        else:
            row += ["-"] * 6
        L.append("| " + " | ".join(row) + " |")
    if R["llama_missing"]:
        L += ["", f"llama.cpp: not measured: {R['llama_missing']}."]
    else:
        for mk, lcs in R["llama"].items():
            for t, lc in lcs.items():
                if "error" in lc:
                    L += ["", f"llama.cpp on {R['models'][mk]['label']} ({t} threads): {lc['error']}"]
        lc = next((x for lcs in R["llama"].values() for x in lcs.values() if "version" in x), None)
        if lc:
            L += ["", (f"llama.cpp: llama-cpp-python {lc['version']}, built here from source "
                  f"(`CMAKE_ARGS=-DGGML_NATIVE=ON pip wheel llama-cpp-python`); `{lc['system_info']}`")]

    # BLAS threads
    if R["threads"]:
        L += ["", "### BLAS threads (one engine, the settings alternating pass by pass so that they share the load)",
              "",
              ("Each round: prefill 128 ids, then 8 decoded tokens, per setting; best and median over the rounds. "
              "few-row = decode products, many-row = prefill products. The backend's default leaves one core "
              "spare."), "",
              ("| model | budget | BLAS threads few-row / many-row | prefill 128 tok/s best / median | "
              "decode tok/s best / median | load before → after |"), "|---|---|--:|--:|--:|---|"]
        for r in R["threads"]:
            for x in r["rows"]:
                dflt = " (default)" if x["threads"] == r["default"] else ""
                L.append(f"| {R['models'][r['model']]['label']} | {_budget(r['frac'])} | {x['threads'][0]} / "
                         f"{x['threads'][1]}{dflt} | {x['prefill_best']:.0f} / {x['prefill_median']:.0f} | "
                         f"{x['decode_best']:.1f} / {x['decode_median']:.1f} | {r['load_start']} → {r['load_end']} |")

    # memory and streaming
    L += ["", "### Memory and streaming per decoded token (same runs)", "",
          ("Read = stored bytes from the archive, decompressed = codec output, uploaded = f32 bytes converted into the "
          "device tier. The RAM tier (decoded pack bytes) is unlimited by default, so after the first pass packs "
          "come back from RAM without reading or decompressing; *no RAM tier* (`ram_gb=0`) reads and decompresses "
          "every streamed pack again. *Ideal* is model − weight room, the least a budget can stream. Peak RSS "
          "counts the device tier, the RAM tier, the archive's mmap pages that were touched (file-backed) and the "
          "interpreter with numpy and tokenizers; llama.cpp's counts its mmap of the GGUF."), "",
          ("| model | budget: weights + KV/act MiB | peak device MiB | peak RSS MiB | read MB/tok | "
           "decompressed MB/tok | "
          "uploaded MB/tok | ideal MB/tok | hit rate | stall ms/tok | first pass s |"),
          "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in R["main"]:
        d = r["decode"]
        hr = "-" if d["hit_rate"] is None else f"{d['hit_rate']:.0%}"
        L.append(f"| {R['models'][r['model']]['label']} ({_cfg(r)}) | {_mib(r['weight_room'])} + "
                 f"{_mib(r['budget'] - r['weight_room'])} | {_mib(r['peak_device'])} | {_mib(r['peak_rss'])} | "
                 f"{_mb(d['read'])} | {_mb(d['decompressed'])} | {_mb(d['uploaded'])} | "
                 f"{_mb(r['model_bytes'] - r['weight_room'])} | {hr} | {d['stall_ms']:.1f} | {r['cold_s']:.1f} |")
    for mk, lcs in R["llama"].items():
        for t, lc in sorted(lcs.items(), key=lambda kv: -int(kv[0]))[:1]:
            if "peak_rss" in lc:
                L.append(f"| llama.cpp ({t} threads), {R['models'][mk]['label']} | - | - | {_mib(lc['peak_rss'])} | "
                         "- | - | "
                         f"- | - | - | - | {lc['cold_s']:.1f} |")

    # eviction
    if R["evict"]:
        L += ["", "### Eviction: f32 bytes uploaded per decoded token, graph (Belady) vs LRU", "",
              ("32-token prompt, then the decoded tokens measured after a cold pass; budget = weight room + the "
              "KV/activation reservation."), "",
              ("| model | budget | lookahead | ideal MB/tok | graph MB/tok | graph / ideal | LRU MB/tok | "
               "LRU / ideal | "
              "graph tok/s | LRU tok/s |"), "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        keys = sorted({(r["model"], r["frac"], r["lookahead"]) for r in R["evict"]},
                      key=lambda k: (list(R["models"]).index(k[0]), k[1], k[2]))
        for mk, frac, la in keys:
            def pick(pol: str, mk: str = mk, frac: float = frac, la: int = la) -> dict[str, Any]:
                return next(r for r in R["evict"]
                            if (r["model"], r["frac"], r["lookahead"], r["policy"]) == (mk, frac, la, pol))

            g, lr = pick("graph"), pick("lru")
            ideal = g["model_bytes"] - g["weight_room"]
            L.append(f"| {R['models'][mk]['label']} | {_budget(frac)} | {la} | {_mb(ideal)} | "
                     f"{_mb(g['decode']['uploaded'])} | "
                     f"{g['decode']['uploaded'] / ideal:.2f} | {_mb(lr['decode']['uploaded'])} | "
                     f"{lr['decode']['uploaded'] / ideal:.2f} | {g['decode']['tps']:.2f} | {lr['decode']['tps']:.2f} |")

    # prefetch
    if R["prefetch"]:
        L += ["", "### Prefetch: stall per decoded token against the lookahead (50 % budget, graph eviction)", "",
              ("*convert* is the loader's time per token turning decoded bytes into f32 in the tier (dequantize, one "
              "core), *compute* = decode − stall. The prefetcher can hide at most the compute time, so the stall "
              "cannot fall below *expected* = convert − (decode time at unlimited budget), or convert at "
              "lookahead 0."), "",
              ("| model | lookahead | decode ms/tok | stall ms/tok | compute ms/tok | convert ms/tok | "
              "expected stall ms/tok | uploaded MB/tok | prefetch hits | late | misses |"),
              "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in R["prefetch"]:
            d = r["decode"]
            ms_tok = 1e3 / d["mean_tps"]
            # with no lookahead nothing overlaps; with one, only the compute of the unlimited-budget run hides loads
            full = next((x for x in R["main"] + R.get("main_extra", [])
                         if x["model"] == r["model"] and x["frac"] is None), None)
            compute = 1e3 / full["decode"]["mean_tps"] if full else 0.0
            expect = d["upload_ms"] if r["lookahead"] == 0 else max(0.0, d["upload_ms"] - compute)
            L.append(f"| {R['models'][r['model']]['label']} | {r['lookahead']} | {ms_tok:.0f} | {d['stall_ms']:.0f} | "
                     f"{ms_tok - d['stall_ms']:.0f} | {d['upload_ms']:.0f} | {expect:.0f} | {_mb(d['uploaded'])} | "
                     f"{d['hits']} | {d['late']} | {d['misses']} |")

    # profile
    for mk, r in R["profile"].items():
        p = r["profile"]
        tot = 1e3 / r["decode"]["mean_tps"]
        lin = p["ops"].get("linear", [0, 0])
        L += ["", (f"### Where decode time goes: {R['models'][mk]['label']}, unlimited budget "
              f"({tot:.1f} ms/token instrumented)"), "",
              "| op | calls/token | ms/token | µs/call | share |", "|---|--:|--:|--:|--:|"]
        for k, (c, s) in sorted(p["ops"].items(), key=lambda kv: -kv[1][1]):
            L.append(f"| {k} | {c:.0f} | {1e3 * s:.2f} | {1e6 * s / c:.1f} | {1e3 * s / tot:.0%} |")
        ops_ms = sum(s for k, (c, s) in p["ops"].items() if not k.startswith("(")) * 1e3
        L.append(f"| (outside ops: executor loop, argmax) | | {tot - ops_ms:.2f} | | {(tot - ops_ms) / tot:.0%} |")
        if lin[1]:
            bw = bw_at(r["threads"][0])
            L += ["", (f"Linear layers read {p['linear_bytes'] / MB:.0f} MB of f32 weights per token "
                  f"(the head {p['head_bytes'] / MB:.0f} MB): {p['linear_bytes'] / lin[1] / 1e9:.1f} GB/s, "
                  f"{p['linear_bytes'] / lin[1] / bw:.0%} of the {bw / 1e9:.0f} GB/s matrix-vector above "
                  f"({r['threads'][0]} thread(s)).")]
    return "\n".join(L) + "\n"


NOTES = """
Notes (conclusions when this tool was written, 2026-11-26, on this VM; the tables above are this run's):
- **Where decode goes.** At an unlimited budget the numpy backend is bandwidth-bound: 85-97 % of a token is the
  linear layers, which stream the f32 weights at 77-97 % of one core's matrix-vector bandwidth (~30-38 GB/s).
  Everything else (attention, norms, rope, SwiGLU, the engine's ~280 pack acquires at ~2 µs) is 3-13 %. The gap to
  llama.cpp is bytes, not speed: per token numpy reads 4 bytes per weight (538 MB for SmolLM2) where llama.cpp
  reads Q4_1 (98 MB) or F16 (1 GB for the synthetic model, half of numpy's 2.1 GB, and there the ratio is ~0.5,
  i.e. the same bandwidth). No numpy path reads 16-bit or quantized weights at comparable speed (docs/VULKAN.md §13).
- **BLAS threads.** The one change that matters on this VM. A BLAS (or ggml) call split over both cores waits for
  its slowest thread; with any other runnable thread (the prefetcher, another job) each call waits out a scheduler
  slice. Measured per pass on one engine: SmolLM2 decode 67 vs 187 ms/token and prefill 231 vs 30 tok/s (1 vs 2
  threads, load 3-5); the synthetic model 117 vs 754 ms/token. With the second core free, 2 threads win 1.3-1.4x
  at decode and 1.6-1.9x at prefill at an unlimited budget, and nothing at 25 % (the prefetcher needs that
  core). The backend now leaves one core spare (here: 1 BLAS thread), and the prefetcher converts with 1 thread
  (`dequantize(threads=1)` on the prefetch thread). `OPENBLAS_NUM_THREADS=2` or `engine.backend.set_threads(2, 2)`
  restores all cores on a machine that is yours alone.
- **Before/after** (runtime/cpu; one process, the variants alternating pass by pass, load ~2.1, i.e. no other
  job; *orig@2* is the old code with its default 2 BLAS threads, *orig@1* the old code at 1 thread):

  | run | orig@2 | orig@1 | new (1 thread) |
  |---|--:|--:|--:|
  | SmolLM2 prefill 128, tok/s | 783 | 445 | 461 |
  | SmolLM2 prefill 512, tok/s | 614 | 415 | 433 |
  | SmolLM2 decode, tok/s | 56.2 | 46.2 | 49.3 |
  | synthetic prefill 128, tok/s | 226 | 125 | 129 |
  | synthetic decode, tok/s | 22.5 | 15.9 | 17.2 |
  | SmolLM2 25 %, decode ms/token (separate processes) | 108-112 | | 89-110 |
  | synthetic 25 %, decode ms/token (separate processes) | 259 | | 203 |

  The op rewrites alone (orig@1 → new) gain 3-8 %; per call at T = 1 / T = 512 × 2048 (1 thread): rope 10 → 2 µs /
  5.4 → 0.18 ms (one complex multiply for GGUF's adjacent pairs), rms_norm 6.6 → 3.0 µs / 2.2 → 0.4 ms, SwiGLU
  6.3 → 4.4 µs / 7.5 → 3.6 ms (in place), attention unchanged at T = 1 and 62 → 36 ms at T = 512 with 32 heads
  (the scale folded into q, an additive causal mask instead of boolean indexing), the residual add in place. Greedy
  tokens are unchanged (tests/test_correctness.py: transformers' logits and 32 greedy tokens).
- **Eviction.** The graph policy streams 1.04-1.09x (model - budget) per token at every budget on both models at
  lookahead 0; LRU streams about the whole model (1.3-4.0x the ideal), as a cycle larger than the cache predicts.
  At lookahead 3 the graph policy rises to 1.07-1.09x on SmolLM2 and 1.17-1.20x on the synthetic model: the access
  schedule lists all 48 packs of the tied embedding (402 MB f32) for the embed step, though decode reads one row,
  so the prefetcher loads packs nobody uses, and each prefetch evicts a kept pack.
- **Prefetch.** Stalls vanish only when converting a pack is faster than computing with it, and here both share
  one memory bus. Converting (dequantizing to f32: Q4_1 ~4-5 GB/s, F16 ~10-16 GB/s of output per core) is 2-5x
  slower per byte than the matrix-vector that reads the result (~30-37 GB/s), and it slows down further while the
  model computes beside it (synthetic F16 at 50 %: 67 ms of converting per token alone at lookahead 0, 110-170 ms
  overlapped). So at 25-50 % budgets the stall stays near convert - compute whatever the lookahead, and on the
  synthetic F16 model lookahead 0 is even the fastest. On F32 weights (conversion is a copy) prefetch cuts the stall
  from 17 to 9-11 ms per token, not to zero. Lookahead also costs bytes: each prefetched pack evicts a kept one, so
  uploads grow with it (F32 model: 287 MB per token at 0, 307 at 1, 362 at 3, 444 at 8). Converting on one thread
  in the prefetcher (new) or on two made no measurable difference on a quiet machine.
- The RAM tier is on by default and holds every decoded pack, so at 25 % the RSS stays near the archive's decoded
  size (synthetic: 2.5 GB at 25 % vs 3.0 GB unlimited); without it (`ram_gb=0`) every streamed pack is read and
  decompressed again: decode tok/s roughly halves at 25 % (see the tables), while the RSS drops by the decoded
  archive.
- llama.cpp: `Llama(..., kv_overrides={"tokenizer.ggml.pre": "gpt-2"})` for the synthetic GGUF, whose pre-tokenizer
  name "gpt2" this llama.cpp rejects; ids go in directly, so its tokenizer is never used. Its greedy tokens differ
  from vkpack's after a few steps on SmolLM2 (its Q4_1 kernels quantize activations to 8 bits; vkpack matches
  transformers) and agree on the synthetic F16 model.
"""


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        res = CHILDREN[argv[1]](json.loads(argv[2]))
        print(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=smollm2.cache_root() / "bench_run",
                    help="folder for the synthetic model's GGUF and archive (kept between runs)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer decoded tokens and rounds; the eviction sweep on SmolLM2 only")
    ap.add_argument("--write-docs", action="store_true", help=f"replace this tool's section of {DOCS}")
    ap.add_argument("--json", type=Path, help="also save the raw results here")
    args = ap.parse_args(argv)
    R = run(args.work, args.quick)
    if args.json:
        args.json.write_text(json.dumps(R, indent=1))
    section = render(R)
    print(section)
    if args.write_docs:
        write_section("bench_run", "## Run (vkpack run, numpy backend)", section + NOTES)
        print(f"wrote {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
