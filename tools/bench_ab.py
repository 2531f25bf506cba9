"""A/B speed of two vkpack checkouts in one run: prefill and decode, numpy and Vulkan backends, same archives.

Each measurement runs in a fresh interpreter; the checkouts alternate round by round so that load
drifts hit both alike. The other checkout is imported through PYTHONPATH (a directory holding a
`vkpack` folder, e.g. `git worktree add /tmp/base/vkpack <commit>`).

    python tools/bench_ab.py --base /tmp/base [--rounds 3] [--json out.json]

Cases: SmolLM2-135M Q4_1 on the numpy backend, resident and streamed at half its size; a synthetic
4-layer llama (F16) on the Vulkan backend (lavapipe here, a real GPU elsewhere), resident and streamed.
Prints per case the median tok/s of each checkout and the ratio this/base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One engine: the best of 3 prefills, then the median decode step."""
    import vkpack
    from vkpack.runtime.engine import Engine

    ids = cfg["ids"]
    kw = {"device": cfg["device"], "context": len(ids) + cfg["n_decode"] + 8}
    try:
        probe = Engine(cfg["archive"], **kw)
    except ValueError:  # a checkout from before device "numpy", whose "cpu" was the numpy backend
        kw["device"] = "cpu"
        probe = Engine(cfg["archive"], **kw)
    vram = None if cfg["frac"] is None else (cfg["frac"] * probe.model_bytes + probe.session_bytes(kw["context"])
                                             + (16 << 20)) / 2**30
    probe.close()
    with Engine(cfg["archive"], vram_gb=vram, **kw) as eng:
        with eng.kv_session(kw["context"]) as kv:
            eng.forward_batch([(ids[:8], 0, kv)])  # cold: every pack loaded once
        prefill = []
        for _ in range(3):
            with eng.kv_session(kw["context"]) as kv:
                t = time.perf_counter()
                logits = eng.forward_batch([(ids, 0, kv)])[-1]
                prefill.append(time.perf_counter() - t)
        steps, toks = [], []
        with eng.kv_session(kw["context"]) as kv:
            logits = eng.forward_batch([(ids, 0, kv)])[-1]
            for i in range(cfg["n_decode"]):
                tok = int(np.argmax(logits))
                toks.append(tok)
                t = time.perf_counter()
                logits = eng.forward_batch([([tok], len(ids) + i, kv)])[-1]
                steps.append(time.perf_counter() - t)
        return {"prefill_tps": len(ids) / min(prefill), "decode_tps": 1 / statistics.median(steps),
                "tokens": toks, "backend": eng.backend.name, "vkpack": str(Path(vkpack.__file__).parent)}


def spawn(cfg: dict[str, Any], pythonpath: str | None) -> dict[str, Any]:
    env = {**os.environ}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
                       capture_output=True, text=True, env=env, check=False, timeout=1800)
    if p.returncode:
        raise RuntimeError(f"child failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def archives(work: Path) -> dict[str, Path]:
    """The archives both checkouts read (format 1.0 readers accept a 1.1 archive's extra key)."""
    sys.path.insert(0, str(HERE))
    import make_synthetic as ms
    import smollm2
    from vkpack.compiler.build import build

    work.mkdir(parents=True, exist_ok=True)
    out = {"smollm2": work / "smollm2.vkpack", "synth": work / "synth.vkpack"}
    if not out["smollm2"].exists():
        build(smollm2.smollm2_gguf(), out["smollm2"], progress=False)
    if not out["synth"].exists():
        spec = ms.Spec(layers=4, hidden=512, heads=8, kv_heads=4, ffn=1536, vocab=4096, std=0.05)
        build(ms.write_gguf(work / "synth.gguf", spec, dtype="F16", seed=1), out["synth"], max_pack_mb=2,
              progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="PYTHONPATH entry holding the base checkout as `vkpack` (required)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vkpack_bench_ab"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if not args.base:
        ap.error("--base is required")
    arcs = archives(args.work)
    ids = list(range(1, 129))  # 128 prompt tokens
    cases = [("numpy smollm2 resident", arcs["smollm2"], "numpy", None, 32),
             ("numpy smollm2 streamed 50%", arcs["smollm2"], "numpy", 0.5, 32),
             ("vulkan synth resident", arcs["synth"], "vulkan", None, 16),
             ("vulkan synth streamed 50%", arcs["synth"], "vulkan", 0.5, 16)]
    results: dict[str, dict[str, list[dict]]] = {c[0]: {"this": [], "base": []} for c in cases}
    for r in range(args.rounds):
        for name, arc, device, frac, n in cases:
            cfg = {"archive": str(arc), "device": device, "frac": frac, "n_decode": n, "ids": ids}
            order = [("this", None), ("base", args.base)]
            for side, path in order if r % 2 == 0 else order[::-1]:
                results[name][side].append(spawn(cfg, path))
            print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    print(f"{'case':30s} {'metric':12s} {'this':>9s} {'base':>9s} {'this/base':>9s}")
    for name, sides in results.items():
        same = all(a["tokens"] == b["tokens"] for a in sides["this"] for b in sides["base"])
        for metric in ("prefill_tps", "decode_tps"):
            a = statistics.median(x[metric] for x in sides["this"])
            b = statistics.median(x[metric] for x in sides["base"])
            print(f"{name:30s} {metric:12s} {a:9.1f} {b:9.1f} {a / b:9.3f}")
        print(f"{name:30s} greedy tokens identical: {same}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
