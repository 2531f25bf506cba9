"""`vkpack build`: the compiler's own command (vkpack.compiler.cmd_build), with its output checked first,
so that `-o FOLDER` or an unwritable place is one error before minutes of compiling, not after."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...compiler import cmd_build
from ...compiler.build import default_output
from .paths import check_build_output


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return cmd_build.add_parser(sub)


def run(args: argparse.Namespace) -> int:
    check_build_output(Path(args.output) if args.output else default_output(Path(args.input)))
    return cmd_build.run(args)
