"""Hugging Face transformers as the independent reference for correctness tests.

transformers reads the same GGUF we compile (dequantizing it to float32 on the CPU), so its
tokens, logits and greedy continuations are what vkpack must reproduce. Needs `torch` (CPU build)
and `transformers` with GGUF support; loading SmolLM2-135M takes a few seconds, so it is cached.

Usage: `python tools/hf_reference.py MODEL.gguf "prompt" [N]` prints the prompt ids and N greedy ids.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np


def load_hf_gguf(path: str | Path) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` from a GGUF with transformers: float32, CPU, eval mode.

    Cached per resolved path, so tests can call it freely.

    Args:
        path: the GGUF file.
    Returns:
        `(AutoModelForCausalLM, AutoTokenizer)` instances.
    Example:
        >>> model, tok = load_hf_gguf(smollm2_gguf())
        >>> tok.encode("hi")
        [6004]
    """
    return _load(str(Path(path).resolve()))


@functools.lru_cache(maxsize=2)
def _load(path: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(path).parent), Path(path).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.to("cpu").eval()
    return model, tok


def hf_logits(model: Any, token_ids: list[int]) -> np.ndarray:
    """Logits at every position for one sequence, shape (len(token_ids), n_vocab), float32."""
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32).numpy().copy()


def hf_greedy(model: Any, token_ids: list[int], n: int) -> list[int]:
    """The next `n` argmax tokens after `token_ids` (only the new ones; EOS does not stop it).

    A plain loop over the KV cache instead of `generate()`, so the count is always `n` and no
    generation-config processor (repetition penalty, EOS suppression) changes the argmax.
    """
    import inspect

    import torch

    # transformers 5.x renamed the KV-cache argument and output from `past_key_values` to `cache`.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    out: list[int] = []
    past = None
    with torch.inference_mode():
        for _ in range(n):
            res = model(ids, use_cache=True, **{key: past})
            past = getattr(res, key)
            nxt = int(torch.argmax(res.logits[0, -1]))
            out.append(nxt)
            ids = torch.tensor([[nxt]], dtype=torch.long)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        sys.stderr.write(__doc__.split("Usage: ")[1])
        return 2
    model, tok = load_hf_gguf(argv[0])
    ids = tok.encode(argv[1])
    n = int(argv[2]) if len(argv) > 2 else 16
    new = hf_greedy(model, ids, n)
    print("prompt:", ids)
    print("greedy:", new)
    print(repr(tok.decode(new)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
