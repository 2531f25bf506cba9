"""Where a token's time goes on the Vulkan backend: GPU time per kernel and Python time per call.

Every command of every recording gets a timestamp (Recorder.profile_all), so one decode pass and
one prefill pass are broken down by kernel (total, count, mean) plus the gaps between command
buffers; a cProfile of a few decode tokens shows where the host time goes. Not a benchmark (the
timestamps themselves cost a little): use tools/bench_gpu.py for the numbers we report.

    python tools/profile_gpu.py --work /tmp/bench --out $OUT --models 1b,8b [--prompt 512] [--batch 1,8,32]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import model_archive, prepare
from vkpack.runtime.engine import Engine
from vkpack.runtime.vk.recorder import Recorder


def pass_profile(backend) -> dict:
    """Per-kernel GPU time of the last pass (every recording of it, in step order)."""
    by_kernel: dict[str, list[float]] = defaultdict(list)
    busy = gaps = 0.0
    end = None
    recs = backend.runner._pass_recs   # the recordings the last pass ran (runtime/vk/replay.py)
    for si in sorted(recs):
        rec = recs[si]
        start, cmds = rec.command_times()
        if end is not None:
            gaps += max(0.0, start - end)
        t = start
        for label, dt in cmds:
            by_kernel[re.sub(r"\(.*", "", label)].append(dt)
            t += dt
            busy += dt
        end = t
    kernels = {k: {"ms": sum(v) * 1e3, "count": len(v), "mean_us": sum(v) / len(v) * 1e6}
               for k, v in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))}
    return {"gpu_ms": busy * 1e3, "gaps_ms": gaps * 1e3, "kernels": kernels}


def profile_model(arch: Path, prompt_len: int, n_decode: int, batch: int = 1, vram_gb: float | None = None) -> dict:
    """A prefill pass and decode passes of `batch` sequences (one token each per pass), profiled; resident,
    or streamed under `vram_gb`."""
    Recorder.profile_all = True
    ctx = prompt_len + n_decode + 8
    if vram_gb is None:
        probe = Engine(arch, device="vulkan", context=ctx)
        vram_gb = (probe.model_bytes * 1.1 + batch * probe.session_bytes(ctx, prompt_len) + 2**30) / 2**30
        probe.close()
    eng = Engine(arch, device="vulkan", context=ctx, vram_gb=vram_gb)
    try:
        be = eng.backend
        rng = np.random.default_rng(1)
        prompt = [int(t) for t in rng.integers(3, eng.hp["vocab"], prompt_len)]
        eng.generate(prompt[:8], max_tokens=4, temperature=0, ignore_eos=True)
        out: dict = {"model_bytes": eng.model_bytes, "batch": batch}
        sessions = [eng.kv_session(prompt_len + n_decode + 1, prompt_len) for _ in range(batch)]
        kvs = [s.__enter__() for s in sessions]
        try:
            toks = []
            for kv in kvs:
                t = time.perf_counter()
                logits = eng.forward_batch([(prompt, 0, kv)])
                out["prefill_s"] = time.perf_counter() - t
                toks.append(int(np.argmax(logits[0])))
            out["prefill"] = pass_profile(be)
            prof = cProfile.Profile()
            t = time.perf_counter()
            h0, m = be.wait_seconds, eng.metrics
            up0, stall0 = m.bytes_uploaded, m.stall_seconds
            for i in range(n_decode):
                if i == n_decode // 2:
                    prof.enable()
                logits = eng.forward_batch([([tk], prompt_len + i, kv) for tk, kv in zip(toks, kvs)])
                toks = [int(x) for x in np.argmax(logits, axis=1)]
            prof.disable()
            dt = time.perf_counter() - t
        finally:
            for s in sessions:
                s.__exit__()
        out["decode_ms_per_token"] = dt / n_decode * 1e3
        out["decode_wait_ms_per_token"] = (be.wait_seconds - h0) / n_decode * 1e3
        out["decode_uploaded_gb_per_step"] = (m.bytes_uploaded - up0) / n_decode / 1e9
        out["decode_stall_ms_per_step"] = (m.stall_seconds - stall0) / n_decode * 1e3
        out["vram_gb"] = vram_gb
        out["decode"] = pass_profile(be)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        out["host_profile"] = s.getvalue()
        return out
    finally:
        eng.close()
        Recorder.profile_all = False


def report(name: str, r: dict) -> str:
    lines = [(f"## {name}: {r['model_bytes'] / 1e9:.2f} GB; prefill {r['prefill_s'] * 1e3:.1f} ms; decode of "
              f"{r['batch']} sequence(s) {r['decode_ms_per_token']:.2f} ms/step (blocked on fences "
              f"{r['decode_wait_ms_per_token']:.2f}); budget {r['vram_gb']:.2f} GiB, "
              f"{r['decode_uploaded_gb_per_step']:.2f} GB uploaded a step, "
              f"{r['decode_stall_ms_per_step']:.2f} ms waiting for packs")]
    for what in ("decode", "prefill"):
        p = r[what]
        lines.append(f"### {what}: GPU busy {p['gpu_ms']:.2f} ms, gaps between command buffers {p['gaps_ms']:.2f} ms")
        lines.append("| kernel | ms | count | mean us |")
        lines.append("|---|--:|--:|--:|")
        for k, v in p["kernels"].items():
            lines.append(f"| {k} | {v['ms']:.3f} | {v['count']} | {v['mean_us']:.1f} |")
    lines += ["### host (cProfile of half the decode tokens, by own time)", "```", r["host_profile"][:6000], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/vkpack-bench-gpu")
    ap.add_argument("--out", default=".")
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--batch", default="1", help="sequences per decode pass, comma-separated (e.g. 1,8,32)")
    ap.add_argument("--vram-gb", type=float, default=None, help="a streamed budget (default: resident)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, to check the script on lavapipe")
    args = ap.parse_args(argv)
    work, out = prepare(args)
    res, text = {}, []
    for name in args.models.split(","):
        for b in map(int, args.batch.split(",")):
            key = name if b == 1 else f"{name} x{b}"
            res[key] = profile_model(model_archive(name, work), args.prompt, args.decode, b, args.vram_gb)
            text.append(report(key, res[key]))
            print(text[-1], flush=True)
            (out / "profile_gpu.json").write_text(json.dumps(res, indent=1))
            (out / "profile_gpu.md").write_text("\n\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
