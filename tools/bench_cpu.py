"""Benchmark the native CPU backend against llama.cpp's CPU backend and the numpy backend, same files, same ids.

For each model (SmolLM2-135M Q4_1; a synthetic ~1 GB F16 llama; a synthetic ~1 GB llama stored as
llama.cpp's Q4_K_M mix, when make_synthetic can write it), each in a fresh process (so the peak RSS is
that run's own): prefill tok/s at 128 and 512 tokens (best of 3), greedy decode tok/s (the median step
of `--decode` tokens after a 128-token prompt), peak RSS against the archive's size, and the greedy
tokens' agreement with llama.cpp. Ratios are against llama.cpp (`llama-cpp-python`, built on this
machine with GGML_NATIVE) measured in the same run, at the same thread count (all cores).

Usage: python tools/bench_cpu.py [--work DIR] [--decode 32] [--models smollm2,f16,q4km] [--rounds 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import bench_run as br
import make_synthetic as ms
import smollm2
from bench_docs import write_section

SECTION = "CPU (native kernels) against llama.cpp"
LLAMA_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
                    "-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF "
                    "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")


def model_files(work: Path, keys: list[str]) -> list[br.Model]:
    out = []
    gpt2 = {"tokenizer.ggml.pre": "gpt-2"}  # as llama.cpp spells it, for synthetic GGUFs cached when make_synthetic wrote "gpt2"
    for key in keys:
        if key == "smollm2":
            out.append(br.Model("smollm2", "SmolLM2-135M Q4_1", smollm2.default_archive(), smollm2.smollm2_gguf(),
                                "real weights", (128, 512)))
        elif key in ("f16", "q4km"):
            dtype = "F16" if key == "f16" else "Q4_K_M"
            spec = ms.Spec.llama_1b().with_target_gb(1.0, "F16" if key == "f16" else "Q8_0")
            gguf = work / f"synthetic-llama-{spec.layers}L-{dtype}.gguf"
            arch = gguf.with_suffix(".vkpack")
            br._generated(gguf, arch, spec, dtype)
            out.append(br.Model(key, f"synthetic {gguf.stat().st_size / 1e9:.2f} GB {dtype}", arch, gguf,
                                f"llama, {spec.layers} layers, hidden {spec.hidden}, ffn {spec.ffn}", (128, 512), gpt2))
        else:
            raise SystemExit(f"unknown model {key!r}: smollm2, f16, q4km")
    return out


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's rounds as one result: the fastest round of each figure (prefill, decode), the
    highest peak RSS; `rounds` keeps every round's rates."""
    best = dict(max(runs, key=lambda r: r["decode"]["tps"]))
    for key in [k for k in best if k.startswith("prefill_")]:
        best[key] = max((r[key] for r in runs), key=lambda v: v["tps"])
    best["peak_rss"] = max(r["peak_rss"] for r in runs)
    best["rounds"] = [{k: v["tps"] for k, v in r.items() if isinstance(v, dict) and "tps" in v} for r in runs]
    return best


