"""The HTTP routes of `vkpack serve`: an OpenAI-compatible API (Starlette) over the batch scheduler.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as
server-sent events or not), llama-server's POST /tokenize, POST /detokenize and GET /props,
GET /health, GET /metrics (Prometheus text), GET / (the chat page, static/chat.html); CORS only
for the origins given. Requests are untrusted: the body is capped, every field is type-checked
(parse.py), and every failure is an OpenAI-style JSON error `{"error": {"message", "type",
"param", "code"}}` with a 4xx/5xx status, after which the server keeps serving. Model work
happens only on the scheduler thread (batch.py); the handlers tokenize, validate, and relay
events (jobs.py).

Example:
    app = create_app(Engine("smol.vkpack"), model_name="smol")
    with BackgroundServer(app) as srv:          # runner.py: uvicorn on a free loopback port
        print(srv.url)                          # http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ... import __version__
from ..constrain import ConstraintCompiler
from ..sampler import DEFAULT_PARAMS, SamplingParams
from .batch import Event, Failed, Finished, Piece, PromptLogprobs, Scheduler
from .jobs import Collected, Job, SseResponse, collect, failed_response
from .logprobs import TokenText
from .parse import (
    ApiError, chat_messages, chat_prompt_ids, check_model, choices, detokenize_ids, error_body, gen_args, prompt_ids,
    read_json, sampling, stream_flags, tokenize_args,
)
from .render import LegacyLogprobs, chat_logprobs, merge
from .prometheus import exposition, server_registry
from .structured import OutputPlan, ToolRelay, output_plan

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20          # bytes of one request body (413 beyond)
DEFAULT_MAX_TOKENS = 512    # generation cap when a request gives none (OpenAI's completions default is 16)
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/props",
             "/health", "/metrics", "/")
OPEN_PATHS = ("/health", "/")   # no API key: the chat page asks for it and sends it with each call


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage: the prompt once, however many choices; the completion tokens of all of them;
    the prompt tokens whose KV came from the prefix cache (batch.py) as `cached_tokens`."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class _Ends:
    """A stream's finished choices: the usage chunk goes out after the last one."""

    def __init__(self, n: int):
        self.n, self.count, self.completion_tokens, self.cached_tokens = n, 0, 0, 0

    def add(self, ev: Finished) -> bool:
        """Count `ev`; whether every choice has now finished."""
        self.count += 1
        self.completion_tokens += ev.completion_tokens
        self.cached_tokens = ev.cached_tokens
        return self.count == self.n


# ---- what the handlers share ----


class _State:
    """What the handlers share: the engine, the scheduler, settings and counters."""

    def __init__(self, engine: Any, scheduler: Scheduler, model_name: str, api_key: str | None,
                 default_max_tokens: int, max_body: int):
        self.engine, self.scheduler = engine, scheduler
        self.model_name, self.api_key = model_name, api_key
        self.default_max_tokens, self.max_body = default_max_tokens, max_body
        self.created = int(time.time())
        self.meta = model_meta(engine)
        self.token_text = TokenText(engine.tokenizer, engine.archive.tokenizer["json"])  # logprobs' strings, bytes
        self.compiler = ConstraintCompiler.for_engine(engine)  # grammars; builds its tables on first use
        self.template = engine.archive.tokenizer.get("chat_template")
        self.requests: dict[tuple[str, int], int] = {}
        self.finish: dict[str, int] = {}
        self.lock = threading.Lock()

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def count_finish(self, ev: Finished | Failed) -> None:
        key = ev.reason if isinstance(ev, Finished) else "error"
        with self.lock:
            self.finish[key] = self.finish.get(key, 0) + 1

    def request_counts(self) -> list[tuple[tuple[str, int], int]]:
        """((endpoint, status), count), sorted: a snapshot for /metrics."""
        with self.lock:
            return sorted(self.requests.items())

    def start_job(self, body: dict[str, Any], ids: list[int], params: SamplingParams, receive: Any,
                  label: str, opts: dict[str, Any], plan: OutputPlan) -> Job:
        """Submit one generation to the scheduler (ApiError 400 if it cannot fit, 503 if the queue is full);
        `label` (the response id) names it in the per-request log line; `opts` is `parse.choices`'s,
        `plan` the output's grammar and tool-call markers (structured.py)."""
        args = gen_args(body, ids, params, self.engine.context, self.default_max_tokens)
        extra = {k: opts[k] for k in ("n", "logprobs", "prompt_logprobs")}
        extra.update(logits_mask=plan.mask_factory(), keep_special=plan.keep)
        job = Job(self.scheduler, {**args, **extra, "label": label}, receive, self.count_finish)
        job.start()
        return job


# ---- the routes ----


