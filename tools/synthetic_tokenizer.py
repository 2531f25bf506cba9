"""The synthetic models' tokenizer: a small byte-level BPE learned from a fixed text, with ChatML specials.

Every vocabulary size gives the same first tokens (the specials, then the 256 byte symbols) and merges
learned from CORPUS until the size is reached, so the same size always gives the same tokenizer.
"""

from __future__ import annotations

import itertools
from collections import Counter
from functools import lru_cache

from vkpack.compiler.tokenizer import byte_level_chars

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = len(SPECIALS) + 256
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Merges are learned from this text, so common English words become single tokens.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A model that is larger than the memory of the
graphics card can still run when its weights are streamed in packs, one layer at a time, while
the previous layer is being computed. The compiler reads the weights once, writes them into an
archive, and records the order in which the runtime will need them. The runtime then reads the
archive in that order and keeps only a small window of layers on the device. Hello, world!
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Please write a short story about a robot who learns to paint. Once upon a time there was a robot
named Pixel who lived in a quiet town by the sea. Every morning the robot would watch the sunrise
and wonder how the colors came to be. One day the robot found an old box of paints in the attic.
def add(a, b):
    return a + b
for i in range(10):
    print(i, i * i)
Numbers like 1, 2, 3, 42, 100 and 2024 appear in text, and so do symbols such as #, $, %, & and @.
The end of the story is near, but the story of the model has just begun, and there is more to come.
"""


def byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols in byte order (the GPT-2 byte-to-unicode table the compiler uses)."""
    return byte_level_chars()


def _learn_merges(limit: int) -> list[tuple[str, str]]:
    """Plain BPE on CORPUS: merge the most frequent pair (ties: smallest pair) until pairs repeat no more."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts = Counter(piece for piece, _ in pre.pre_tokenize_str(CORPUS))
    words = [(list(w), c) for w, c in sorted(counts.items())]
    merges: list[tuple[str, str]] = []
    while len(merges) < limit:
        pairs: Counter[tuple[str, str]] = Counter()
        for syms, c in words:
            for pair in itertools.pairwise(syms):
                pairs[pair] += c
        if not pairs:
            break
        best, n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < 2:
            break
        merges.append(best)
        for syms, _ in words:
            i = 0
            while i < len(syms) - 1:
                if (syms[i], syms[i + 1]) == best:
                    syms[i:i + 2] = [syms[i] + syms[i + 1]]
                i += 1
    return merges


@lru_cache(maxsize=8)
def build_vocab(vocab: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Return (tokens by id, merges) of a byte-level BPE with exactly `vocab` tokens.

    Ids 0-2 are SPECIALS, 3-258 the byte symbols, then merge results: first ones
    learned from CORPUS, then made-up (token + byte) merges until `vocab` is reached.
    """
    if vocab < MIN_VOCAB:
        raise ValueError(f"vocab {vocab} < {MIN_VOCAB}")
    syms = byte_symbols()
    tokens = [*SPECIALS, *syms]
    seen = set(tokens)
    merges = _learn_merges(vocab - len(tokens))
    for a, b in merges:
        tokens.append(a + b)
        seen.add(a + b)
    base = len(SPECIALS)
    while len(tokens) < vocab:  # deterministic padding: extend tokens[base], tokens[base+1], ...
        head = tokens[base]
        for s in syms:
            if len(tokens) >= vocab:
                break
            if head + s not in seen:
                merges.append((head, s))
                tokens.append(head + s)
                seen.add(head + s)
        base += 1
    return tuple(tokens), tuple(merges)


def hf_tokenizer_json(vocab: int) -> str:
    """Serialized HF `tokenizers` byte-level BPE over build_vocab(vocab)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, merges = build_vocab(vocab)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok.to_str(pretty=True)
