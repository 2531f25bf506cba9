"""Batched decode on the GPU: aggregate tok/s of 1, 8 and 32 sequences per step, against llama.cpp's
llama-batched-bench on the same GGUF, in one run (issue 12, part 3).

Each batch size runs in one engine (resident, or streamed under `--vram-gb`): B sequences are prefilled
one by one with distinct `--prompt`-token prompts, then decode greedily together, one `forward_batch`
of B one-token rows per step (the way the server's scheduler steps them). A step's tokens count B;
aggregate tok/s is B * steps / seconds over `--decode` steps after 4 untimed ones (which record the
batch's steps). llama-batched-bench runs `-npp PROMPT -ntg DECODE -npl 1,8,32` with all layers on the
GPU (`-ngl 99`) and reports its S_TG t/s (generated tokens of all sequences over the generation time):
the same quantity.

    python tools/bench_batch.py --models 8b:Q4_K_M --batches 1,8,32 [--vram-gb 4]
        [--llama-batched NAME=PATH ...] --work /tmp/bench --out OUT
    python tools/bench_batch.py --quick      # a tiny model on whatever Vulkan device there is (a check)
Results: OUT/bench_batch.json (after each row) and OUT/bench_batch.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
from vkpack.runtime.engine import Engine

WARM_STEPS = 4


def run_batches(arch: Path, batches: list[int], prompt_len: int, n_decode: int, vram_gb: float | None,
                device: str, ops_attrs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Aggregate decode tok/s per batch size, in one engine (KV sessions made per batch size)."""
    ctx = prompt_len + WARM_STEPS + n_decode + 8
    out = []
    if vram_gb is None:  # resident: the engine's own unlimited budget holds one sequence's KV, not 32
        with Engine(arch, device=device, context=ctx) as probe:
            need = probe.model_bytes * 1.1 + max(batches) * probe.session_bytes(ctx, prompt_len) + 2**30
        vram_gb = need / 2**30
    with Engine(arch, device=device, vram_gb=vram_gb, context=ctx) as eng:
        for k, v in (ops_attrs or {}).items():  # kernel choices, before anything is recorded
            if not hasattr(eng.backend.ops, k):
                raise SystemExit(f"--ops: Ops has no attribute {k!r}")
            setattr(eng.backend.ops, k, v)
        rng = np.random.default_rng(0)
        for b in batches:
            sessions = [eng.kv_session(ctx, prompt_len) for _ in range(b)]
            kvs = [s.__enter__() for s in sessions]
            try:
                toks = []
                t = time.perf_counter()
                for kv in kvs:  # one prefill per sequence, as requests arrive one by one
                    ids = [int(x) for x in rng.integers(3, eng.hp["vocab"], prompt_len)]
                    toks.append(int(np.argmax(eng.forward_batch([(ids, 0, kv)])[0])))
                prefill = time.perf_counter() - t

                for i in range(WARM_STEPS):
                    toks = _step(eng, toks, kvs, prompt_len + i)
                t = time.perf_counter()
                for i in range(n_decode):
                    toks = _step(eng, toks, kvs, prompt_len + WARM_STEPS + i)
                dt = time.perf_counter() - t
            finally:
                for s in sessions:
                    s.__exit__()
            row = {"batch": b, "decode_steps": n_decode, "seconds": dt, "aggregate_tps": b * n_decode / dt,
                   "ms_per_step": dt / n_decode * 1e3, "prefill_tps": b * prompt_len / prefill,
                   "vram_gb": vram_gb, "peak": eng.tier.peak, "budget": eng.tier.budget}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def _step(eng: Engine, toks: list[int], kvs: list[Any], pos: int) -> list[int]:
    """One decode step of every sequence (one new token each at `pos`): their greedy next tokens."""
    logits = eng.forward_batch([([tk], pos, kv) for tk, kv in zip(toks, kvs)])
    return [int(i) for i in np.argmax(logits, axis=1)]