async def completions(request: Request) -> Response:
    state: _State = request.app.state.vk
    body = await read_json(request, state.max_body)
    check_model(state.model_name, body)
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "missing required field 'prompt'", param="prompt", code="missing_required_parameter")
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "suffix is not supported", param="suffix")
    params = sampling(body, state.engine.n_token_ids)
    opts = choices(body, chat=False)
    stream, include_usage = stream_flags(body)
    plan = await asyncio.to_thread(output_plan, body, opts["n"], state.compiler, None, False)
    ids = await asyncio.to_thread(prompt_ids, state.engine, body["prompt"])
    echo = await asyncio.to_thread(_echo_text, state.engine, body["prompt"], ids) if opts["echo"] else ""
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    job = state.start_job(body, ids, params, request.receive, rid, opts, plan)
    make = _chunk_maker(state, rid, created, "text_completion", include_usage)
    n, want_lp = opts["n"], opts["logprobs"] is not None
    lps = [LegacyLogprobs(state.token_text) for _ in range(n)]

    def choice(i: int, text: str, logprobs: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

    if stream:
        ends = _Ends(n)

        def render(ev: Event | None) -> list[dict[str, Any]]:
            if ev is None:  # the echoed prompt opens each choice (with its logprobs: when they come)
                return [make([choice(i, echo, None, None)]) for i in range(n)] if echo and not want_lp else []
            if isinstance(ev, PromptLogprobs):
                return [make([choice(i, echo, lps[i].prompt(ids, ev.entries, echo), None)]) for i in range(n)]
            if isinstance(ev, Piece):
                return [make([choice(ev.index, ev.text, lps[ev.index].part(ev.logprobs) if want_lp else None, None)])]
            if isinstance(ev, Finished):
                out = [make([choice(ev.index, "", None, ev.reason)])]
                if ends.add(ev) and include_usage:
                    out.append({**make([]), "usage": _usage(len(ids), ends.completion_tokens, ends.cached_tokens)})
                return out
            return []
        return SseResponse(job, render)  # type: ignore[return-value]
    res = await collect(job)
    if not res.complete:
        return _incomplete(res)
    out_choices = []
    for i, c in enumerate(res.choices):
        lp = None
        if want_lp:
            head = lps[i].prompt(ids, res.prompt or (), echo) if echo else None
            lp = lps[i].part(c.logprobs)
            lp = merge(head, lp) if head is not None else lp
        out_choices.append(choice(i, echo + c.text, lp, c.end.reason if c.end else None))
    out = make(out_choices)
    out["usage"] = _usage(len(ids), sum(c.end.completion_tokens for c in res.choices if c.end), _cached(res))
    return JSONResponse(out)


def _cached(res: Collected) -> int:
    """The request's prompt tokens taken from the prefix cache (every choice's Finished carries them)."""
    return max((c.end.cached_tokens for c in res.choices if c.end), default=0)


def _echo_text(engine: Any, prompt: Any, ids: list[int]) -> str:
    """The prompt as `echo` returns it: the string sent, or token ids decoded (special tokens kept)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else engine.decode(ids, False)


def _incomplete(res: Collected) -> Response:
    """The answer when a generation did not finish: its failure, or 499 for a client that left."""
    return failed_response(res.failed) if res.failed else Response(status_code=499)


async def chat_completions(request: Request) -> Response:
    state: _State = request.app.state.vk
    body = await read_json(request, state.max_body)
    check_model(state.model_name, body)
    messages = chat_messages(body)
    params = sampling(body, state.engine.n_token_ids)
    opts = choices(body, chat=True)
    stream, include_usage = stream_flags(body)
    plan = await asyncio.to_thread(output_plan, body, opts["n"], state.compiler, state.template, True)
    ids = await asyncio.to_thread(chat_prompt_ids, state.engine, messages, plan.tools)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    job = state.start_job(body, ids, params, request.receive, rid, opts, plan)
    n, want_lp = opts["n"], opts["logprobs"] is not None
    relay = ToolRelay(plan.fmt if plan.parse_calls else None, n)  # each choice's text, tool calls parsed out

    def lp(entries: Any) -> dict[str, Any] | None:
        return chat_logprobs(entries, state.token_text) if want_lp else None

    if stream:
        make = _chunk_maker(state, rid, created, "chat.completion.chunk", include_usage)
        ends = _Ends(n)

        def delta(i: int, d: dict[str, Any], logprobs: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
            return make([{"index": i, "delta": d, "logprobs": logprobs, "finish_reason": reason}])

        def render(ev: Event | None) -> list[dict[str, Any]]:
            if ev is None:
                return [delta(i, {"role": "assistant", "content": ""}, None, None) for i in range(n)]
            if isinstance(ev, Piece):
                parts = relay.feed(ev.index, ev.text) or ([{"content": ""}] if ev.logprobs else [])
                return [delta(ev.index, d, lp(ev.logprobs) if j == 0 else None, None) for j, d in enumerate(parts)]
            if isinstance(ev, Finished):
                rest, reason = relay.finish(ev.index, ev.reason)
                out = [delta(ev.index, d, None, None) for d in rest] + [delta(ev.index, {}, None, reason)]
                if ends.add(ev) and include_usage:
                    out.append({**make([]), "usage": _usage(len(ids), ends.completion_tokens, ends.cached_tokens)})
                return out
            return []
        return SseResponse(job, render)  # type: ignore[return-value]
    res = await collect(job)
    if not res.complete:
        return _incomplete(res)
    answers = [relay.message(c.text, c.end.reason if c.end else "stop") for c in res.choices]
    out = _chunk_maker(state, rid, created, "chat.completion", False)([
        {"index": i, "message": msg, "logprobs": lp(c.logprobs), "finish_reason": reason}
        for i, (c, (msg, reason)) in enumerate(zip(res.choices, answers, strict=True))])
    out["usage"] = _usage(len(ids), sum(c.end.completion_tokens for c in res.choices if c.end), _cached(res))
    return JSONResponse(out)


def _chunk_maker(state: _State, rid: str, created: int, obj: str, include_usage: bool) -> Any:
    """Builds one response object (a stream chunk, or the body without a stream) of the given
    OpenAI `object` type around its choices."""
    def make(choices: list[dict[str, Any]]) -> dict[str, Any]:
        c = {"id": rid, "object": obj, "created": created, "model": state.model_name, "choices": choices}
        if include_usage:
            c["usage"] = None
        return c
    return make


def model_meta(engine: Any) -> dict[str, Any]:
    """What the served archive is and how it runs: architecture, parameters, weight types, context,
    budgets and backend (the `meta` of /v1/models, as llama-server's, and part of /props)."""
    a = engine.archive
    params: Counter[str] = Counter()
    for r in a.tensors.values():
        params[r.dtype] += math.prod(r.shape)
    hp = a.hparams
    return {"architecture": a.index["arch"], "n_params": sum(params.values()),
            "quantization": dict(params.most_common()),  # weight type -> parameters stored in it
            "n_ctx_train": hp["context"], "n_ctx": engine.context, "n_vocab": hp["vocab"], "n_embd": hp["hidden"],
            "n_layers": hp["n_layers"], "size": a.size, "backend": engine.backend.name,
            "device_budget_bytes": engine.tier.budget, "ram_budget_bytes": engine.metrics.ram_budget}


def _model_card(state: _State) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "vkpack",
            "context_length": state.engine.context, "meta": state.meta}


async def models(request: Request) -> Response:
    state: _State = request.app.state.vk
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def model(request: Request) -> Response:
    state: _State = request.app.state.vk
    if request.path_params["name"] != state.model_name:
        raise ApiError(404, f"model {request.path_params['name']!r} not found", param="model", code="model_not_found")
    return JSONResponse(_model_card(state))


async def tokenize(request: Request) -> Response:
    state: _State = request.app.state.vk
    text, add_special = tokenize_args(await read_json(request, state.max_body))
    # add_special: the BOS the model adds to a prompt (llama-server's meaning), never more
    ids = await asyncio.to_thread(state.engine.encode, text, None if add_special else False)
    return JSONResponse({"tokens": ids})


async def detokenize(request: Request) -> Response:
    state: _State = request.app.state.vk
    ids = detokenize_ids(state.engine, await read_json(request, state.max_body))
    # special tokens kept, as llama-server does, so that detokenize(tokenize(x)) gives x back
    text = await asyncio.to_thread(state.engine.decode, ids, False)
    return JSONResponse({"content": text})


async def props(request: Request) -> Response:
    """llama-server's /props: the generation defaults a request starts from, the slots and the model."""
    s: _State = request.app.state.vk
    d = DEFAULT_PARAMS
    return JSONResponse({
        "default_generation_settings": {
            "n_ctx": s.engine.context,
            "params": {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p, "min_p": d.min_p,
                       "repeat_penalty": d.repeat_penalty, "repeat_last_n": d.repeat_last_n,
                       "n_predict": s.default_max_tokens, "seed": d.seed}},
        "total_slots": s.scheduler.max_batch, "max_queue": s.scheduler.max_queue,
        "prefill_chunk": s.scheduler.prefill_chunk, "model_alias": s.model_name,
        "model_path": str(s.engine.archive.path), "chat_template": s.engine.archive.tokenizer.get("chat_template") or "",
        "build_info": f"vkpack {__version__}", "modalities": {"vision": False, "audio": False}, "meta": s.meta})


async def health(request: Request) -> Response:
    s: _State = request.app.state.vk
    if not s.scheduler.alive:
        return JSONResponse({"status": "error", "error": s.scheduler.error or "scheduler stopped"}, status_code=503)
    return JSONResponse({"status": "ok", "model": s.model_name, "active": s.scheduler.active,
                         "waiting": s.scheduler.queue_depth})


async def metrics(request: Request) -> Response:
    s: _State = request.app.state.vk
    if not hasattr(request.app.state, "prometheus"):  # this app's own registry, built once (prometheus.py)
        request.app.state.prometheus = server_registry(s.scheduler, s.engine, s.request_counts)
    body, media_type = exposition(request.app.state.prometheus, request.headers.get("accept"))
    return Response(body, media_type=media_type)


CHAT_PAGE = importlib.resources.files(__package__).joinpath("static", "chat.html")
# The page loads nothing from elsewhere; the policy makes the browser hold it to that.
CHAT_PAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                     "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src "
                                                "'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; "
                                                "form-action 'none'; frame-ancestors 'none'"}


