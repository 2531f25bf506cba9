"""Request parsing for the server: untrusted JSON bodies in, typed generation arguments or an ApiError out.

Every field is type-checked on its own and every failure names the field, as an OpenAI-style
error (`ApiError`, rendered by `error_body`). Nothing here touches the scheduler; the engine is
used only to tokenize and to render the chat template.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from ..chat import TemplateError
from ..sampler import DEFAULT_PARAMS, SamplingError, SamplingParams
from ..toolcalls import ToolCallError, ToolRequest, render_prompt, template_messages
from .logprobs import MAX_TOP_CHAT, MAX_TOP_COMPLETIONS

MAX_STOPS = 16              # stop strings per request
MAX_STOP_CHARS = 512        # characters per stop string (matching holds back up to this much text)

# OpenAI fields this server does not implement yet: a request that sets one gets 400 naming it, never a
# silent 200 that ignored it. Implementing a field means removing its row here (and parsing it below).
# A field counts as set unless it is absent, null, or its "off" value listed here.
UNSUPPORTED_FIELDS: dict[str, tuple[object, ...]] = {
    "functions": ([],),             # the deprecated form of `tools` (answered as `function_call`, not tool_calls)
    "function_call": ("none",),
}
MAX_N = 16                  # choices per request (each is a sequence of the batch, with its own KV cache)


class ApiError(Exception):
    """A request that gets an OpenAI-style error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type or ("invalid_request_error" if status < 500 else "server_error"),
                      "param": param, "code": code}}


# ---- one check per field, each naming the field ----


def _field(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None,
           what: str | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    ts = types if isinstance(types, tuple) else (types,)
    # bool is an int in Python, but JSON true is not a number.
    if (isinstance(v, bool) and bool not in ts) or not isinstance(v, ts):
        raise ApiError(400, f"'{name}' must be {what or _type_name(types)}, got {json.dumps(v)[:80]}",
                       param=name, code="invalid_type")
    return v


def _float(body: dict[str, Any], name: str, default: float) -> float:
    """A JSON number as a float; an integer too large for a float is a 400, not an OverflowError."""
    v = _field(body, name, (int, float), default)
    try:
        return float(v)
    except OverflowError:
        raise ApiError(400, f"'{name}' is out of range", param=name) from None


MAX_INT_FIELD = 1 << 63  # integers beyond a signed 64-bit range mean nothing to any field here


def _bounded_int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    v = _field(body, name, int, default)
    if v is not None and not -MAX_INT_FIELD <= v < MAX_INT_FIELD:
        raise ApiError(400, f"'{name}' is out of range", param=name)
    return v


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array", dict: "an object"}
    ts = types if isinstance(types, tuple) else (types,)
    if set(ts) == {int, float}:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in ts)


def _parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOPS:
        raise ApiError(400, f"'stop' has {len(stop)} strings; at most {MAX_STOPS}", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"'stop' strings must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    return tuple(stop)


def refuse_unsupported(body: dict[str, Any]) -> None:
    """400 naming the first field of UNSUPPORTED_FIELDS that the request sets."""
    for name, off in UNSUPPORTED_FIELDS.items():
        v = body.get(name)
        if v is not None and not any(type(v) is type(o) and v == o for o in off):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def sampling(body: dict[str, Any], vocab: int) -> SamplingParams:
    """The request's sampling fields; those it leaves out take the defaults `vkpack run` uses
    (`DEFAULT_PARAMS`, llama-server's), so a bare curl samples as the command line does.
    `vocab`: token ids below it are valid `logit_bias` keys."""
    d = DEFAULT_PARAMS
    refuse_unsupported(body)
    try:
        return SamplingParams(
            temperature=_float(body, "temperature", d.temperature),
            top_p=_float(body, "top_p", d.top_p),
            top_k=_bounded_int(body, "top_k", d.top_k),
            min_p=_float(body, "min_p", d.min_p),
            repeat_penalty=_float(body, "repeat_penalty", d.repeat_penalty),
            repeat_last_n=_bounded_int(body, "repeat_last_n", d.repeat_last_n),
            seed=_bounded_int(body, "seed", None),
            presence_penalty=_float(body, "presence_penalty", 0.0),
            frequency_penalty=_float(body, "frequency_penalty", 0.0),
            logit_bias=_logit_bias(body, vocab))
    except SamplingError as e:
        param = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param=param if param in body else None) from None