def llama_batched(exe: str, gguf: Path, prompt_len: int, n_decode: int, batches: list[int],
                  ngl: int = 99) -> dict[str, Any]:
    """llama-batched-bench's rows (its jsonl output) for the same prompt/decode lengths and batch sizes."""
    cmd = [exe, "-m", str(gguf), "-ngl", str(ngl), "-c", str((prompt_len + n_decode) * max(batches) + 64),
           "-b", "2048", "-ub", "512", "-npp", str(prompt_len), "-ntg", str(n_decode),
           "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    rows = []
    for line in (res.stdout + "\n" + res.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
    out: dict[str, Any] = {"cmd": " ".join(cmd), "seconds": time.perf_counter() - t, "rows": rows}
    if res.returncode or not rows:
        out["error"] = (res.stderr or res.stdout)[-2000:]
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| model | budget | engine | batch | aggregate decode tok/s | ms/step | x batch 1 | vs llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        budget = f"{m['vram_gb']:g} GiB" if m.get("vram_gb") else "resident"
        ours = {r["batch"]: r for r in m.get("rows", [])}
        one = ours.get(1, {}).get("aggregate_tps")
        llama = {b: {r["pl"]: r for r in v.get("rows", [])} for b, v in m.get("llama", {}).items()}
        for b, r in ours.items():
            vs = ", ".join(f"{r['aggregate_tps'] / rows[b]['speed_tg']:.2f}x {k}" for k, rows in llama.items()
                           if b in rows)
            ratio = f"{r['aggregate_tps'] / one:.2f}x" if one else ""
            lines.append(f"| {name} | {budget} | vkpack vulkan | {b} | {r['aggregate_tps']:.1f} | "
                         f"{r['ms_per_step']:.2f} | {ratio} | {vs} |")
        for k, rows in llama.items():
            for b, r in sorted(rows.items()):
                lines.append(f"| {name} | all layers | llama.cpp {k} | {b} | {r['speed_tg']:.1f} | "
                             f"{r['t_tg'] / r['tg'] * 1e3:.2f} | | |")
        if m.get("error"):
            lines.append(f"| {name} | {budget} | error: {m['error'][:100]} | | | | | |")
    return "\n".join(line for line in lines if line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="8b:Q4_K_M", help="bench_gpu model names (shape[:type])")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--vram-gb", type=float, default=None,
                    help="stream under this budget (default: resident, a budget that holds the model and every KV cache)")
    ap.add_argument("--device", default="vulkan")
    ap.add_argument("--llama-batched", action="append", default=[], metavar="NAME=PATH",
                    help="llama.cpp's llama-batched-bench built for a backend (e.g. cuda=/tmp/llb-cuda/...)")
    ap.add_argument("--work", default="/tmp/bench")
    ap.add_argument("--out", default=".")
    ap.add_argument("--ops", default="", help="Ops attributes for an A/B, as tools/bench_gpu.py's --ops")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a check of the tool)")
    args = ap.parse_args()
    work, out = bench_gpu.prepare(args)
    batches = [int(b) for b in args.batches.split(",")]
    prompt, decode = (16, 4) if args.quick else (args.prompt, args.decode)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(), "argv": sys.argv,
                           "models": {}}
    benches = dict(b.split("=", 1) for b in args.llama_batched)
    for name in args.models.split(","):
        m: dict[str, Any] = {"vram_gb": args.vram_gb}
        res["models"][name] = m
        try:
            arch = bench_gpu.model_archive(name, work, keep_gguf=bool(benches))
            m["rows"] = run_batches(arch, batches, prompt, decode, args.vram_gb, args.device,
                                    bench_gpu._ops_attrs(args.ops))
        except Exception as e:  # keep going: the other models' and llama.cpp's numbers still come back
            m["error"] = f"{type(e).__name__}: {e}"
            print(m["error"], flush=True)
        (out / "bench_batch.json").write_text(json.dumps(res, indent=1))
        gguf = work / f"{name.replace(':', '-')}.gguf"
        for backend, exe in benches.items():
            r = llama_batched(exe, gguf, prompt, decode, batches) if gguf.exists() else {"error": "no GGUF"}
            print(f"[{name}] llama.cpp {backend}: {json.dumps(r)[:400]}", flush=True)
            m.setdefault("llama", {})[backend] = r
            (out / "bench_batch.json").write_text(json.dumps(res, indent=1))
    text = table(res)
    (out / "bench_batch.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
