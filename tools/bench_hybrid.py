"""Hybrid CPU+GPU placement against pure streaming and CPU only, and llama.cpp's CPU backend, in one call.

For the 8B shape (tools/bench_gpu.py's `8b`: 32 layers, 4096 wide, F16, generated on the machine)
each configuration runs in a fresh engine: a 512-token prefill (its second pass timed, the first
records and loads) and greedy decode (the median of `--decode` tokens after 12 untimed ones). The
hybrid engines print their measured rates and plans. With `--llama-bench PATH` (llama.cpp's
llama-bench, built on the machine from the sources llama-cpp-python vendors), llama.cpp's CPU-only
decode of the same GGUF runs in the same call. Each result is appended to OUT/bench_hybrid.json as
soon as it exists, so a call cut short keeps what it measured.

    python tools/bench_hybrid.py --work /tmp/bench --out $OUT [--configs cpu,vulkan:4,hybrid:4,hybrid:8]
        [--model 8b|smol|1b] [--quick] [--llama-bench llama.cpp/build/bin/llama-bench --threads 16]
    python tools/bench_hybrid.py --from-json bench_hybrid.json --write-docs --note "..."   # the table
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic as ms
from bench_docs import write_section
import bench_gpu
from bench_gpu import SHAPES
from vkpack.runtime.engine import Engine

WARM = 12   # untimed decode tokens: past the hybrid's calibration of its CPU rate (runtime/hybrid/calibrate.py)
SWEEP_TOKENS = 8


def model_files(name: str, work: Path, quick: bool) -> tuple[Path, Path]:
    """The model's GGUF (kept: llama.cpp reads it) and its archive (`--codec none`), made once."""
    spec = ms.Spec(layers=4, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=2048) if quick else SHAPES[name]
    return bench_gpu.synthetic_files(f"{name}{'-quick' if quick else ''}", work, spec, "F16")


def run_config(arch: Path, device: str, vram_gb: float | None, prompt_len: int, n_decode: int,
               prefill: bool, threads: int | None = None, sweep: int = 0) -> dict[str, Any]:
    host = host_state()
    t0 = time.perf_counter()
    n_ctx = prompt_len + WARM + n_decode + sweep * SWEEP_TOKENS + 8
    eng = Engine(arch, device=device, vram_gb=vram_gb, context=n_ctx, prefetch_lookahead=32, threads=threads)
    started = time.perf_counter() - t0
    try:
        be = eng.backend
        rng = np.random.default_rng(1)
        prompt = [int(t) for t in rng.integers(3, eng.hp["vocab"], prompt_len)]
        out: dict[str, Any] = {"device": device, "backend": be.name, "vram_gb": vram_gb, "threads": threads,
                               "start_s": started, "host_at_start": host,
                               "model_bytes": eng.model_bytes, "budget": eng.tier.budget}
        with eng.kv_session(n_ctx) as kv:
            times = []
            for _ in range(2 if prefill else 1):
                t = time.perf_counter()
                logits = eng.forward_batch([(prompt, 0, kv)])
                times.append(time.perf_counter() - t)
            out["prefill_tokens"] = prompt_len
            out["prefill_s"] = times
            out["prefill_tps"] = prompt_len / times[-1]
            tok = int(np.argmax(logits[0]))
            steps = []
            for i in range(WARM + n_decode):
                if i == WARM:
                    before = (be.placement(), eng.metrics.stall_seconds, eng.metrics.bytes_uploaded)
                t = time.perf_counter()
                tok = int(np.argmax(eng.forward_batch([([tok], prompt_len + i, kv)])[0]))
                steps.append(time.perf_counter() - t)
            info, stall0, up0 = before
            after = be.placement()
            if info:  # where a decode token's time went (hybrid)
                out["per_token_ms"] = {k: (after[k] - info[k]) / n_decode * 1e3
                                       for k in ("cpu_seconds", "handover_seconds", "split_seconds")}
            out["per_token_ms_stall"] = (eng.metrics.stall_seconds - stall0) / n_decode * 1e3
            out["uploaded_gb_per_token"] = (eng.metrics.bytes_uploaded - up0) / n_decode / 1e9
            timed = steps[WARM:]
            out["decode_ms"] = [round(s * 1e3, 2) for s in timed]
            out["decode_tps"] = 1 / statistics.median(timed)
            out["decode_tps_mean"] = len(timed) / sum(timed)
            if be.name == "hybrid":
                out["plans"] = be.describe()   # the plans the timed tokens ran (before the sweep pins others)
            if sweep and be.name == "hybrid" and be.held_steps and be.fixed is None:
                out["sweep"] = sweep_plans(eng, kv, tok, prompt_len + WARM + n_decode, sweep)
        m = eng.metrics
        out["stall_s"], out["bytes_uploaded"] = m.stall_seconds, m.bytes_uploaded
        out["pinned_bytes"] = eng.pinned_bytes
        if be.name == "hybrid":
            out["passes"] = dict(be.passes)
            out["handover_s"] = be.handover_seconds
            # where the tier's room went (a plan meant to stream nothing uploaded 256 MiB a pass at 4 GiB)
            out["tier"] = {"blocks": list(eng.tier.blocks), "in_use": eng.tier.in_use, "entries": len(eng.tier.entries),
                           "weight_room": be.weight_room, "reserved": be.reserved_bytes,
                           "largest_pack": be.largest_pack}
        return out
    finally:
        eng.close()