def run(work: Path, keys: list[str], n_decode: int, rounds: int = 1) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    R: dict[str, Any] = {"machine": br.machine(), "threads": threads, "models": {}, "rounds": rounds,
                         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                         "command": "python " + shlex.join(["tools/bench_cpu.py", *sys.argv[1:]]),
                         "llama_missing": br.llama_available()}
    for m in model_files(work, keys):
        ids = br.prompt_ids(m.archive, 512)
        base = {"archive": str(m.archive), "gguf": str(m.gguf), "ids": ids, "decode_prompt": 128,
                "prompts": list(m.prompts), "n_decode": n_decode, "prefill_repeat": 3, "frac": None,
                "policy": "graph", "lookahead": 3, "threads_native": threads}
        row: dict[str, Any] = {"label": m.label, "archive_bytes": m.archive.stat().st_size,
                               "gguf_bytes": m.gguf.stat().st_size}
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in range(rounds):  # the engines alternate, so that a busy minute does not fall on one of them
            for key in ("cpu", "numpy", "llama"):
                if (key == "numpy" and r) or (key == "llama" and R["llama_missing"] is not None):
                    continue  # the numpy reference once: it is slow and has no bar
                t = time.perf_counter()
                if key == "llama":
                    res = br.spawn("llama", {**base, "threads": threads, "kv_overrides": m.llama_overrides})
                else:
                    res = br.spawn("vk", {**base, "device": key})
                runs.setdefault(key, []).append(res)
                print(f"{m.key} {key} round {r}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        row.update({key: _best(rs) for key, rs in runs.items()})
        R["models"][m.key] = row
    return R


def render(R: dict[str, Any]) -> str:
    n = R.get("rounds", 1)
    rounds = (f" Each native and llama.cpp figure is the best of {n} rounds that alternate the two engines (the numpy "
              "backend: one round); every round's rates are in the JSON." if n > 1 else "")
    L = [(f"`{R['command']}`, {R['date']}: {R['machine']['cpu']}, {R['machine']['ram']}, {R['threads']} threads "
          "for every engine. Ratios are against llama.cpp's CPU backend measured in the same run. "
          f"The numpy backend is the reference the native one replaces.{rounds}"), ""]
    if R["llama_missing"]:
        L += [f"llama.cpp was not measured: {R['llama_missing']}", ""]
    else:
        lc = next((row["llama"] for row in R["models"].values() if "llama" in row), {})
        L += [(f"llama.cpp: llama-cpp-python {lc.get('version', '?')}, built here from source with "
               f"`CMAKE_ARGS=\"{LLAMA_CMAKE_ARGS}\"` (`GGML_NATIVE=ON` dies with SIGILL on this VM: its CPU "
               "flags AMX, which the VM does not grant); `" + lc.get("system_info", "?") + "`."), ""]
    L += ["| model | engine | prefill 128 | prefill 512 | decode | decode vs llama.cpp | peak RSS / archive |",
          "|---|---|---|---|---|---|---|"]
    for row in R["models"].values():
        lc = row.get("llama")
        for name, key in (("vkpack native", "cpu"), ("vkpack numpy", "numpy"), ("llama.cpp", "llama")):
            r = row.get(key)
            if r is None:
                continue
            p128, p512 = r.get("prefill_128", {}).get("tps"), r.get("prefill_512", {}).get("tps")
            dec = r["decode"]["tps"]
            ratio = f"{dec / lc['decode']['tps']:.2f}x" if lc and key != "llama" else ""
            rel = {p: (f" ({tps / lc[f'prefill_{p}']['tps']:.2f}x)" if lc and key != "llama" and tps else "")
                   for p, tps in ((128, p128), (512, p512))}
            L.append(f"| {row['label']} | {name} | {p128:.0f}{rel[128]} | {p512:.0f}{rel[512]} | {dec:.1f} | {ratio} | "
                     f"{r['peak_rss'] / row['archive_bytes']:.2f} |")
        if lc:
            same = br._agree(row["cpu"]["decode"]["tokens"], lc["decode"]["tokens"])
            L.append(f"| | greedy tokens equal to llama.cpp's before the first difference: {same} of "
                     f"{len(lc['decode']['tokens'])} | | | | | |")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=smollm2.cache_root() / "bench_cpu")
    ap.add_argument("--models", default="smollm2,f16,q4km")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1,
                    help="native and llama.cpp runs per model, alternating; each figure the best round's")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", type=Path, help="also save the raw results here")
    ap.add_argument("--from-json", type=Path, help="render saved results instead of measuring")
    args = ap.parse_args(argv)
    R = json.loads(args.from_json.read_text()) if args.from_json else run(args.work, args.models.split(","), args.decode,
                                                                            max(1, args.rounds))
    text = render(R)
    print(text)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(R, indent=1))
    if args.write_docs:
        write_section("bench_cpu", f"## {SECTION}", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
