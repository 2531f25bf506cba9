"""The `vkpack` command: dispatches to one small module per subcommand (`add_parser(sub)`, `run(args)`).

Subcommands: build (vkpack.compiler.cmd_build, its output checked first by build.py), inspect, verify,
run, serve (this package); engine settings (flags, env, INI) live in config.py, the default model in
default_model.py. `--help` shows each default once (DefaultsOnce).

Errors from outside (bad files, bad flags) print one line and exit non-zero; `--verbose`
shows the traceback. Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Iterator

from ... import __version__
from ...pack_format.errors import VkpackError

COMMANDS = {
    "build": "vkpack.runtime.cli.build",
    "inspect": "vkpack.runtime.cli.inspect",
    "verify": "vkpack.runtime.cli.verify",
    "run": "vkpack.runtime.cli.run",
    "serve": "vkpack.runtime.cli.serve",
}
EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, systemd, `docker stop`), raised in the main thread like Ctrl-C's
    KeyboardInterrupt, so that every `with` block (the archive writer's `.partial` file) cleans up."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated in the main thread (the previous handler comes back after)."""
    def on_term(signum: int, frame: object) -> None:
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" where a flag has a real default its help does not already state; a None
    default (settings resolved later from the config file and env) is described in the help text itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "(default" in text.lower() or d is None or d is argparse.SUPPRESS or d is False or d == [] \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vkpack", description="Compile LLMs into pack archives and run them under memory budgets.",
                                     formatter_class=DefaultsOnce)
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
        p.formatter_class = DefaultsOnce  # whatever the module asked for: every subcommand's help alike
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
        with sigterm_raises():
            return int(args._run(args) or 0)
    except BrokenPipeError:  # `vkpack inspect x | head`
        sys.stderr.close()
        return EXIT_OK
    except Terminated:
        print("vkpack: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("vkpack: interrupted", file=sys.stderr)
        return 130
    except (VkpackError, ValueError, OSError, MemoryError) as e:
        if verbose:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, MemoryError):  # a last resort: sizes are checked before allocating wherever they are known
            msg = f"out of memory{': ' + msg if str(e) else ''}"
        print(f"vkpack {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(e, (OSError, MemoryError)) and not isinstance(e, FileNotFoundError) \
            else EXIT_BAD_INPUT