def host_state() -> dict[str, float]:
    """The load average and the dirty and writeback page cache (GB) as a run starts: a host still
    writing the generated model back to disk takes cores from 16 threads that wait on their slowest."""
    out = {"loadavg_1m": os.getloadavg()[0]}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Dirty", "Writeback"):
                out[f"{key.lower()}_gb"] = int(rest.split()[0]) * 1024 / 1e9
    except OSError:
        pass
    return out


def sweep_plans(eng: Engine, kv: Any, tok: int, pos: int, n: int) -> list[dict[str, Any]]:
    """Decode under plans the planner did not choose: the CPU's run of held steps shortened a layer
    (two steps) at a time, `n` plans from the held run; each plan's expected and measured token time
    (the model's error across placements, not only at the chosen one)."""
    be = eng.backend
    held = sorted(be.held_steps - be.gathers)   # the layer steps (the gather stays on the CPU)
    rows = []
    for j in range(n):
        host = frozenset(held[2 * j:])
        if not host:
            break
        plan = be.pin_plan(1, host)
        times, c0 = [], be.cpu_seconds
        for _ in range(SWEEP_TOKENS):
            t = time.perf_counter()
            tok = int(np.argmax(eng.forward_batch([([tok], pos, kv)])[0]))
            times.append(time.perf_counter() - t)
            pos += 1
        rows.append({"cpu_steps": len(host), "cpu_gib": plan.host_bytes / 2**30,
                     "streamed_gib": plan.streamed_bytes / 2**30, "expected_ms": plan.seconds * 1e3,
                     "measured_ms": statistics.median(times[2:]) * 1e3,
                     "cpu_ms": (be.cpu_seconds - c0) / SWEEP_TOKENS * 1e3})
        print(f"sweep: {rows[-1]}", flush=True)
    return rows


def llama_bench(exe: str, gguf: Path, threads: int, n_decode: int, ngl: int = 0, prompt: int = 0) -> dict[str, Any]:
    """llama.cpp's decode (and a `prompt`-token prefill where > 0) of the same GGUF with `ngl` layers on the GPU
    (0: the CPU alone, where the build has no GPU backend or `-ngl 0`)."""
    out = bench_gpu.llama_bench(exe, gguf, "-ngl", str(ngl), "-t", str(threads), "-p", str(prompt),
                                "-n", str(n_decode), "-r", "2")
    out["ngl"] = ngl
    return out


