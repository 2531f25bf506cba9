"""Mixture of experts on the GPU (issue 14): vkpack at a VRAM budget against llama.cpp's expert offload, one call.

The model is tools/make_synthetic.py's `qwen3_30b_a3b` (Qwen3-30B-A3B's shapes: 48 layers, 128 experts of
ffn 768, 8 used; ~17.2 GB as Q4_0), generated on the machine. `--routing uniform` (the default) gives its
token embedding std 1.0, so that every layer's router picks near-uniformly at random from token to token:
the worst case for an expert cache, below a trained model's hit rates. `--routing collapsed` (every weight
at std 0.02) routes almost the same experts for every decode token (make_synthetic.py's module doc): hit
rates near 100 %, above a trained model's. Prefill (every expert chosen) is alike in both.

vkpack, per `--budgets` (GiB; `--vram-gb`) and `--device`, each in a fresh engine: a `--prompt`-token prefill
(its second pass timed; the first records and loads) and decode of random token ids fed one at a time, as
llama-bench's tg does (the median of `--decode` tokens after 4 untimed ones), with the expert hit rate of
`Engine.stats()` over the timed decode and over the whole run, and where the missing experts went (hybrid).

llama.cpp (`--llama-bench`, built on the machine from the sources llama-cpp-python vendors), same GGUF:
`-ngl 99 --n-cpu-moe K` (the experts of the first K layers on the CPU) for K from the smallest that fits
each budget upward (the bytes counted from the GGUF: non-expert weights + the GPU layers' experts + KV),
`-ngl 99 -ot exps=CPU` (every expert on the CPU) and `-ngl 0`. The GPU memory each run really used is
sampled with nvidia-smi where present. Ratios are against llama.cpp's best that fits the same budget.
Results are saved after each configuration to OUT/bench_moe.json and OUT/bench_moe.md.

    python tools/bench_moe.py --work /tmp/bench --out $OUT --device vulkan [--llama-bench PATH --threads 16]
    python tools/bench_moe.py --quick --device cpu --out /tmp/o          # a seconds-long check of the tool
    python tools/bench_moe.py --from-json bench_moe.json --write-docs --note "..."
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import logging
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import make_synthetic as ms
from bench_docs import cpu_and_memory, write_section
from vkpack.runtime.engine import Engine

WARM = 4
SECTION = "Mixture of experts on the GPU (issue 14)"
QUICK = ms.Spec(arch="qwen3moe", layers=4, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=2048,
                experts=16, experts_used=4, expert_ffn=128)
QUICK_BUDGETS = "0.003,0.004"  # GiB: about 2/3 and 9/10 of the quick model's 4.6 MB
# with the vulkan or hybrid device the tier also holds activations, io and the KV caches: lavapipe, 6.3 MiB at
# least for vulkan (0.008 and 0.01 GiB held 13 % and 88 % of the decode's experts), 14.3 MiB for the hybrid
QUICK_BUDGETS_DEVICE = "0.015,0.02"
_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(?:gate|up|down)_exps\.weight$")


def model_files(work: Path, dtype: str, quick: bool, embed_std: float | None) -> tuple[Path, Path]:
    """The GGUF (kept: llama.cpp reads it) and its archive (`--codec none`), each made once."""
    spec = dataclasses.replace(QUICK if quick else ms.Spec.qwen3_30b_a3b(), embed_std=embed_std)
    routing = "" if embed_std is None else f"-e{embed_std:g}"
    return bench_gpu.synthetic_files(f"qwen3moe-{'quick' if quick else '30b-a3b'}-{dtype}{routing}", work, spec, dtype)


def gguf_split(path: Path) -> dict[str, Any]:
    """Bytes of the GGUF's tensors: the non-expert ones, each layer's experts, and the KV shape."""
    r = gguf.GGUFReader(path)
    per_layer: dict[int, int] = {}
    other = 0
    for t in r.tensors:
        m = _EXPS.match(t.name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + int(t.n_bytes)
        else:
            other += int(t.n_bytes)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def num(key: str) -> int:
        return int(r.fields[f"{arch}.{key}"].parts[-1][0])

    kv_per_token = 2 * num("block_count") * num("attention.head_count_kv") * num("attention.key_length") * 2  # f16 K, V
    return {"non_expert_bytes": other, "expert_bytes_per_layer": [per_layer[i] for i in sorted(per_layer)],
            "kv_bytes_per_token": kv_per_token}


def ncmoe_bytes(split: dict[str, Any], k: int, n_ctx: int) -> int:
    """GPU bytes of `-ngl 99 --n-cpu-moe k` (llama.cpp keeps the experts of layers 0..k-1 on the CPU)."""
    return split["non_expert_bytes"] + sum(split["expert_bytes_per_layer"][k:]) + split["kv_bytes_per_token"] * n_ctx


def fitting_ncmoe(split: dict[str, Any], budget_bytes: float, n_ctx: int) -> int | None:
    """The smallest --n-cpu-moe whose counted bytes fit the budget (None: not even all experts on the CPU)."""
    n = len(split["expert_bytes_per_layer"])
    return next((k for k in range(n + 1) if ncmoe_bytes(split, k, n_ctx) <= budget_bytes), None)


class GpuMemory:
    """Peak GPU memory in use (nvidia-smi, every 0.2 s) minus what was in use at the start; None without it."""

    def __init__(self) -> None:
        self.exe = shutil.which("nvidia-smi")
        self.base = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _used(self) -> int | None:
        if not self.exe:
            return None
        try:
            out = subprocess.run([self.exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            used = self._used()
            if used is not None and self.peak is not None:
                self.peak = max(self.peak, used)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> int | None:
        return None if self.base is None or self.peak is None else self.peak - self.base


def _expert_counts(eng: Engine) -> tuple[int, int]:
    s = eng.stats()
    return s["expert_hits"], s["expert_misses"]


def run_ours(arch: Path, device: str, vram_gb: float, prompt_len: int, n_decode: int,
             threads: int | None, profile: Path | None = None) -> dict[str, Any]:
    """One fresh engine at `vram_gb`: timed prefill (second pass) and median decode of random tokens (as
    llama-bench's tg feeds them: a random model's greedy tokens repeat, and so would its experts), with
    expert hits; with `profile`, the timed decode under cProfile (its top functions written there)."""
    n_ctx = prompt_len + WARM + n_decode + 8
    with GpuMemory() as mem:
        t0 = time.perf_counter()
        eng = Engine(arch, device=device, vram_gb=vram_gb, context=n_ctx, prefetch_lookahead=32, threads=threads)
        out: dict[str, Any] = {"engine": "vkpack", "device": device, "backend": eng.backend.name, "vram_gb": vram_gb,
                               "start_s": time.perf_counter() - t0, "model_bytes": eng.model_bytes,
                               "budget": eng.tier.budget}
        try:
            prompt = [int(t) for t in np.random.default_rng(1).integers(3, eng.hp["vocab"], prompt_len)]
            with eng.kv_session(prompt_len + WARM + n_decode + 1) as kv:
                times = []
                for _ in range(2):  # the first pass records its steps and loads
                    h0 = _expert_counts(eng)
                    t = time.perf_counter()
                    eng.forward_batch([(prompt, 0, kv)])
                    times.append(time.perf_counter() - t)
                h1 = _expert_counts(eng)
                out.update(prefill_tokens=prompt_len, prefill_s=times, prefill_tps=prompt_len / times[-1],
                           prefill_expert_hit_rate=_rate(h0, h1))
                feed = np.random.default_rng(2).integers(3, eng.hp["vocab"], WARM + n_decode)
                steps = []
                prof = cProfile.Profile() if profile else None
                for i in range(WARM + n_decode):
                    if i == WARM:
                        h0, up0, side0 = _expert_counts(eng), eng.metrics.bytes_uploaded, _sides(eng)
                        if prof:
                            prof.enable()
                    t = time.perf_counter()
                    eng.forward_batch([([int(feed[i])], prompt_len + i, kv)])
                    steps.append(time.perf_counter() - t)
                if prof:
                    prof.disable()
                    with open(profile, "w") as f:
                        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(30)
                timed = steps[WARM:]
                out.update(decode_tokens=n_decode, decode_ms=[round(s * 1e3, 2) for s in timed],
                           decode_tps=1 / statistics.median(timed), decode_tps_mean=len(timed) / sum(timed),
                           decode_expert_hit_rate=_rate(h0, _expert_counts(eng)),
                           uploaded_gb_per_token=(eng.metrics.bytes_uploaded - up0) / n_decode / 1e9,
                           **{f"decode_{k}_per_token": (v - side0[k]) / n_decode for k, v in _sides(eng).items()})
            stats = eng.stats()
            out.update({k: stats[k] for k in ("expert_hits", "expert_misses", "expert_hit_rate", "stall_seconds",
                                              "bytes_uploaded", "peak_device_bytes")})
            if hasattr(eng.backend, "placement"):
                out["placement"] = eng.backend.placement().get("lines")
        finally:
            eng.close()
    out["gpu_mib"] = mem.mib
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # so far in this process
    return out


def _sides(eng: Engine) -> dict[str, float]:
    """Where the missing experts went (the hybrid backend), the time spent waiting for routers and the moe ops
    routed on the device (resident)."""
    b = eng.backend
    gpu = getattr(b, "gpu", b)
    moe = gpu.runner.moe if hasattr(gpu, "runner") else None
    off = getattr(b, "offload", None)
    return {"router_wait_s": moe.router_wait_seconds if moe else 0.0,
            "routed_on_device": moe.routed_on_device if moe else 0,
            "experts_on_cpu": off.cpu_experts if off else 0, "experts_over_link": off.link_experts if off else 0,
            "cpu_s": off.cpu_seconds if off else 0.0}


def _rate(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    hits, misses = after[0] - before[0], after[1] - before[1]
    return hits / (hits + misses) if hits + misses else None


def run_llama(exe: str, src: Path, label: str, flags: list[str], counted: int | None, prompt_len: int,
              n_decode: int, threads: int) -> dict[str, Any]:
    """llama-bench with `flags`: prefill and decode tok/s, the bytes we counted for it, the GPU memory it used."""
    with GpuMemory() as mem:
        try:
            r = bench_gpu.llama_bench(exe, src, *flags, "-t", str(threads), "-p", str(prompt_len),
                                      "-n", str(n_decode), "-r", "2")
        except subprocess.TimeoutExpired as e:
            r = {"cmd": " ".join(map(str, e.cmd)), "error": f"timed out after {e.timeout} s"}
    rows = r.get("results", [])
    r.update(engine="llama.cpp", label=label, flags=flags, counted_gpu_bytes=counted, gpu_mib=mem.mib,
             prefill_tps=next((x["avg_ts"] for x in rows if x.get("n_prompt") and not x.get("n_gen")), None),
             decode_tps=next((x["avg_ts"] for x in rows if x.get("n_gen")), None))
    return r


def llama_configs(split: dict[str, Any], budgets: list[float], n_ctx: int, extra: list[int]) -> list[tuple]:
    """(label, flags, counted GPU bytes): --n-cpu-moe from each budget's fit upward by `extra`, all experts
    on the CPU, and -ngl 0 (weights in RAM; a CUDA build still runs large prefill matmuls on the GPU)."""
    n = len(split["expert_bytes_per_layer"])
    ks = sorted({k + e for b in budgets if (k := fitting_ncmoe(split, b * 2**30, n_ctx)) is not None
                 for e in [0, *extra] if k + e < n})  # n: every expert on the CPU, the -ot row below
    out = [(f"-ngl 99 --n-cpu-moe {k}", ["-ngl", "99", "-ncmoe", str(k)], ncmoe_bytes(split, k, n_ctx)) for k in ks]
    out.append(("-ngl 99 -ot exps=CPU", ["-ngl", "99", "-ot", "exps=CPU"], ncmoe_bytes(split, n, n_ctx)))
    out.append(("-ngl 0", ["-ngl", "0"], 0))
    return out


def best_llama(report: dict[str, Any], vram_gb: float, key: str) -> dict[str, Any] | None:
    """llama.cpp's fastest run (by `key`) among those whose counted GPU bytes fit `vram_gb`."""
    fits = [r for r in report.get("llama_cpp", []) if r.get(key) and r["counted_gpu_bytes"] <= vram_gb * 2**30]
    return max(fits, key=lambda r: r[key], default=None)


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "" if x is None else format(x, fmt)


