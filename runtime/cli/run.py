"""`vkpack run MODEL.vkpack -p PROMPT`: stream a completion to stdout, a speed line to stderr; `-i` chats.

The prompt comes from `-p TEXT`, `-f FILE`, or stdin (`-p -`, or stdin not a terminal and no -p).
`-i` keeps a conversation through the archive's chat template: Ctrl-C stops the reply being written
(at its next piece of text, so the engine is never left mid-pass) and returns to the prompt; a second
Ctrl-C, Ctrl-D or /exit quits. Sampling defaults are `sampler.DEFAULT_PARAMS`, the ones `vkpack serve` uses.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

from ...pack_format.errors import VkpackError
from ..sampler import DEFAULT_PARAMS
from .config import add_settings_flags, settings_from_args
from .paths import check_archive_path

EXIT_WORDS = ("/exit", "/quit", "/bye")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = DEFAULT_PARAMS
    p = sub.add_parser("run", help="generate text from an archive under memory budgets",
                       description="Generate text from an archive: one prompt (-p, -f, or stdin) or a chat (-i).")
    p.add_argument("archive", nargs="?", default=None, help="the .vkpack archive (default: [model] path in the config, else SmolLM2-135M-Instruct, fetched and built on first use)")
    p.add_argument("-p", "--prompt", default=None, help="prompt text; '-' reads it from stdin (as does a piped stdin "
                                                        "without -p)")
    p.add_argument("-f", "--file", default=None, metavar="FILE", help="read the prompt from FILE")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="chat: history kept, the chat template applied; Ctrl-C stops a reply, Ctrl-D or /exit quits "
                        "(-p/-f give the first message)")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message (implies --chat)")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (per reply with -i)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the archive's chat template")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 disables")
    p.add_argument("--top-p", type=float, default=d.top_p, help="1 disables")
    p.add_argument("--min-p", type=float, default=d.min_p, help="0 disables")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, help="1 disables")
    p.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n, help="tokens the penalty looks back; -1 all")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same output; default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    add_settings_flags(p)
    return p


def read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt from -p, -f or stdin; None when there is none (only allowed with -i)."""
    if args.prompt is not None and args.file is not None:
        raise VkpackError("give -p or -f, not both")
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise VkpackError(f"-f {args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif args.prompt == "-" or (args.prompt is None and not args.interactive and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif args.prompt is not None:
        return args.prompt
    else:
        if args.interactive:
            return None
        raise VkpackError("no prompt: give -p PROMPT, -f FILE, pipe it on stdin, or chat with -i")
    text = text.removesuffix("\n").removesuffix("\r")  # the newline every file and `echo` ends with
    if not text:
        raise VkpackError(f"the prompt from {'-f ' + args.file if args.file else 'stdin'} is empty")
    return text


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repeat_penalty": args.repeat_penalty, "repeat_last_n": args.repeat_last_n,
            "seed": args.seed, "stop": args.stop, "ignore_eos": args.ignore_eos}


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine

    if args.max_tokens < 1:
        raise VkpackError(f"-n {args.max_tokens}: must be >= 1")
    prompt = read_prompt(args)  # before loading: a missing prompt costs nothing
    s = settings_from_args(args)
    if s.log_file:
        logging.getLogger().addHandler(logging.FileHandler(s.log_file))
    logging.getLogger().setLevel(s.effective_log_level)
    path = args.archive or s.model
    if not path:
        from .default_model import default_archive

        path = default_archive()
    check_archive_path(path, "run")
    with Engine(path, **s.engine_kwargs()) as eng:
        if args.interactive:
            return chat_loop(eng, args, prompt, verbose=s.verbose)
        if args.chat or args.system is not None:
            prompt = eng.apply_chat_template(_system(args) + [{"role": "user", "content": prompt}])
        for piece in eng.stream(prompt, **_sampling(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _print_stats(eng, verbose=s.verbose)
    return 0


def _system(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system is not None else []


def _print_stats(eng: Any, verbose: bool) -> None:
    st = eng.stats()
    print(f"[vkpack] prompt {st['prompt_tokens']} tok at {st['prefill_tps']:.1f} tok/s, generated "
          f"{st['generated_tokens'] + 1 if eng.last_ids else 0} tok at {st['decode_tps']:.2f} tok/s; device peak "
          f"{st['peak_device_bytes'] / 2**20:.0f}/{st['device_budget'] / 2**20:.0f} MiB, read "
          f"{st['bytes_read'] / 1e6:.0f} MB, prefetch hit rate {st['prefetch_hit_rate']:.0%}, stall "
          f"{st['stall_seconds']:.2f} s", file=sys.stderr)
    if verbose:
        for k, v in st.items():
            print(f"[vkpack]   {k} = {v}", file=sys.stderr)
        for line in eng.backend.placement().get("lines", []):  # a hybrid backend's rates and plans
            print(f"[vkpack]   {line}", file=sys.stderr)


# ---- interactive chat ----


class _StopOnInterrupt:
    """While inside, the first Ctrl-C only sets `stopped` (the reply ends at its next piece of text, so no
    pass is cut in half); a second one raises KeyboardInterrupt as usual, which quits."""

    def __init__(self) -> None:
        self.stopped = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: object) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True

    def __enter__(self) -> _StopOnInterrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C keeps its usual meaning
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _read_line(tty: bool) -> str | None:
    """The next user message; None at end of input (Ctrl-D)."""
    try:
        return input("> ") if tty else input()
    except EOFError:
        return None


def _fit(eng: Any, messages: list[dict[str, str]], first: int) -> list[int]:
    """The conversation's prompt ids, dropping the oldest turns (never the system message nor the
    newest one) until it leaves room in the context for at least one generated token."""
    while True:
        ids = eng.encode(eng.apply_chat_template(messages))
        if len(ids) < eng.context or len(messages) - first <= 1:
            return ids
        del messages[first:first + 2]  # the oldest user message and its reply
        print("[vkpack] dropped the oldest turn to fit the context", file=sys.stderr)


def chat_loop(eng: Any, args: argparse.Namespace, first_message: str | None, verbose: bool = False) -> int:
    """Read a message, answer it with the whole conversation as the prompt, repeat until Ctrl-D or /exit."""
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("[vkpack] chat: Ctrl-C stops a reply, Ctrl-D or /exit quits", file=sys.stderr)
    messages = _system(args)
    first = len(messages)
    pending = first_message
    while True:
        if pending is None:
            try:
                pending = _read_line(tty)
            except KeyboardInterrupt:  # at the prompt, as Ollama does: say how to leave, keep going
                print("\n[vkpack] Ctrl-D or /exit quits", file=sys.stderr)
                continue
            if pending is None or pending.strip() in EXIT_WORDS:
                if tty and pending is None:
                    print(file=sys.stderr)
                return 0
            if not pending.strip():
                pending = None
                continue
        messages.append({"role": "user", "content": pending})
        pending = None
        try:
            ids = _fit(eng, messages, first)
        except VkpackError as e:  # a template that refuses the conversation: say so, let the user go on
            print(f"[vkpack] error: {str(e).splitlines()[0]}", file=sys.stderr)
            messages.pop()
            continue
        if len(ids) >= eng.context:
            print(f"[vkpack] error: the message needs {len(ids)} tokens; the context holds {eng.context}",
                  file=sys.stderr)
            messages.pop()
            continue
        reply = _reply(eng, ids, args)
        messages.append({"role": "assistant", "content": reply})
        if verbose:
            _print_stats(eng, verbose=False)


def _reply(eng: Any, ids: list[int], args: argparse.Namespace) -> str:
    """Stream one reply to stdout; Ctrl-C ends it early (what was written stays in the history)."""
    parts: list[str] = []
    with _StopOnInterrupt() as stop:
        pieces: Iterator[str] = eng.stream(ids, **_sampling(args))
        try:
            for piece in pieces:
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
                if stop.stopped:
                    break
        finally:
            pieces.close()  # releases the reply's KV cache now
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stop.stopped:
        print("[vkpack] stopped", file=sys.stderr)
    return "".join(parts)
