"""GPU benchmark of the Vulkan backend, everything in one call (for the lent H100/H200).

Measures the two limits first: the device's read bandwidth (a streaming-read kernel: argmax over a
1 GiB f32 matrix) and the host->device copy bandwidth (Device.upload of 1 GiB through staging).
Then, per model (synthetic F16 weights N(0, 0.02) written and compiled on the machine itself):
prefill of 512 tokens and greedy decode, resident and at --vram-gb 4, each reported as a fraction
of its limit; plus the Python host time per token. Results go to OUT/bench_gpu.json and .md.

    python tools/bench_gpu.py --work /tmp/bench --out $OUT [--models smol,1b,8b] [--quick]
"""

from __future__ import annotations

import argparse
import ast
import cProfile
import io
import itertools
import json
import os
import platform
import pstats
import re
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic as ms
from vkpack.compiler.build import build
from vkpack.runtime import vk
from vkpack.runtime.engine import Engine
from vk_bench import gpu_best, measure_upload

SHAPES = {  # name -> Spec (all with SmolLM2's 49,152-token vocabulary)
    "smol": ms.Spec(layers=30, hidden=576, heads=9, kv_heads=3, ffn=1536, vocab=49152, tied=True),
    "1b": ms.Spec(layers=16, hidden=2048, heads=32, kv_heads=8, ffn=8192, vocab=49152, tied=True),
    "8b": ms.Spec(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=49152),
}


