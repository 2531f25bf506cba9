"""Grammar-constrained decoding: a request's JSON schema or grammar as a token mask per sampling step.

Library: llguidance (what llama.cpp and vLLM use). Measured on SmolLM2's tokenizer (49152 tokens),
this VM (2 cores), replaying a 51-token JSON document against a 6-property nested schema, and an
any-object grammar (`json_object`); microseconds per token, two runs each (the first mask of a
matcher builds its lexer lazily, so it is reported apart):

    library        schema compile  first mask  mask mean  mask p99  consume | json_object mask mean
    llguidance           1.1 ms    0.13-1.9 ms   35-49 us   150-180 us  8-11 us |  25 us
    xgrammar 0.2.9      10 ms      0.02-0.09 ms    7 us      17-22 us    2 us   |   7 us
    outlines-core 0.2  130-160 ms   0.05 ms      56-81 us  150-190 us  0.3 us   |  (regex only: none)

A SmolLM2 decode step takes about 23 ms on the native CPU backend here, so any of the three costs
under 1% per token; what differs is the rest. llguidance compiles a new schema in about 1 ms (every
request brings its own; outlines-core builds a full vocabulary index, 130+ ms), takes GBNF (llama.cpp's
`grammar` field) and Lark as well as JSON schemas (outlines-core: regular expressions only), refuses a
bad schema with a message, bounds its own work per step (LLParserLimits: hostile grammars), releases the
GIL while it computes a mask, and is one 3 MB wheel with no dependencies; xgrammar requires torch,
transformers and triton. Applying the mask to a float32 vector (below, branch-free) costs about 40 us.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..pack_format.errors import VkpackError

MAX_GRAMMAR_CHARS = 1 << 17       # a schema or grammar larger than this (128 Ki characters) is refused
# JSON whitespace between tokens, bounded: unbounded whitespace lets a small model loop on newlines
# until max_tokens (llama.cpp's JSON grammars bound it the same way).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,20}"


class ConstraintError(VkpackError, ValueError):
    """A schema or grammar that cannot constrain decoding; `param` names the request field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    """An llguidance grammar (its JSON text) and the request field it came from, for error messages."""

    grammar: str
    param: str


# ---- request fields -> grammar ----