async def chat_page(request: Request) -> Response:
    """The chat page (static/chat.html), open like /health: it holds no secret and asks for the API key itself."""
    return HTMLResponse(CHAT_PAGE.read_bytes(), headers=CHAT_PAGE_HEADERS)




# ---- the app: the gate, error handlers and create_app ----


class _Gate:
    """Outermost ASGI layer: answers CORS (only for `cors_origins`: preflights before the key check,
    since browsers send them without credentials), counts requests by endpoint and status, checks the
    API key and the declared body size, and turns uncaught errors into JSON."""

    def __init__(self, app: Any, state: _State, cors_origins: tuple[str, ...] = ()):
        self.app, self.state = app, state
        self._entry: Any = self._gated
        if cors_origins:
            self._entry = CORSMiddleware(self._gated, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                         allow_headers=["Authorization", "Content-Type"], max_age=600)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._entry(scope, receive, send)

    async def _gated(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = 500
        started = False

        async def send_counted(msg: Any) -> None:
            nonlocal status, started
            if msg["type"] == "http.response.start":
                status, started = msg["status"], True
            await send(msg)

        try:
            err = self._precheck(scope, path)
            if err is not None:
                await error_response(err, {"WWW-Authenticate": "Bearer"} if err.status == 401 else None)(
                    scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        except Exception as e:
            log.exception("unhandled error on %s", path)
            if not started:
                await error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))(scope, receive, send_counted)
        finally:
            self.state.count_request(endpoint, status)

    def _precheck(self, scope: Any, path: str) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        key = self.state.api_key
        if key and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return ApiError(400, "bad Content-Length header")
            if n > self.state.max_body:
                return ApiError(413, f"request body of {n} bytes is larger than {self.state.max_body} bytes",
                                code="request_too_large")
        return None


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc, {"Retry-After": "1"} if exc.status == 503 else None)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "error"
    return JSONResponse(error_body(status, f"{request.method} {request.url.path}: {detail}"), status_code=status)