def _llama_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved llama.cpp runs: `llama_cpp` (one, older reports) or `llama_cpp_runs` (one per -ngl)."""
    return report.get("llama_cpp_runs") or ([report["llama_cpp"]] if "llama_cpp" in report else [])


def _llama_ts(run: dict[str, Any], gen: bool) -> float | None:
    return next((r["avg_ts"] for r in run.get("results", []) if bool(r.get("n_gen")) == gen), None)


SECTION = "Hybrid CPU+GPU placement (issue 11)"


def render(report: dict[str, Any], note: str) -> str:
    """A markdown table of a saved report: one row per configuration, llama.cpp's CPU decode beside."""
    llamas = _llama_rows(report)
    ll = next((_llama_ts(r, True) for r in llamas if not r.get("ngl")), None)
    rows = ["| engine | budget | prefill 512 tok/s | decode tok/s (median) | vs llama.cpp CPU | plan (1 token) |",
            "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        if "error" in r:
            rows.append(f"| {r['device']} | {r.get('vram_gb')} GiB | error: {r['error'][:80]} | | | |")
            continue
        budget = "all RAM" if r["device"] == "cpu" else f"{r['vram_gb']:g} GiB" if r["vram_gb"] else "resident"
        plan = next((ln.split(": ", 1)[1] for ln in r.get("plans", []) if ln.startswith("plan: 1-token")), "")
        dev = r["device"] + (f" ({r['threads']} threads)" if r.get("threads") else "")
        prefill = f"{r['prefill_tps']:.0f}" if r["device"] != "cpu" else f"({r['prefill_tps']:.0f})"
        ratio = f"{r['decode_tps'] / ll:.2f}x" if ll else ""
        rows.append(f"| {dev} | {budget} | {prefill} | {r['decode_tps']:.2f} | {ratio} | {plan} |")
    for run in llamas:
        ts, pp = _llama_ts(run, True), _llama_ts(run, False)
        if ts is None:
            rows.append(f"| llama.cpp `-ngl {run.get('ngl', 0)}` | | error: {run.get('error', '')[-80:]!r} | | | |")
            continue
        ratio = f"{ts / ll:.2f}x" if ll else ""
        rows.append(f"| llama.cpp `-ngl {run.get('ngl', 0)}` | {'all RAM' if not run.get('ngl') else ''} | "
                    f"{f'{pp:.0f}' if pp else ''} | {ts:.2f} | {ratio} | |")
    rates = next((ln for r in report["runs"] for ln in r.get("plans", []) if ln.startswith("rates:")), "")
    return "\n".join([note, "", *rows, "", f"Measured {rates}" if rates else ""]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/bench")
    ap.add_argument("--out", default=".")
    ap.add_argument("--model", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--configs", default="hybrid:4,cpu,vulkan:4,hybrid:8",
                    help="device[:vram GiB[:CPU threads]] list; device as Engine's (cpu, vulkan, hybrid, numpy)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--sweep", type=int, default=0,
                    help="hybrid: then decode under this many shorter CPU runs than the plan's (a layer less each)")
    ap.add_argument("--llama-bench", default="")
    ap.add_argument("--llama-ngl", default="0", help="comma-separated -ngl values for llama-bench (0: CPU only)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="a tiny model (a check of the tool itself)")
    ap.add_argument("--only-files", action="store_true", help="make the GGUF and the archive, then stop")
    ap.add_argument("--from-json", type=Path, help="render a saved report instead of measuring")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    ap.add_argument("--note", default="", help="the paragraph above the table (machine, command, commit)")
    args = ap.parse_args()
    if args.from_json:
        text = render(json.loads(args.from_json.read_text()), args.note)
        print(text)
        if args.write_docs:
            write_section("bench_hybrid", f"## {SECTION}", text)
        return
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("vkpack.runtime.vk",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gguf, arch = model_files(args.model, work, args.quick)
    if args.only_files:
        return
    report: dict[str, Any] = {"machine": {"cpu": platform.processor(), "cores": os.cpu_count()},
                              "model": args.model, "runs": []}
    path = out / "bench_hybrid.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=1))

    for cfg in args.configs.split(","):
        device, _, rest = cfg.partition(":")
        vram, _, threads = rest.partition(":")
        try:
            r = run_config(arch, device, float(vram) if vram else None, args.prompt, args.decode,
                           prefill=device != "cpu", threads=int(threads) if threads else None, sweep=args.sweep)
        except Exception as e:  # one failed configuration must not lose the others' numbers
            r = {"device": device, "vram_gb": vram, "error": f"{type(e).__name__}: {e}"}
        report["runs"].append(r)
        save()
        print(json.dumps({k: v for k, v in r.items() if k not in ("decode_ms",)}, default=str), flush=True)
    if args.llama_bench:
        report["llama_cpp_runs"] = []
        for ngl in (int(n) for n in args.llama_ngl.split(",")):
            report["llama_cpp_runs"].append(llama_bench(args.llama_bench, gguf, args.threads, 32, ngl,
                                                        args.prompt if ngl else 0))
            save()
            print(json.dumps(report["llama_cpp_runs"][-1]), flush=True)


if __name__ == "__main__":
    main()