def read_bandwidth(dev, nbytes: int) -> float:
    """GB/s of the streaming-read kernel (shaders/stream_read.comp) over `nbytes`, best of its
    configurations: the resident limit (weights read once per token at this rate)."""
    from vkpack.runtime.vk.kernels import get_kernel

    data, out = dev.alloc(nbytes), dev.alloc(4 * 65536)
    rec = vk.Recorder(dev)
    rec.fill(data, 0x01020304)
    rec.run()
    rec.destroy()
    best = 0.0
    for wg, nu, groups in itertools.product((256, 512), (2, 4, 8), (1024, 4096)):
        k = get_kernel(dev, "stream_read", 2, 4, (1,), {0: wg, 1: nu})
        rec = vk.Recorder(dev, timestamps=True)
        rec.dispatch(k, [data, out], (groups, 1, 1), struct.pack("<I", nbytes // 16))
        rec.finish()
        best = max(best, nbytes / gpu_best(rec, 10, warmup=5) / 1e9)
        rec.destroy()
    data.destroy()
    out.destroy()
    return best


def limits(quick: bool) -> dict:
    dev = vk.Device()
    out = {"device": dev.info.name, "type": dev.info.type, "api": str(dev.info.api_version)}
    out["read_gbps"] = read_bandwidth(dev, (64 if quick else 2048) << 20)
    up = measure_upload(dev, (64 if quick else 1024) << 20)
    out["upload"] = up
    out["h2d_gbps"] = next(v for k, v in up.items() if k.startswith("link"))  # the DMA link: the limit
    out["pack_upload_gbps"] = max(v for k, v in up.items() if k.startswith("upload_file") and "packs" in k)
    dev.close()
    return out


def synthetic_files(stem: str, work: Path, spec: ms.Spec, dtype: str, keep_gguf: bool = True) -> tuple[Path, Path]:
    """`work/stem.gguf` (random weights of `spec` stored as `dtype`) and its archive `work/stem.vkpack`
    (`--codec none`), each made once; keep_gguf=False: the GGUF only while the archive is built."""
    src, arch = work / f"{stem}.gguf", work / f"{stem}.vkpack"
    if not src.exists() and (keep_gguf or not arch.exists()):
        t = time.perf_counter()
        ms.write_gguf(src, spec, dtype=dtype, seed=0)
        print(f"[{stem}] generated {src.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    if not arch.exists():
        t = time.perf_counter()
        build(src, arch, codec="none", threads=os.cpu_count(), progress=False)
        print(f"[{stem}] built in {time.perf_counter() - t:.0f} s", flush=True)
    if not keep_gguf:
        src.unlink(missing_ok=True)
    return src, arch


def model_archive(name: str, work: Path, keep_gguf: bool = False) -> Path:
    """The archive of model `name`: a SHAPES key, optionally with a weight type, "8b:Q4_K_M" (default F16),
    generated and built in `work` on first use; keep_gguf leaves the GGUF beside it (for llama.cpp)."""
    shape, _, dtype = name.partition(":")
    return synthetic_files(name.replace(":", "-"), work, SHAPES[shape], dtype or "F16", keep_gguf)[1]


def llama_bench(exe: str, gguf: Path, *flags: str) -> dict:
    """llama.cpp's llama-bench on a GGUF with `flags` (e.g. "-ngl", "99", "-p", "512", "-n", "128"): its rows'
    tok/s, or the error it printed."""
    cmd = [exe, "-m", str(gguf), *flags, "-o", "json"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    if res.returncode:
        return {"cmd": " ".join(cmd), "error": res.stderr[-2000:]}
    rows = json.loads(res.stdout)
    return {"cmd": " ".join(cmd), "seconds": time.perf_counter() - t,
            "results": [{k: r.get(k) for k in ("n_prompt", "n_gen", "avg_ts", "stddev_ts", "n_threads", "backends",
                                                "cpu_info", "gpu_info")} for r in rows]}


WARM_DECODE = 4      # decode passes run before the timed ones (they record the session's steps)
COUNTERS = ("prefetch_hits", "prefetch_late", "misses", "stall_seconds", "upload_seconds", "bytes_uploaded",
            "read_seconds", "alloc_seconds", "prefetch_no_room")


def _counters(m) -> dict:
    return {k: getattr(m, k) for k in COUNTERS}


def _since(m, before: dict) -> dict:
    """How much each of COUNTERS grew since `before` (a _counters snapshot)."""
    return {k: getattr(m, k) - before[k] for k in COUNTERS}


def run_model(arch: Path, vram_gb: float | None, prompt_len: int, n_decode: int, lookahead: int = 32,
              ram_gb: float | None = None, ops_attrs: dict | None = None, evict_batch_mb: float = -1.0,
              profile_host: bool = False) -> dict:
    """One engine: a timed prefill and decode. evict_batch_mb >= 0 sets the tier's eviction batch;
    profile_host prints a cProfile of the decode loop (the main thread)."""
    eng = Engine(arch, device="vulkan", vram_gb=vram_gb, ram_gb=ram_gb, context=prompt_len + WARM_DECODE + n_decode + 8,
                 prefetch_lookahead=lookahead)
    for k, v in (ops_attrs or {}).items():  # kernel choices (nothing is recorded before the first pass)
        if not hasattr(eng.backend.ops, k):
            raise SystemExit(f"--ops: Ops has no attribute {k!r}")
        setattr(eng.backend.ops, k, v)
    if evict_batch_mb >= 0:
        eng.tier.evict_batch = int(evict_batch_mb * 2**20)
    try:
        be = eng.backend
        rng = np.random.default_rng(1)
        prompt = [int(t) for t in rng.integers(3, eng.hp["vocab"], prompt_len)]
        eng.generate(prompt[:8], max_tokens=4, temperature=0, ignore_eos=True)  # record, load, warm
        m = eng.metrics
        with eng.kv_session(prompt_len + WARM_DECODE + n_decode + 1) as kv:
            first = time.perf_counter()
            eng.forward_batch([(prompt, 0, kv)])   # the first prompt pass records its steps
            first = time.perf_counter() - first
            w0p, before = be.wait_seconds, _counters(m)
            if be.host_cache is not None:
                be.host_cache.trace = []
            t = time.perf_counter()
            logits = eng.forward_batch([(prompt, 0, kv)])  # the same positions again: steady state
            prefill = time.perf_counter() - t
            dma_busy = _busy(be.host_cache.trace, t, t + prefill) if be.host_cache is not None else 0.0
            prefill_loads = _since(m, before)
            prefill_loads["fence_wait_seconds"] = be.wait_seconds - w0p
            prefill_loads["dma_busy_fraction"] = dma_busy / prefill
            tok = int(np.argmax(logits[0]))
            # the first decode passes of a session record its steps (and, resident, one whole-pass
            # buffer and the embedding gathers): timed apart, then the steady state is measured
            t = time.perf_counter()
            for i in range(WARM_DECODE):
                tok = int(np.argmax(eng.forward_batch([([tok], prompt_len + i, kv)])[0]))
            warm_decode = time.perf_counter() - t
            pos0 = prompt_len + WARM_DECODE
            h0, w0, before = be.host_seconds, be.wait_seconds, _counters(m)
            prof = cProfile.Profile() if profile_host else None
            t = time.perf_counter()
            if prof is not None:
                prof.enable()
            for i in range(n_decode):  # greedy decode, one pass per token
                tok = int(np.argmax(eng.forward_batch([([tok], pos0 + i, kv)])[0]))
            dt = time.perf_counter() - t
            if prof is not None:
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
                print(out.getvalue()[:6000], flush=True)
            loads = _since(m, before)
        n = n_decode
        return {
            "vram_gb": vram_gb, "model_bytes": eng.model_bytes, "budget": eng.tier.budget,
            "prefill_tokens": prompt_len, "prefill_tps": prompt_len / prefill,
            "uploaded_prefill": prefill_loads["bytes_uploaded"],
            "prefill_loads": prefill_loads,
            "decode_tokens": n, "decode_tps": n / dt, "ms_per_token": dt / n * 1e3,
            "uploaded_per_token": loads["bytes_uploaded"] / n,
            "host_ms_per_token": (dt - (be.wait_seconds - w0)) / n * 1e3,
            "step_python_ms_per_token": (be.host_seconds - h0) / n * 1e3,
            "submits": be.submits, "stall_s": m.stall_seconds, "peak": eng.tier.peak,
            "first_prefill_s": first, "warm_decode_s": warm_decode, "warm_decode_tokens": WARM_DECODE,
            "decode_loads": loads, "ram_gb": ram_gb, "pinned_bytes": eng.pinned_bytes, "ops": ops_attrs or {},
        }
    finally:
        eng.close()


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The --work and --out folders (made), and with --quick tiny shapes in place of SHAPES."""
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        SHAPES.update({k: ms.Spec(layers=2, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=1024) for k in SHAPES})
    return work, out


def _busy(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by at least one of the (start, end) spans (copies in flight)."""
    busy, end = 0.0, lo
    for a, b in sorted(spans):
        a, b = max(a, end), min(b, hi)
        if b > a:
            busy += b - a
            end = b
    return busy


def _ops_attrs(spec: str) -> dict:
    """'a=1,b=True,c={0:(1,2)}' -> {'a': 1, 'b': True, 'c': {0: (1, 2)}} (values as Python literals)."""
    out = {}
    for item in filter(None, re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", spec)):
        k, _, v = item.partition("=")
        out[k.strip()] = ast.literal_eval(v.strip())
    return out


def table(res: dict) -> str:
    lim = res["limits"]
    device = (f"Device: {lim['device']} ({lim['type']}); read {lim['read_gbps']:.0f} GB/s (shaders/stream_read.comp "
              f"over 2 GiB), host->device link {lim['h2d_gbps']:.1f} GB/s (vkCmdCopyBuffer from system memory, "
              f"4 x 64 MiB in flight); pack loads from the page cache {lim['pack_upload_gbps']:.1f} GB/s "
              f"(Device.upload_file, 4 callers x 32 MiB).")
    header = ("| model | weights GB | budget | prefill tok/s | decode tok/s | ms/token | fraction of limit | "
              "host ms/token | uploaded GB/token |")
    lines = [device, "", header, "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in res["models"].items():
        for r in runs:
            if "error" in r:
                lines.append(f"| {name} | | {r.get('vram_gb')} | error: {r['error'][:80]} | | | | | |")
                continue
            wb = r["model_bytes"]
            if r["vram_gb"] is None:
                frac = wb / (r["ms_per_token"] / 1e3) / (lim["read_gbps"] * 1e9)
                ops = ", ".join(f"{k}={v}" for k, v in r.get("ops", {}).items())
                budget, what = "resident" + (f" ({ops})" if ops else ""), "of read bw"
            else:
                frac = r["uploaded_per_token"] / (r["ms_per_token"] / 1e3) / (lim["h2d_gbps"] * 1e9)
                pinned = "" if r.get("ram_gb") is None else f", --ram-gb {r['ram_gb']:g}"
                budget = f"{r['vram_gb']} GiB ({r.get('pinned_bytes', 0) / 2**30:.1f} GiB pinned{pinned})"
                what = "of h2d"
            lines.append(f"| {name} | {wb / 1e9:.2f} | {budget} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
                         f"{r['ms_per_token']:.2f} | {frac:.0%} {what} | {r['host_ms_per_token']:.2f} | "
                         f"{r['uploaded_per_token'] / 1e9:.2f} |")
    for name, per_backend in res.get("llama_cpp", {}).items():
        ours = next((r for r in res["models"].get(name, []) if r.get("vram_gb") is None and "error" not in r), None)
        for backend, r in per_backend.items():
            tg = next((x["avg_ts"] for x in r.get("results", []) if x.get("n_gen")), None)
            pp = next((x["avg_ts"] for x in r.get("results", []) if x.get("n_prompt")), None)
            if tg is None or pp is None:
                lines.append(f"| {name} | llama.cpp {backend} | error: {r.get('error', '')[:80]} |")
                continue
            vs = (f"; vkpack resident {ours['prefill_tps'] / pp:.2f}x prefill, {ours['decode_tps'] / tg:.2f}x decode"
                  if ours else "")
            lines.append(f"\nllama.cpp {backend} on {name} (`-ngl 99`): prefill {pp:.0f} tok/s, decode {tg:.1f} tok/s{vs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/vkpack-bench-gpu")
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="smol,1b,8b")
    ap.add_argument("--vram-gb", type=float, default=4.0)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--decode-streamed", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--lookahead", type=int, default=32, help="prefetch lookahead (packs)")
    ap.add_argument("--workers", type=int, default=0, help="prefetch threads (0: the backend's default)")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="sys.setswitchinterval for the run (0: Python's default, 5 ms)")
    ap.add_argument("--profile-host", action="store_true", help="print a cProfile of the decode loop")
    ap.add_argument("--evict-batch-mb", type=float, default=-1.0, help="eviction batch in MiB (-1: the engine's)")
    ap.add_argument("--skip-limits", action="store_true", help="do not measure the limits (for sweeps)")
    ap.add_argument("--resident", default="yes", choices=("yes", "no"), help="also run resident")
    ap.add_argument("--ram-gb", default="auto",
                    help="RAM budgets of the streamed runs, comma-separated: auto (the engine's default), or GiB; "
                         "0 keeps no pack in pinned memory (every reload reads the file)")
    ap.add_argument("--ops", action="append", default=[],
                    help="kernel settings of one resident run, e.g. 'attn_fused_store=False,mv_config={}' (Ops attributes); "
                         "repeat for A/B runs in one call (default: one run with the defaults)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script on lavapipe")
    ap.add_argument("--llama-bench", action="append", default=[], metavar="NAME=PATH",
                    help="llama.cpp's llama-bench built for a backend (e.g. cuda=/tmp/llb-cuda/bin/llama-bench), "
                         "run with -ngl 99 on each model's GGUF after ours; repeatable")
    ap.add_argument("--keep-gguf", action="store_true", help="keep the generated GGUF files (for llama.cpp)")
    args = ap.parse_args(argv)
    work, out = prepare(args)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "argv": sys.argv, "models": {}}
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    from vkpack.runtime.vk.backend import VulkanBackend

    if args.workers:
        VulkanBackend.load_workers = args.workers
    res["limits"] = limits(args.quick) if not args.skip_limits else {
        "device": "(limits not measured)", "type": "", "read_gbps": float("nan"), "h2d_gbps": float("nan"),
        "pack_upload_gbps": float("nan")}
    print(json.dumps(res["limits"]), flush=True)
    rams = [None if v == "auto" else float(v) for v in args.ram_gb.split(",")]
    variants = [_ops_attrs(o) for o in args.ops] or [{}]
    settings = ([(None, None, v) for v in variants] if args.resident == "yes" else []) + \
        [(args.vram_gb, r, variants[-1]) for r in rams]
    benches = dict(b.split("=", 1) for b in args.llama_bench)
    for name in args.models.split(","):
        runs = []
        for vram, ram, attrs in settings:
            try:
                arch = model_archive(name, work, keep_gguf=bool(benches) or args.keep_gguf)
                if vram is not None and arch.stat().st_size < vram * 2**30:
                    continue  # fits anyway: nothing streamed
                r = run_model(arch, vram, args.prompt if not args.quick else 16,
                              args.decode if vram is None else args.decode_streamed, args.lookahead, ram, attrs,
                              evict_batch_mb=args.evict_batch_mb, profile_host=args.profile_host)
            except Exception as e:  # keep going: partial results still come back
                traceback.print_exc()
                r = {"vram_gb": vram, "ram_gb": ram, "error": f"{type(e).__name__}: {e}"}
            print(f"[{name}] {json.dumps(r)}", flush=True)
            runs.append(r)
            res["models"][name] = runs
            (out / "bench_gpu.json").write_text(json.dumps(res, indent=1))
            (out / "bench_gpu.md").write_text(table(res) + "\n")
        gguf = work / f"{name.replace(':', '-')}.gguf"
        for backend, exe in benches.items():
            r = (llama_bench(exe, gguf, "-ngl", "99", "-p", str(args.prompt), "-n", str(args.decode), "-r", "3")
                 if gguf.exists() else {"error": "no GGUF"})
            print(f"[{name}] llama.cpp {backend}: {json.dumps(r)}", flush=True)
            res.setdefault("llama_cpp", {}).setdefault(name, {})[backend] = r
            (out / "bench_gpu.json").write_text(json.dumps(res, indent=1))
            (out / "bench_gpu.md").write_text(table(res) + "\n")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