def json_schema_grammar(schema: Any, param: str, strict: bool = False) -> GrammarSpec:
    """A JSON schema (a dict, or True for any JSON value). `strict` refuses keywords llguidance does
    not implement (OpenAI's strict mode promises the schema is followed); otherwise they are ignored."""
    import llguidance

    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"'{param}' must be a JSON schema object", param)
    try:
        size, text = len(json.dumps(schema)), json.dumps(closed_objects(schema))
    except RecursionError:
        raise ConstraintError(f"'{param}' is nested too deeply", param) from None
    if size > MAX_GRAMMAR_CHARS:
        raise ConstraintError(f"'{param}' is {size} characters; at most {MAX_GRAMMAR_CHARS}", param)
    options = {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict}
    try:
        return GrammarSpec(llguidance.LLMatcher.grammar_from_json_schema(text, overrides=options), param)
    except ValueError as e:
        raise ConstraintError(f"'{param}': {_one_line(e)}", param) from None


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_ONE = ("items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else")


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` in which an object schema that lists `properties` and says nothing about other keys
    allows no others, as llama.cpp's converter and xgrammar's strict mode (vLLM's default) read it: a small
    model otherwise invents keys. `additionalProperties: true` keeps them open; schemas combined through
    `allOf` or `$ref` are left as they are (closing one part would refuse the other parts' keys)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, v in schema.items():
        if key in _SCHEMA_MAPS and isinstance(v, dict):
            out[key] = {name: closed_objects(sub) for name, sub in v.items()}
        elif key in _SCHEMA_LISTS and isinstance(v, list):
            out[key] = [closed_objects(sub) for sub in v]
        elif key in _SCHEMA_ONE:
            out[key] = closed_objects(v)
        else:
            out[key] = v
    if "properties" in out and not any(k in out for k in ("additionalProperties", "patternProperties",
                                                            "unevaluatedProperties", "allOf", "$ref")):
        out["additionalProperties"] = False
    return out


def gbnf_grammar(text: Any, param: str = "grammar") -> GrammarSpec:
    """llama.cpp's `grammar` field: GBNF, or Lark when it starts with `%llguidance` or a `start:` rule
    (llama.cpp's own convention for llguidance grammars)."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    if not isinstance(text, str) or not text.strip():
        raise ConstraintError(f"'{param}' must be a non-empty string (a GBNF grammar)", param)
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ConstraintError(f"'{param}' is {len(text)} characters; at most {MAX_GRAMMAR_CHARS}", param)
    try:
        lark = any_to_lark(text)
    except RecursionError:
        raise ConstraintError(f"'{param}': the grammar is nested too deeply", param) from None
    except Exception as e:  # the converter raises plain Exception for a missing rule
        raise ConstraintError(f"'{param}' is not a valid GBNF grammar: {_one_line(e)}", param) from None
    return GrammarSpec(llguidance.LLMatcher.grammar_from_lark(lark), param)


def lark_grammar(text: str, param: str) -> GrammarSpec:
    """A Lark grammar we built ourselves (tool calls); still checked when compiled."""
    import llguidance

    return GrammarSpec(llguidance.LLMatcher.grammar_from_lark(text), param)


def grammar_from_request(body: dict[str, Any]) -> GrammarSpec | None:
    """The constraint a request asks for, or None: OpenAI's `response_format` (`json_object`,
    `json_schema`), llama.cpp's `grammar` (GBNF) and llama-server's top-level `json_schema`.
    At most one of them may be set."""
    asked = [name for name in ("response_format", "grammar", "json_schema") if _is_set(body, name)]
    if len(asked) > 1:
        raise ConstraintError(f"'{asked[1]}' and '{asked[0]}' both constrain the output: set only one", asked[1])
    if not asked:
        return None
    name = asked[0]
    if name == "grammar":
        return gbnf_grammar(body["grammar"])
    if name == "json_schema":
        return json_schema_grammar(body["json_schema"], "json_schema")
    return _response_format(body["response_format"])


def _one_line(error: object) -> str:
    """llguidance's messages span lines (a regex error draws a caret): one line of at most 300 characters."""
    return " ".join(str(error).split())[:300]


def _is_set(body: dict[str, Any], name: str) -> bool:
    v = body.get(name)
    if name == "response_format" and isinstance(v, dict) and v.get("type") == "text":
        return False
    return v is not None and v != ""


def _response_format(rf: Any) -> GrammarSpec | None:
    p = "response_format"
    if not isinstance(rf, dict):
        raise ConstraintError(f"'{p}' must be an object", p)
    kind = rf.get("type")
    if kind == "json_object":
        # llama-server also takes a schema here; without one, any JSON object
        schema = rf.get("schema", {"type": "object"})
        return json_schema_grammar(schema, f"{p}.schema")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise ConstraintError(f"'{p}.json_schema' must be an object with 'name' and 'schema'", f"{p}.json_schema")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise ConstraintError(f"'{p}.json_schema.name' must be a string", f"{p}.json_schema.name")
        strict = js.get("strict", False)
        if not isinstance(strict, bool) and strict is not None:
            raise ConstraintError(f"'{p}.json_schema.strict' must be a boolean", f"{p}.json_schema.strict")
        schema = js.get("schema", rf.get("schema"))  # llama-server accepts the schema one level up too
        if schema is None:
            raise ConstraintError(f"'{p}.json_schema.schema' is missing", f"{p}.json_schema.schema")
        return json_schema_grammar(schema, f"{p}.json_schema.schema", strict=bool(strict))
    if kind == "text":
        return None
    raise ConstraintError(f"'{p}.type' must be 'text', 'json_object' or 'json_schema', got {json.dumps(kind)[:60]}",
                          f"{p}.type")


# ---- the tokenizer side: built once per archive ----


class ConstraintCompiler:
    """The archive's tokenizer as llguidance sees it (every token's bytes), built on first use
    (about 0.3-1 s for 49k tokens) and shared by all requests; `compile` makes one sequence's
    `TokenConstraint`. Thread-safe: requests compile on their own threads.

    Args:
        tok: the archive's tokenizer record (`archive.tokenizer`: its `json` is a HF tokenizer.json).
        n_vocab: length of the logits vectors (the embedding's rows; ids past the tokenizer never pass).
        eos_ids: the ids that end a sequence; allowed exactly where the grammar is complete.
    """

    def __init__(self, tok: dict[str, Any], n_vocab: int, eos_ids: Iterable[int]):
        self._json = tok["json"]
        self.n_vocab = int(n_vocab)
        self.eos_ids = sorted(eos_ids)
        self._lltok: Any = None
        self._lock = threading.Lock()
        self._special: dict[str, int] | None = None

    @classmethod
    def for_engine(cls, engine: Any) -> ConstraintCompiler:
        return cls(engine.archive.tokenizer, engine.n_token_ids, engine.eos_ids)

    @property
    def lltokenizer(self) -> Any:
        with self._lock:
            if self._lltok is None:
                import llguidance

                if not self.eos_ids:
                    raise ConstraintError("this model has no end-of-sequence token, so a grammar cannot end it")
                self._lltok = llguidance.LLTokenizer(self._json, n_vocab=self.n_vocab, eos_token=self.eos_ids)
            return self._lltok

    def special_token_id(self, text: str) -> int | None:
        """The id of the special (control) token spelled `text`, if the tokenizer has one; a grammar must
        name such a token by id, since no text ever produces it."""
        if self._special is None:
            from tokenizers import Tokenizer

            raw = Tokenizer.from_str(self._json)
            self._special = {t.content: i for i, t in raw.get_added_tokens_decoder().items() if t.special}
        return self._special.get(text)

    def literal(self, text: str) -> str:
        """`text` as a Lark terminal: a special token by id (`<[id]>`), else a quoted string."""
        i = self.special_token_id(text)
        return f"<[{i}]>" if i is not None else json.dumps(text)

    def compile(self, spec: GrammarSpec) -> TokenConstraint:
        """One sequence's constraint (ConstraintError, naming `spec.param`, for a grammar that does not compile)."""
        import llguidance

        matcher = llguidance.LLMatcher(self.lltokenizer, spec.grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            raise ConstraintError(f"'{spec.param}': {_one_line(matcher.get_error())}", spec.param)
        return TokenConstraint(matcher, self.n_vocab, self.eos_ids)


# ---- one sequence ----


class TokenConstraint:
    """One sequence's grammar state: `apply(logits)` before each sampling step, `accept(token)` after
    (EOS too: it is allowed exactly where the grammar is complete).

    `finished` means the grammar can take no further token, so the sequence should end now (its only
    allowed token is EOS); `complete` means it may end here (EOS is allowed) though it could go on.
    """

    def __init__(self, matcher: Any, n_vocab: int, eos_ids: list[int]):
        self._m = matcher
        self.n_vocab = n_vocab
        self.eos_ids = eos_ids
        self._words = np.zeros((n_vocab + 31) // 32, dtype=np.uint32)

    def allowed(self) -> np.ndarray:
        """The current mask: bool [n_vocab], True where a token keeps the output inside the grammar."""
        self._fill()
        return np.unpackbits(self._words.view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with disallowed tokens at -inf (the scheduler's LogitsMask hook: the row it
        passes is the batch's, which logprobs still read)."""
        out = np.array(logits, dtype=np.float32)
        self.mask_inplace(out)
        return out

    def mask_inplace(self, logits: np.ndarray) -> None:
        """Set the logits of disallowed tokens to -inf, in place (float32 [n], n <= n_vocab)."""
        self._fill()
        n = logits.shape[0]
        if n > self.n_vocab:
            raise ValueError(f"{n} logits for a constraint over {self.n_vocab} tokens")
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little", count=n)
        # allowed -> +0.0, disallowed -> 0xFF800000 (-inf): one branch-free add, 10x a boolean-index store
        add = (bits.astype(np.uint32) - np.uint32(1)) & np.uint32(0xFF800000)
        logits += add.view(np.float32)

    def accept(self, token: int) -> None:
        """Advance past the sampled `token`; one the mask did not allow is a ConstraintError."""
        if not self._m.consume_token(int(token)):
            raise ConstraintError(f"token {token} is not allowed by the grammar: {_one_line(self._m.get_error())}")

    @property
    def complete(self) -> bool:
        return self._m.is_accepting()

    @property
    def finished(self) -> bool:
        return self._m.is_stopped()

    def _fill(self) -> None:
        if self._m.is_error():
            raise ConstraintError(f"grammar state broken: {_one_line(self._m.get_error())}")
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
