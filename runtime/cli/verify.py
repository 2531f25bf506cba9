"""`vkpack verify FILE [--json]`: check the index and every pack's checksums; exit 1 naming bad packs."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ...pack_format.reader import Archive
from .paths import check_archive_path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("verify", help="check every checksum of an archive")
    p.add_argument("archive")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    check_archive_path(args.archive, "verify")
    t0 = time.perf_counter()
    with Archive(args.archive) as a:
        bad = a.verify()
        total = a.size
        n = len(a.packs)
    dt = time.perf_counter() - t0
    result = {"file": args.archive, "ok": not bad, "packs": n, "bad_packs": [b for b, _ in bad],
              "errors": [m for _, m in bad], "bytes": total, "seconds": round(dt, 3),
              "gb_per_s": round(total / 1e9 / max(dt, 1e-9), 2)}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    elif bad:
        for _, m in bad:
            print(f"BAD {m}", file=sys.stderr)
        print(f"{args.archive}: {len(bad)} of {n} packs are corrupt: {', '.join(str(b) for b, _ in bad)}")
    else:
        print(f"{args.archive}: OK, {n} packs verified ({total / 1e6:.1f} MB in {dt:.2f} s)")
    return 1 if bad else 0
