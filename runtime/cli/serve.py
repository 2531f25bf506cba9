"""`vkpack serve [MODEL.vkpack]`: an OpenAI-compatible server with continuous batching (docs/SERVER.md)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from ...pack_format.errors import VkpackError
from .config import add_settings_flags, settings_from_args
from .paths import check_archive_path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve an archive over an OpenAI-compatible HTTP API",
                       description="Serve an archive over an OpenAI-compatible HTTP API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /props, /health, "
                                   "/metrics) with continuous batching. Requests that leave sampling fields out get "
                                   "the defaults `vkpack run` uses (docs/SERVER.md).")
    p.add_argument("archive", nargs="?", default=None,
                   help="the .vkpack archive (default: [model] path in the config, else SmolLM2-135M-Instruct, "
                        "fetched and built on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback without an API key prints a warning")
    p.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="read the API key from the first line of FILE (keeps it out of the process list)")
    p.add_argument("--model-name", default=None, help="the model id clients send and /v1/models lists "
                                                      "(default: the archive's file name without .vkpack)")
    # dest max_batch/context: resolved with the config file and VKPACK_* env like the engine settings
    p.add_argument("--max-batch", dest="max_batch", default=None, metavar="N",
                   help="most sequences decoded together (default 8; env VKPACK_MAX_BATCH, config [model] max_batch)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a batch slot before new ones get 503")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="generation cap for requests that set no max_tokens")
    p.add_argument("--context", dest="context", default=None, metavar="N",
                   help="longest prompt + generation per request (default: the model's, at most 4096; "
                        "env VKPACK_CONTEXT, config [model] context)")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="most prompt tokens prefilled per batch step, so long prompts do not stall "
                        "running streams")
    p.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompt blocks a running or recently finished request holds, so a "
                        "shared system prompt is prefilled once (finished requests' caches are kept only while "
                        "the device budget has room; default: on)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. http://localhost:3000, or * for any) call the API: "
                        "answers preflight OPTIONS and sends Access-Control-Allow-Origin; repeatable; none by default")
    add_settings_flags(p)
    return p


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key and args.api_key_file:
        raise VkpackError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as e:
            raise VkpackError(f"--api-key-file {args.api_key_file}: cannot read a key: {e}") from None
        if not key:
            raise VkpackError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return key
    return args.api_key or None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..engine import Engine
    from ..server.app import create_app
    from ..server.runner import bind_socket

    for origin in args.cors_origin:
        if origin != "*" and not (origin.startswith(("http://", "https://")) and origin.count("/") == 2):
            raise VkpackError(f"--cors-origin {origin!r}: expected * or scheme://host[:port], e.g. http://localhost:3000")
    for name in ("max_queue", "max_tokens", "prefill_chunk"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise VkpackError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= "
                              f"{0 if name == 'max_queue' else 1}")
    if not 0 <= args.port <= 65535:
        raise VkpackError(f"--port {args.port}: must be 0..65535")
    s = settings_from_args(args)
    if s.log_file:
        logging.getLogger().addHandler(logging.FileHandler(s.log_file))
    logging.getLogger().setLevel(s.effective_log_level)
    key = _api_key(args)
    # Bind before loading so that a taken port fails at once; clients are refused until we listen.
    sock = bind_socket(args.host, args.port)
    try:
        path = args.archive or s.model
        if not path:
            from .default_model import default_archive

            path = default_archive()
        check_archive_path(path, "serve")
        name = args.model_name or Path(path).name.removesuffix(".vkpack")
        with Engine(path, **s.engine_kwargs()) as eng:
            app = create_app(eng, model_name=name, api_key=key, max_batch=s.max_batch, max_queue=args.max_queue,
                             default_max_tokens=args.max_tokens, prefill_chunk=args.prefill_chunk,
                             cors_origins=args.cors_origin, prefix_cache=args.prefix_cache)
            sock.listen(2048)  # connections queue from now on, so the banner below is true when printed
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"vkpack serve: {name} on http://{shown}:{port}/v1 (max batch {s.max_batch}, queue "
                  f"{args.max_queue}, context {eng.context}, device budget {eng.tier.budget / 2**20:.0f} MiB"
                  f"{', API key required' if key else ''})", file=sys.stderr, flush=True)
            if not key and not _is_loopback(args.host):
                print(f"vkpack serve: warning: listening on {args.host} without --api-key: anyone who can "
                      "reach this port can use the model", file=sys.stderr, flush=True)
            config = uvicorn.Config(app, log_level="info" if s.verbose else "warning", access_log=s.verbose,
                                    lifespan="on", timeout_graceful_shutdown=5)
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
