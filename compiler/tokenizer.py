"""The archive's tokenizer: a Hugging Face `tokenizer.json` string plus the special ids generation needs.

A GGUF carries no `tokenizer.json`, only llama.cpp's vocabulary keys, so we rebuild one here with
the `tokenizers` library (byte-level BPE for `gpt2`, SentencePiece-style BPE with byte fallback for
`llama`). An HF folder already has one; we only read the special ids around it.

Runtime contract: encode prompts with `add_special_tokens=False` and prepend `bos_id` when
`add_bos`. The json's own post-processor mirrors what HF would do, but the runtime need not use it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..pack_format.errors import SourceError

log = logging.getLogger(__name__)

SUPPORTED_GGUF_MODELS = ("gpt2", "llama")

# gguf.TokenType values (llama.cpp's token attributes as stored in `tokenizer.ggml.token_type`).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts that end a turn when the chat template uses them (llama.cpp treats these as end-of-generation).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
               "<|end_of_text|>", "<|return|>", "<|END_OF_TURN_TOKEN|>")


@dataclass(frozen=True)
class TokenizerInfo:
    json: str                 # a complete HF tokenizer.json (tokenizers.Tokenizer.from_str loads it)
    bos_id: int | None
    eos_id: int | None
    eos_ids: tuple[int, ...]  # every id that ends generation: eos first, then end-of-turn ids
    pad_id: int | None
    unk_id: int | None
    add_bos: bool             # prepend bos_id when encoding a prompt for generation
    chat_template: str | None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the msgpack index (the tuple becomes a list)."""
        d = asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d


# ---- GGUF ----

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> how text is split before BPE, grouped as llama.cpp groups them.
_PRE_KIND = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), "llama3"),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), "qwen2"),
}


def tokenizer_from_gguf(meta: dict[str, Any]) -> TokenizerInfo:
    """Rebuild a HF tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

    Args:
        meta: GGUF key/values as plain Python values (see `compiler.sources.gguf_meta`).
    Returns:
        The tokenizer.json string and special ids.
    Raises:
        SourceError: no tokenizer keys, an unsupported `tokenizer.ggml.model`, or inconsistent arrays.
    Example:
        >>> tokenizer_from_gguf(meta).eos_ids
        (2,)
    """
    _check_gguf_types(meta)
    try:
        return _tokenizer_from_gguf(meta)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"GGUF tokenizer metadata is malformed: {type(e).__name__}: {str(e)[:200]}") from None


# tokenizer key -> (the type of the value, the type of each element for arrays)
_GGUF_TYPES: dict[str, tuple[type | tuple[type, ...], type | tuple[type, ...] | None]] = {
    "tokenizer.ggml.model": (str, None), "tokenizer.ggml.pre": (str, None),
    "tokenizer.ggml.tokens": (list, str), "tokenizer.ggml.token_type": (list, int),
    "tokenizer.ggml.scores": (list, (int, float)), "tokenizer.ggml.merges": (list, str),
    "tokenizer.chat_template": (str, None), "general.name": (str, None),
    "tokenizer.ggml.add_bos_token": (bool, None), "tokenizer.ggml.add_eos_token": (bool, None),
    "tokenizer.ggml.add_space_prefix": (bool, None),
}


def _check_gguf_types(meta: dict[str, Any]) -> None:
    """SourceError naming the first tokenizer key whose value (or an element of it) has the wrong type."""
    for key, (outer, inner) in _GGUF_TYPES.items():
        v = meta.get(key)
        if v is None:
            continue
        if not isinstance(v, outer) or (inner is not None and not all(isinstance(x, inner) for x in v)):
            raise SourceError(f"GGUF key {key}: expected {outer.__name__ if isinstance(outer, type) else outer}"
                              f"{f' of {inner}' if inner else ''}, got {type(v).__name__}")


