"""`vkpack run MODEL.vkpack -p PROMPT`: stream a completion to stdout, a speed line to stderr."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import add_settings_flags, settings_from_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="generate text from an archive under memory budgets")
    p.add_argument("archive", nargs="?", default=None, help="the .vkpack archive (default: [model] path in the config, else SmolLM2-135M-Instruct, fetched and built on first use)")
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the archive's chat template")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="default 40; 0 disables")
    p.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    p.add_argument("--min-p", type=float, default=0.05, help="default 0.05")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="default 1.0 (off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same output)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_settings_flags(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine

    s = settings_from_args(args)
    if s.log_file:
        logging.getLogger().addHandler(logging.FileHandler(s.log_file))
    logging.getLogger().setLevel(s.effective_log_level)
    path = args.archive or s.model
    if not path:
        from .default_model import default_archive

        path = default_archive()
    with Engine(path, **s.engine_kwargs()) as eng:
        prompt = args.prompt
        if args.chat:
            prompt = eng.apply_chat_template([{"role": "user", "content": prompt}])
        for piece in eng.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                                seed=args.seed, stop=args.stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        st = eng.stats()
        print(f"[vkpack] prompt {st['prompt_tokens']} tok at {st['prefill_tps']:.1f} tok/s, generated "
              f"{st['generated_tokens'] + 1 if eng.last_ids else 0} tok at {st['decode_tps']:.2f} tok/s; device peak "
              f"{st['peak_device_bytes'] / 2**20:.0f}/{st['device_budget'] / 2**20:.0f} MiB, read "
              f"{st['bytes_read'] / 1e6:.0f} MB, prefetch hit rate {st['prefetch_hit_rate']:.0%}, stall "
              f"{st['stall_seconds']:.2f} s", file=sys.stderr)
        if s.verbose:
            for k, v in st.items():
                print(f"[vkpack]   {k} = {v}", file=sys.stderr)
            for line in eng.backend.placement().get("lines", []):  # a hybrid backend's rates and plans
                print(f"[vkpack]   {line}", file=sys.stderr)
    return 0