def _logit_bias(body: dict[str, Any], vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}`: ids as decimal strings below `vocab`, biases in [-100, 100]."""
    bias = _field(body, "logit_bias", dict, {})
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise ApiError(400, f"'logit_bias' keys must be token ids written as decimal strings, got {key[:40]!r}",
                           param="logit_bias", code="invalid_type")
        tok = int(key)
        if tok >= vocab:
            raise ApiError(400, f"'logit_bias' token id {tok} outside the vocabulary (0..{vocab - 1})",
                           param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' values must be numbers in [-100, 100], got {json.dumps(value)[:40]} "
                                f"for token {tok}", param="logit_bias")
        out[tok] = float(value)
    return tuple(sorted(out.items()))


def choices(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """`n`, the logprobs fields and `echo`: the `GenRequest` arguments `n`, `logprobs`, `prompt_logprobs`,
    and `echo` (for the handler). Chat takes `logprobs: bool` + `top_logprobs` 0..20 and no echo; the
    completions API `logprobs` 0..5 (the top count) and `echo: bool`."""
    n = _field(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be in 1..{MAX_N}, got {n}", param="n")
    best_of = _field(body, "best_of", int, None)
    if best_of is not None and best_of != n:
        raise ApiError(400, f"'best_of' must equal n ({n}): choosing the best of more is not supported",
                       param="best_of")
    if chat:
        if body.get("echo") not in (None, False):
            raise ApiError(400, "'echo' is only supported on /v1/completions", param="echo")
        want = _field(body, "logprobs", bool, False)
        top = _field(body, "top_logprobs", int, 0)
        if not 0 <= top <= MAX_TOP_CHAT:
            raise ApiError(400, f"'top_logprobs' must be in 0..{MAX_TOP_CHAT}, got {top}", param="top_logprobs")
        if top and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return {"n": n, "logprobs": top if want else None, "prompt_logprobs": None, "echo": False}
    k = _field(body, "logprobs", int, None)
    if k is not None and not 0 <= k <= MAX_TOP_COMPLETIONS:
        raise ApiError(400, f"'logprobs' must be in 0..{MAX_TOP_COMPLETIONS}, got {k}", param="logprobs")
    echo = _field(body, "echo", bool, False)
    return {"n": n, "logprobs": k, "prompt_logprobs": k if echo else None, "echo": echo}


def _max_tokens(body: dict[str, Any], default: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = _field(body, name, int, default)
    if n < 1:
        raise ApiError(400, f"'{name}' must be >= 1, got {n}", param=name)
    return n


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`messages` as chat templates take them (runtime/toolcalls.py): text content, assistant `tool_calls`,
    `tool` results with their `tool_call_id`."""
    if body.get("messages") is None:
        raise ApiError(400, "missing required field 'messages'", param="messages", code="missing_required_parameter")
    try:
        return template_messages(body["messages"])
    except ToolCallError as e:
        raise ApiError(400, str(e), param=e.param) from None


# ---- whole requests ----


async def read_json(request: Request, max_body: int) -> dict[str, Any]:
    """The body as a JSON object, read in chunks so that an oversized one stops at `max_body` bytes."""
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, f"request body larger than {max_body} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, or an int of over 4300 digits
        raise ApiError(400, f"invalid JSON body: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    return body


def check_model(model_name: str, body: dict[str, Any]) -> None:
    """`model`, when given, must name the one model served."""
    model = body.get("model")
    if model is None:  # as llama-server does: one model served, so naming it is optional
        return
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    if model != model_name:
        raise ApiError(404, f"model {model!r} not found; this server serves {model_name!r}",
                       param="model", code="model_not_found")


def prompt_ids(engine: Any, prompt: Any) -> list[int]:
    """`prompt` as a string, a one-string array, or an array of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = engine.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or an array of token ids (one prompt per request)",
                       param="prompt", code="invalid_type")
    if not ids:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    _check_ids(engine, ids, "prompt")
    return ids


def _check_ids(engine: Any, ids: list[int], param: str) -> None:
    """Every id must name a row of the embedding (a tokenizer or client may give others)."""
    limit = engine.n_token_ids
    bad = next((t for t in ids if not 0 <= t < limit), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} outside the vocabulary (0..{limit - 1})", param=param)


def chat_prompt_ids(engine: Any, messages: list[dict[str, Any]], tools: ToolRequest | None = None) -> list[int]:
    """The conversation through the archive's chat template (with `tools`, when active), tokenized."""
    try:
        ids = engine.encode(render_prompt(engine.archive.tokenizer, messages, tools))
    except TemplateError as e:
        # the conversation, rejected by raise_exception() or too costly to render: one 400 either way
        raise ApiError(400, str(e), param="messages", code="chat_template_error") from None
    _check_ids(engine, ids, "messages")
    return ids


def gen_args(body: dict[str, Any], ids: list[int], params: SamplingParams, context: int,
             default_max_tokens: int) -> dict[str, Any]:
    """The `GenRequest` arguments: prompt, sampling, a max_tokens that fits `context`, stop strings."""
    if len(ids) + 1 > context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {context} tokens",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    n = min(_max_tokens(body, default_max_tokens), context - len(ids))
    return {"prompt_ids": ids, "params": params, "max_tokens": n, "stop": _parse_stop(body),
            "ignore_eos": bool(_field(body, "ignore_eos", bool, False))}


def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`)."""
    stream = _field(body, "stream", bool, False)
    opts = _field(body, "stream_options", dict, {})
    usage = _field(opts, "include_usage", bool, False, what="a boolean (stream_options.include_usage)")
    return stream, usage


# ---- /tokenize and /detokenize (llama-server's shapes) ----


def tokenize_args(body: dict[str, Any]) -> tuple[str, bool]:
    """`{"content": str, "add_special": bool}` -> (text, whether to add BOS as the model does)."""
    content = body.get("content")
    if content is None:
        raise ApiError(400, "missing required field 'content'", param="content", code="missing_required_parameter")
    if not isinstance(content, str):
        raise ApiError(400, "'content' must be a string", param="content", code="invalid_type")
    if body.get("with_pieces") not in (None, False):  # refused, not silently ignored
        raise ApiError(400, "'with_pieces' is not supported by this server", param="with_pieces",
                       code="unsupported_parameter")
    return content, bool(_field(body, "add_special", bool, False))


def detokenize_ids(engine: Any, body: dict[str, Any]) -> list[int]:
    """`{"tokens": [int, ...]}`, each id a row of the embedding."""
    ids = body.get("tokens")
    if ids is None:
        raise ApiError(400, "missing required field 'tokens'", param="tokens", code="missing_required_parameter")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ApiError(400, "'tokens' must be an array of token ids", param="tokens", code="invalid_type")
    _check_ids(engine, ids, "tokens")
    return ids