async def _disconnect(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening


async def _internal(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)


def create_app(engine: Any, model_name: str, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, max_body: int = MAX_BODY,
               prefill_chunk: int = 512, cors_origins: tuple[str, ...] | list[str] = (),
               prefix_cache: bool = True) -> Any:
    """The ASGI app serving `engine` under the name `model_name`.

    The batch scheduler thread starts with the app's lifespan and stops with it; close the
    engine after the server has stopped.

    Args:
        engine: a loaded Engine, used only by the scheduler thread from now on.
        model_name: the id clients must send as `model` and that /v1/models lists.
        api_key: if set, every endpoint but /health requires `Authorization: Bearer KEY`.
        max_batch, max_queue: running sequences, and requests waiting beyond them (503 past it).
        default_max_tokens: generation cap when a request sets none.
        max_body: largest request body in bytes (413 past it).
        cors_origins: origins a browser page may call from (`*` for any); none: no CORS headers at all.
        prefix_cache: reuse cached prompt-prefix KV across requests (batch.py, prefix.py).
    """
    from starlette.exceptions import HTTPException

    scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                          prefix_cache=prefix_cache)
    state = _State(engine, scheduler, model_name, api_key, default_max_tokens, max_body)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/props", props, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", chat_page, methods=["GET"]),
    ], exception_handlers={ApiError: _api_error, HTTPException: _http_error, ClientDisconnect: _disconnect,
                        Exception: _internal},
        lifespan=lifespan)
    app.state.vk = state
    return _Gate(app, state, tuple(cors_origins))
