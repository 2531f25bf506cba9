#!/usr/bin/env python3
"""Compile shaders/*.comp into the committed shaders/*.spv (one file per entry of shaders/variants.py).

    python tools/build_shaders.py            # rebuild stale variants
    python tools/build_shaders.py --force    # rebuild all
    python tools/build_shaders.py --check    # exit 1 if any .spv is missing or older than its inputs (CI)

Needs glslc (Debian package `glslc`). Flags: --target-env=vulkan1.2 -O.
"""

from __future__ import annotations

import argparse
import sys

from vkpack.runtime.vk import spirv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild every variant")
    ap.add_argument("--check", action="store_true", help="only report stale variants; exit 1 if any")
    ap.add_argument("names", nargs="*", help="variants to build (default: all)")
    args = ap.parse_args(argv)
    table = spirv.variants()
    names = args.names or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown variants: {', '.join(unknown)}", file=sys.stderr)
        return 2
    stale = [n for n in names if spirv.is_stale(n)]
    if args.check:
        for n in stale:
            print(f"stale: {n}", file=sys.stderr)
        return 1 if stale else 0
    if spirv.glslc_path() is None:
        print("glslc not found (apt-get install glslc)", file=sys.stderr)
        return 1
    todo = names if args.force else stale
    for n in todo:
        spirv.compile_variant(n)
        print(f"built {spirv.spv_path(n).name}", file=sys.stderr)
    print(f"{len(todo)} built, {len(names) - len(todo)} up to date", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