def _tokenizer_from_gguf(meta: dict[str, Any]) -> TokenizerInfo:
    name = meta.get("general.name", "GGUF")
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None and tokens is None:
        raise SourceError(f"GGUF {name!r} has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens keys)")
    if kind not in SUPPORTED_GGUF_MODELS:
        supported = ", ".join(SUPPORTED_GGUF_MODELS)
        raise SourceError(f"GGUF tokenizer model {kind!r} is not supported (supported: {supported})")
    if not isinstance(tokens, list) or not tokens:
        raise SourceError(f"GGUF {name!r}: tokenizer.ggml.tokens is missing or empty")
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = [BYTE if _is_byte_token(t) else NORMAL for t in tokens]
    if len(types) != len(tokens):
        raise SourceError(f"GGUF {name!r}: {len(types)} token types for {len(tokens)} tokens")

    ids = {k: _special_id(meta, k, len(tokens)) for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    if kind == "llama":
        for k, default in (("bos", 1), ("eos", 2), ("unknown", 0)):  # llama.cpp's SentencePiece defaults
            if ids[k] is None and f"tokenizer.ggml.{k}_token_id" not in meta and default < len(tokens):
                ids[k] = default
    if ids["eos"] is None:  # generation must be able to stop: fall back to a conventional end token
        ids["eos"] = next((i for i, (t, ty) in enumerate(zip(tokens, types))
                           if ty == CONTROL and t in ("<|endoftext|>", "</s>", "<|end_of_text|>")), None)
        log.warning("GGUF %r has no eos_token_id; using %r", name, ids["eos"])
    pre = meta.get("tokenizer.ggml.pre", "default")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp adds BOS by default to SentencePiece and Llama-3 vocabularies
        add_bos = kind == "llama" or _PRE_KIND.get(pre) == "llama3"
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos and ids["bos"] is None:
        log.warning("GGUF %r asks for BOS but has no bos_token_id; not adding one", name)
        add_bos = False

    vocab = _vocab(tokens, types, byte_level=kind == "gpt2")
    if kind == "gpt2":
        tok = _byte_level_bpe(vocab, meta.get("tokenizer.ggml.merges") or [], pre, name)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise SourceError(f"GGUF {name!r}: a 'llama' tokenizer needs one tokenizer.ggml.scores entry per token")
        space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        tok = _sentencepiece_bpe(vocab, tokens, types, scores, unk, space_prefix)
    _add_special(tok, tokens, types)
    tok.post_processor = _post_processor(tok.post_processor, tokens, ids["bos"] if add_bos else None,
                                         ids["eos"] if add_eos else None)

    template = meta.get("tokenizer.chat_template")
    eos_ids = _eos_ids(ids["eos"], [ids["eot"], ids["eom"]], template, tok)
    return TokenizerInfo(tok.to_str(), ids["bos"], ids["eos"], eos_ids, ids["padding"], ids["unknown"],
                         bool(add_bos), template)


def _special_id(meta: dict[str, Any], key: str, n: int) -> int | None:
    v = meta.get(f"tokenizer.ggml.{key}_token_id")
    if v is None:
        return None
    if not isinstance(v, int) or not 0 <= v < n:
        # Some converters write -1 or vocab_size for "none"; that is not worth refusing the model.
        log.warning("tokenizer.ggml.%s_token_id = %r is outside the vocabulary [0, %d); ignored", key, v, n)
        return None
    return v


def _is_byte_token(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">")


def byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stay, the rest move to U+0100.."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _vocab(tokens: list[str], types: list[int], byte_level: bool) -> dict[str, int]:
    """text -> id; first occurrence wins for duplicated texts (the later id just never encodes)."""
    chars = byte_level_chars() if byte_level else []
    alphabet = set(chars)
    vocab: dict[str, int] = {}
    dups = 0
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if byte_level and ty == NORMAL and not set(t) <= alphabet:
            # A normal token outside the byte alphabet was stored as raw text: spell it in bytes.
            t = "".join(chars[b] for b in t.encode("utf-8"))
        if t in vocab:
            dups += 1
            continue
        vocab[t] = i
    if dups:
        log.warning("tokenizer vocabulary has %d duplicated token texts; the later ids never encode", dups)
    return vocab


def _byte_level_bpe(vocab: dict[str, int], merges: list[str], pre: str, name: str) -> Tokenizer:
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or not a or not b or " " in b:
            raise SourceError(f"GGUF {name!r}: merge {m!r} is not two tokens separated by one space")
        pairs.append((a, b))
    kind = _PRE_KIND.get(pre)
    if kind is None:
        log.warning("GGUF %r: unknown tokenizer.ggml.pre %r; splitting text with the GPT-2 regex", name, pre)
        kind = "gpt2"
    try:
        # Llama-3 style vocabularies look a whole pre-token up before merging (HF `ignore_merges`).
        model = models.BPE(vocab, pairs, ignore_merges=kind == "llama3")
    except Exception as e:  # tokenizers raises a plain Exception for merges naming unknown tokens
        raise SourceError(f"GGUF {name!r}: merges do not match the vocabulary ({e})") from None
    tok = Tokenizer(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":  # each digit is its own pre-token, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif kind in ("llama3", "qwen2"):
        split = _LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _sentencepiece_bpe(vocab: dict[str, int], tokens: list[str], types: list[int], scores: list[float],
                       unk: str | None, space_prefix: bool) -> Tokenizer:
    """SentencePiece BPE as HF models it: merges ranked by the merged piece's score, bytes as <0xXX>."""
    mergeable = {t for t, ty in zip(tokens, types) if ty == NORMAL}
    ranked = []
    for t in mergeable:
        i = vocab.get(t)
        if i is None or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in mergeable and b in mergeable:
                # SentencePiece merges the adjacent pair whose result scores highest.
                ranked.append((-scores[i], i, vocab[a], a, b))
    ranked.sort()
    model = models.BPE(vocab, [(a, b) for *_, a, b in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    prepend = "first" if space_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens become special added tokens; user-defined ones (e.g. `<think>`) added
    non-special tokens: both are matched whole in text, but only special ones are skipped on decode."""
    pairs = list(zip(tokens, types))
    special = [AddedToken(t, special=True, normalized=False) for t, ty in pairs if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in pairs if ty == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _post_processor(base: Any, tokens: list[str], bos: int | None, eos: int | None) -> Any:
    """Wrap `base` so that encode(add_special_tokens=True) adds BOS/EOS as HF's Llama files do."""
    if bos is None and eos is None:
        return base
    b = f"{tokens[bos]} " if bos is not None else ""
    e = f" {tokens[eos]}" if eos is not None else ""
    specials = [(tokens[i], i) for i in dict.fromkeys((bos, eos)) if i is not None]
    template = processors.TemplateProcessing(single=f"{b}$A{e}", pair=f"{b}$A{e} {b}$B:1{e}", special_tokens=specials)
    return processors.Sequence([base, template]) if base is not None else template


def _eos_ids(eos: int | None, extra: list[int | None], template: str | None, tok: Tokenizer) -> tuple[int, ...]:
    """eos, then the file's eot/eom ids, then end-of-turn tokens the chat template writes."""
    out = [i for i in [eos, *extra] if i is not None]
    for text in END_OF_TURN:
        i = tok.token_to_id(text)
        if template and text in template and i is not None:
            out.append(i)
    return tuple(dict.fromkeys(out))


# ---- Hugging Face folder ----

def tokenizer_from_hf_folder(folder: Path) -> TokenizerInfo:
    """Read `tokenizer.json`, `tokenizer_config.json` and, if present, `generation_config.json`.

    Args:
        folder: a model folder as saved by `save_pretrained`.
    Returns:
        The tokenizer.json text unchanged, plus special ids from the configs.
    Raises:
        SourceError: `tokenizer.json` is missing or does not load, or a config is not a JSON object.
    Example:
        >>> tokenizer_from_hf_folder(Path("SmolLM2-135M-Instruct")).bos_id
        1
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise SourceError(f"{folder}: no tokenizer.json (vkpack needs the fast-tokenizer file)")
    text = _read_text(path)
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise SourceError(f"{path}: does not load as a tokenizer ({str(e)[:200]})") from None
    cfg = _json_object(folder / "tokenizer_config.json")
    gen = _json_object(folder / "generation_config.json")

    def token_id(key: str) -> int | None:
        v = cfg.get(key)
        text = v.get("content") if isinstance(v, dict) else v
        return tok.token_to_id(text) if isinstance(text, str) else None

    bos, eos, pad, unk = (token_id(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token"))
    if bos is None and isinstance(gen.get("bos_token_id"), int):
        bos = gen["bos_token_id"]
    if pad is None and isinstance(gen.get("pad_token_id"), int):
        pad = gen["pad_token_id"]
    gen_eos = gen.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]
    if eos is None and gen_eos:
        eos = gen_eos[0]

    add_bos = cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):  # not stated: see whether the file's post-processor adds it
        ids = tok.encode("a").ids
        add_bos = bos is not None and bool(ids) and ids[0] == bos
    template = _chat_template(folder, cfg)
    n = tok.get_vocab_size(with_added_tokens=True)
    bos, eos, pad, unk = (_own_id(i, k, n, folder) for i, k in ((bos, "bos"), (eos, "eos"), (pad, "pad"), (unk, "unk")))
    gen_eos = [i for i in gen_eos if _own_id(i, "eos", n, folder) is not None]
    eos_ids = _eos_ids(eos, gen_eos, template, tok)
    return TokenizerInfo(text, bos, eos, eos_ids, pad, unk, add_bos, template)


def _own_id(i: int | None, key: str, n: int, folder: Path) -> int | None:
    """A special id from the configs, or None (with a warning) when it names no token of the tokenizer:
    the tokenizers library raises OverflowError on ids of 2^32 and more, and the embedding has no such row."""
    if i is None or 0 <= i < n:
        return i
    log.warning("%s: %s token id %d is outside the tokenizer's %d tokens; ignored", folder, key, i, n)
    return None


def _read_text(path: Path) -> str:
    from .sources.base import MAX_JSON_BYTES, open_source_file

    with open_source_file(path) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise SourceError(f"{path}: larger than {MAX_JSON_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_object(path: Path) -> dict[str, Any]:
    from .sources.base import load_json

    if not path.exists():
        return {}
    v = load_json(path)
    if not isinstance(v, dict):
        raise SourceError(f"{path}: not a JSON object")
    return v


def _chat_template(folder: Path, cfg: dict[str, Any]) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default", next(iter(named.values()), None))
    if isinstance(t, str):
        return t
    jinja = folder / "chat_template.jinja"  # newer save_pretrained writes the template beside the config
    return _read_text(jinja) if jinja.exists() else None