ROUTING = {  # how each --routing's decode hit rates compare with a trained model's
    "uniform": "the embedding at std 1.0 (every router picks near-uniformly at random from token to token: decode "
               "hit rates are lower bounds for a trained model)",
    "collapsed": "every weight at std 0.02 (the routers pick nearly the same experts for every decode token: decode "
                 "hit rates are upper bounds for a trained model)"}


def render(report: dict[str, Any], note: str = "") -> str:
    """A markdown table: our runs with ratios against llama.cpp's best within the same budget, then llama.cpp's."""
    rows = [("| engine | budget / placement | GPU MiB used | prefill tok/s | decode tok/s | expert hit rate (decode) "
             "| prefill vs llama.cpp best | decode vs llama.cpp best |"), "|---|---|---|---|---|---|---|---|"]
    for r in report.get("runs", []):
        if "error" in r:
            rows.append(f"| vkpack {r['device']} | {r['vram_gb']} GiB | | error: {r['error'][:100]} | | | | |")
            continue
        ratios = []
        for key in ("prefill_tps", "decode_tps"):
            b = best_llama(report, r["vram_gb"], key)
            ratios.append(f"{r[key] / b[key]:.2f}x (`{b['label']}`)" if b else "")
        knobs = ("moe_recordings", "early_submit", "batched", "grouped", "device_routing")
        on = lambda key, default=False, r=r: "on" if r.get(key, default) else "off"
        rec = (f" ({r['moe_recordings']} recordings, early submit {on('early_submit')}, batched {on('batched', True)}, "
               f"grouped {on('grouped')}, device routing {on('device_routing')})"
               if len({tuple(x.get(k) for k in knobs) for x in report["runs"]}) > 1 else "")
        rows.append(f"| vkpack {r['device']}{rec} | `--vram-gb {r['vram_gb']:g}` | {_f(r.get('gpu_mib'), 'd')} | "
                    f"{r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | {_f(r.get('decode_expert_hit_rate'), '.1%')} | "
                    f"{ratios[0]} | {ratios[1]} |")
    for r in report.get("llama_cpp", []):
        if r.get("decode_tps") is None:
            rows.append(f"| llama.cpp | `{r['label']}` | | error: {r.get('error', '')[-100:]!r} | | | | |")
            continue
        counted = f"`{r['label']}` ({r['counted_gpu_bytes'] / 2**30:.2f} GiB counted)"
        rows.append(f"| llama.cpp | {counted} | {_f(r.get('gpu_mib'), 'd')} | {_f(r['prefill_tps'])} | "
                    f"{r['decode_tps']:.2f} | | | |")
    m = report.get("model", {})
    head = (f"{note}\n\nModel: {m.get('name')} as {m.get('dtype')} ({m.get('gguf_bytes', 0) / 1e9:.2f} GB; experts "
            f"{m.get('expert_bytes', 0) / 1e9:.2f} GB, the rest {m.get('non_expert_bytes', 0) / 1e9:.2f} GB), random "
            f"weights, {ROUTING[m.get('routing', 'collapsed')]}. Prefill "
            f"{report.get('prompt')} tokens; decode the median of {report.get('decode')} random tokens fed one at a time (llama-bench: "
            "its mean of 2 repetitions of the same). llama.cpp's best is its fastest run whose counted GPU bytes fit the budget.")
    return "\n".join([head.strip(), "", *rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--dtype", default="Q4_0", choices=("Q4_0", "Q8_0"))
    ap.add_argument("--routing", default="uniform", choices=("uniform", "collapsed"),
                    help="uniform: the embedding's std 1.0, so every layer routes near-uniformly (the worst case "
                         "for an expert cache); collapsed: all weights at std 0.02, where the routers choose nearly "
                         "the same experts for every decode token (make_synthetic.py's module doc)")
    ap.add_argument("--device", default="vulkan,hybrid",
                    help="Engine devices, comma-separated: vulkan and hybrid on the GPU, cpu for a check")
    ap.add_argument("--budgets", help="--vram-gb values, GiB (default 4,8; with --quick a fraction of its model)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--llama-bench", default="", help="llama.cpp's llama-bench (a CUDA build for the GPU rows)")
    ap.add_argument("--ncmoe-extra", default="4", help="--n-cpu-moe steps above each budget's fit to sweep")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="a 4-layer MoE of 4.6 MB, short prompt (checks the tool)")
    ap.add_argument("--only-files", action="store_true", help="make the GGUF and the archive, then stop")
    ap.add_argument("--profile", action="store_true", help="cProfile each timed decode: OUT/profile-DEVICE-BUDGET.txt")
    ap.add_argument("--moe-variants", default="",
                    help="A/B: comma-separated RECORDINGS:EARLY[:BATCHED[:GROUPED[:ROUTING]]], each run per device and "
                         "budget: the size of the Vulkan backend's cache of expert recordings (runtime/vk/moe.py "
                         "MAX_CACHED_RECORDINGS; 0: its default), whether held experts are submitted early "
                         "(EARLY_SUBMIT), whether a decode's experts run batched (BATCHED), a prefill's grouped "
                         "(GROUPED) and a resident decode's router on the device (DEVICE_ROUTING), 0 or 1")
    ap.add_argument("--from-json", type=Path, help="render a saved report instead of measuring")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    ap.add_argument("--note", default="", help="the paragraph above the table (machine, command, commit)")
    args = ap.parse_args(argv)
    if args.from_json:
        text = render(json.loads(args.from_json.read_text()), args.note)
        print(text)
        if args.write_docs:
            write_section("bench_moe", f"## {SECTION}", text)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("vkpack.runtime.vk", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quick:
        args.prompt, args.decode = min(args.prompt, 64), min(args.decode, 8)
    quick = QUICK_BUDGETS_DEVICE if {"vulkan", "hybrid"} & set(args.device.split(",")) else QUICK_BUDGETS
    budgets = [float(b) for b in (args.budgets or (quick if args.quick else "4,8")).split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    src, arch = model_files(args.work, args.dtype, args.quick, 1.0 if args.routing == "uniform" else None)
    if args.only_files:
        return 0
    split = gguf_split(src)
    cpu, ram = cpu_and_memory()
    report: dict[str, Any] = {
        "machine": {"cpu": cpu, "ram": ram, "platform": platform.platform()},
        "model": {"name": "quick" if args.quick else "qwen3_30b_a3b", "dtype": args.dtype, "routing": args.routing,
                  "gguf_bytes": src.stat().st_size, "expert_bytes": sum(split["expert_bytes_per_layer"]),
                  "non_expert_bytes": split["non_expert_bytes"]},
        "split": split, "prompt": args.prompt, "decode": args.decode, "budgets": budgets, "runs": [], "llama_cpp": []}

    def save() -> None:
        (args.out / "bench_moe.json").write_text(json.dumps(report, indent=1))
        (args.out / "bench_moe.md").write_text(render(report))

    from vkpack.runtime.vk import moe

    variants = ([(*(int(x) for x in v.split(":")), 1, 1, 1, 1)[:5] for v in args.moe_variants.split(",") if v]
                or [(0, 1, 1, 1, 1)])
    default_size = moe.MAX_CACHED_RECORDINGS
    for b in budgets:
        for device in args.device.split(","):
            for size, early, batched, grouped, routing in variants:
                size = size or default_size
                moe.MAX_CACHED_RECORDINGS = size
                moe.EARLY_SUBMIT, moe.BATCHED, moe.GROUPED = bool(early), bool(batched), bool(grouped)
                moe.DEVICE_ROUTING = bool(routing)
                tag = f"{device}-{b:g}" + (f"-rec{size}-early{early}-batched{batched}-grouped{grouped}-routing{routing}"
                                           if len(variants) > 1 else "")
                try:
                    r = run_ours(arch, device, b, args.prompt, args.decode,
                                 args.threads if device in ("cpu", "hybrid") else None,
                                 args.out / f"profile-{tag}.txt" if args.profile else None)
                except Exception as e:  # one failed configuration must not lose the others' numbers
                    r = {"engine": "vkpack", "device": device, "vram_gb": b, "error": f"{type(e).__name__}: {e}"}
                r["moe_recordings"], r["early_submit"], r["batched"] = size, bool(early), bool(batched)
                r["grouped"], r["device_routing"] = bool(grouped), bool(routing)
                report["runs"].append(r)
                save()
                print(json.dumps({k: v for k, v in r.items() if k != "decode_ms"}, default=str), flush=True)
    if args.llama_bench:
        n_ctx = args.prompt + args.decode
        extra = [int(x) for x in args.ncmoe_extra.split(",") if x]
        for label, flags, counted in llama_configs(split, budgets, n_ctx, extra):
            report["llama_cpp"].append(run_llama(args.llama_bench, src, label, flags, counted, args.prompt,
                                                 args.decode, args.threads))
            save()
            print(json.dumps(report["llama_cpp"][-1], default=str)[:600], flush=True)
    save()
    print(render(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
