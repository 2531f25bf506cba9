"""`vkpack build INPUT [-o OUT] [--codec C] [--max-pack-mb N] [--threads N] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys

from .build import DEFAULT_MAX_PACK_MB, build
from .codecs import CHOICES


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("build", help="compile a GGUF / safetensors / HF folder into a .vkpack archive",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", help="model.gguf, model.safetensors, model.safetensors.index.json or an HF model folder")
    p.add_argument("-o", "--output", help="archive path (default: INPUT's name with .vkpack)")
    p.add_argument("--codec", choices=CHOICES, default="auto", help="lossless codec for every pack")
    p.add_argument("--max-pack-mb", type=float, default=DEFAULT_MAX_PACK_MB, help="largest pack, in MiB (1-128)")
    p.add_argument("--threads", type=int, default=None, help="compression threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


def run(args: argparse.Namespace) -> int:
    stats = build(args.input, args.output, codec=args.codec, max_pack_mb=args.max_pack_mb, threads=args.threads,
                  progress=False if args.no_progress or args.json else None)
    from .build import default_output
    from pathlib import Path

    summary = stats.as_dict(Path(args.output) if args.output else default_output(Path(args.input)))
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print(f"wrote {summary['output']}: {summary['packs']} packs, {summary['tensors']} tensors, "
              f"raw {summary['raw_bytes'] / 1e6:.1f} MB -> stored {summary['stored_bytes'] / 1e6:.1f} MB "
              f"(ratio {summary['ratio']:.3f}) in {summary['seconds']:.2f} s ({summary['mb_per_s']:.0f} MB/s of source)")
    return 0
