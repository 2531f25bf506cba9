"""The `vkpack` command: dispatches to one small module per subcommand (`add_parser(sub)`, `run(args)`).

Subcommands: build (vkpack.compiler.cmd_build), inspect, verify, run, serve (this package);
engine settings (flags, env, INI) live in config.py, the default model in default_model.py.

Errors from outside (bad files, bad flags) print one line and exit non-zero; `--verbose`
shows the traceback. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ... import __version__
from ...pack_format.errors import VkpackError

COMMANDS = {
    "build": "vkpack.compiler.cmd_build",
    "inspect": "vkpack.runtime.cli.inspect",
    "verify": "vkpack.runtime.cli.verify",
    "run": "vkpack.runtime.cli.run",
    "serve": "vkpack.runtime.cli.serve",
}
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vkpack", description="Compile LLMs into pack archives and run them under memory budgets.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vkpack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # a subcommand not present in this build
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
        if not any(a.dest == "verbose" for a in p._actions):
            p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `vkpack inspect x | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("vkpack: interrupted", file=sys.stderr)
        return 130
    except (VkpackError, ValueError, OSError) as e:
        if verbose:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"vkpack {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else EXIT_BAD_INPUT
