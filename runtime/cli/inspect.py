"""`vkpack inspect FILE [--tensors] [--graph] [--json] [--plan]`: what an archive holds, like gguf_dump;
with --plan, where an engine under the given budgets would compute each pass (it opens one)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from ...pack_format.reader import Archive
from .paths import check_archive_path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("inspect", help="show an archive's metadata, packs and access graph")
    p.add_argument("archive")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--graph", action="store_true", help="list every step of the access graph with its ops")
    p.add_argument("--json", action="store_true", help="the whole index as JSON (tokenizer.json omitted)")
    p.add_argument("--plan", action="store_true", help="open an engine under --vram-gb/--ram-gb/--device and print "
                   "where it computes passes of 1, 8, 32 and 512 tokens (loads the model; measures the machine's "
                   "rates on first use)")
    p.add_argument("--vram-gb", type=float, default=None, help="--plan: device budget in GiB (default: unlimited)")
    p.add_argument("--ram-gb", type=float, default=None, help="--plan: RAM budget in GiB (default: unlimited)")
    p.add_argument("--device", default="auto", help="--plan: the backend to plan for")
    return p


PLAN_TOKENS = (1, 8, 32, 512)


def print_plan(args: argparse.Namespace) -> None:
    from ..engine import Engine

    with Engine(args.archive, vram_gb=args.vram_gb, ram_gb=args.ram_gb, device=args.device) as eng:
        be = eng.backend
        for n in PLAN_TOKENS:
            be.host_steps(n)   # makes the plan of that pass size
        print(f"plan: backend {be.name}, device budget {eng.tier.budget / 2**30:.2f} GiB "
              f"({'streamed' if eng.model_bytes > eng.tier.budget else 'resident'}), model "
              f"{eng.model_bytes / 2**30:.2f} GiB")
        lines = be.placement().get("lines") or [f"{be.name} computes every step of every pass"]
        for line in lines:
            print(f"  {line}")


def summary(a: Archive) -> dict[str, Any]:
    idx = a.index
    tok = {k: v for k, v in idx["tokenizer"].items() if k != "json"}
    kinds = Counter(p.kind for p in a.packs)
    return {
        "file": str(a.path), "size": a.size, "format": list(a.version), "generator": idx.get("generator"),
        "arch": idx["arch"], "hparams": idx["hparams"], "source": idx["source"], "tokenizer": tok,
        "packs": {"count": len(a.packs), "by_kind": dict(kinds), "raw_bytes": sum(p.raw_size for p in a.packs),
                  "stored_bytes": sum(p.stored_size for p in a.packs), "largest_raw": max(p.raw_size for p in a.packs),
                  "codecs": dict(Counter(p.codec for p in a.packs))},
        "tensors": len(a.tensors), "graph": {"steps": len(a.graph["steps"]), "loop_to": a.graph["loop_to"]},
    }


def run(args: argparse.Namespace) -> int:
    check_archive_path(args.archive, "inspect")
    with Archive(args.archive) as a:
        if args.json:
            out = dict(a.index)
            out["tokenizer"] = {k: v for k, v in out["tokenizer"].items() if k != "json"}
            json.dump(out, sys.stdout, indent=1, default=str)
            print()
            return 0
        s = summary(a)
        hp = s["hparams"]
        print(f"{s['file']}: vkpack {s['format'][0]}.{s['format'][1]}, {s['size'] / 1e6:.1f} MB, {s['generator']}")
        print(f"arch {s['arch']}: {hp['n_layers']} layers, hidden {hp['hidden']}, heads {hp['n_heads']}/{hp['n_kv_heads']} "
              f"x {hp['head_dim']}, ffn {hp['ffn']}, vocab {hp['vocab']}, context {hp['context']}, "
              f"rope {hp['rope_mode']} theta {hp['rope_theta']:g}")
        src = s["source"]
        for f in src["files"]:
            print(f"source {src['format']}: {f['name']} {f['size']} bytes sha256 {f['sha256'][:16]}...")
        t = s["tokenizer"]
        print(f"tokenizer: bos {t.get('bos_id')} eos {t.get('eos_ids')} chat template "
              f"{'yes' if t.get('chat_template') else 'no'}")
        pk = s["packs"]
        print(f"packs: {pk['count']} ({', '.join(f'{k} {v}' for k, v in pk['by_kind'].items())}), raw "
              f"{pk['raw_bytes'] / 1e6:.1f} MB, stored {pk['stored_bytes'] / 1e6:.1f} MB "
              f"(ratio {pk['raw_bytes'] / max(pk['stored_bytes'], 1):.3f}), largest {pk['largest_raw'] / 1e6:.1f} MB, "
              f"codecs {pk['codecs']}")
        print(f"tensors: {s['tensors']}; graph: {s['graph']['steps']} steps, next token loops to step {s['graph']['loop_to']}")
        if args.tensors:
            for r in a.tensors.values():
                where = ", ".join(f"pack {q.pack} rows {q.row_start}:{q.row_end}" for q in r.parts)
                print(f"  {r.name:32s} {r.dtype:5s} {list(r.shape)!s:16s} {where}")
        if args.graph:
            for i, st in enumerate(a.graph["steps"]):
                ops = " ".join(o["op"] for o in st["ops"])
                print(f"  {i:4d} {st['name']:14s} packs {st['packs']}: {ops}")
    if args.plan:
        print_plan(args)
    return 0
