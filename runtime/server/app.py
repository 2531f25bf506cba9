"""The HTTP routes of `vkpack serve`: an OpenAI-compatible API (Starlette) over the batch scheduler.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as
server-sent events or not), llama-server's POST /tokenize, POST /detokenize and GET /props,
GET /health, GET /metrics (Prometheus text); CORS only for the origins given. Requests are
untrusted: the body is capped, every field is type-checked (parse.py), and every failure is an
OpenAI-style JSON error `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx
status, after which the server keeps serving. Model work happens only on the scheduler
thread (batch.py); the handlers tokenize, validate, and relay events (jobs.py).

Example:
    app = create_app(Engine("smol.vkpack"), model_name="smol")
    with BackgroundServer(app) as srv:          # runner.py: uvicorn on a free loopback port
        print(srv.url)                          # http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
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
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ... import __version__
from ..sampler import DEFAULT_PARAMS, SamplingParams
from .batch import Event, Failed, Finished, Piece, Scheduler
from .jobs import Job, SseResponse, collect, failed_response
from .parse import (
    ApiError, chat_messages, chat_prompt_ids, check_model, detokenize_ids, error_body, gen_args, prompt_ids, read_json,
    sampling, stream_flags, tokenize_args,
)
from .prometheus import prometheus_text

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20          # bytes of one request body (413 beyond)
DEFAULT_MAX_TOKENS = 512    # generation cap when a request gives none (OpenAI's completions default is 16)
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/props",
             "/health", "/metrics")


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)


def _usage(ev: Finished) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


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
                  label: str) -> Job:
        """Submit one generation to the scheduler (ApiError 400 if it cannot fit, 503 if the queue is full);
        `label` (the response id) names it in the per-request log line."""
        args = gen_args(body, ids, params, self.engine.context, self.default_max_tokens)
        job = Job(self.scheduler, {**args, "label": label}, receive, self.count_finish)
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
    params = sampling(body)
    stream, include_usage = stream_flags(body)
    ids = await asyncio.to_thread(prompt_ids, state.engine, body["prompt"])
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    job = state.start_job(body, ids, params, request.receive, rid)
    make = _chunk_maker(state, rid, created, "text_completion", include_usage)

    def chunk(text: str, reason: str | None) -> dict[str, Any]:
        return make({"text": text}, reason)

    if stream:
        def render(ev: Event | None) -> list[dict[str, Any]]:
            if isinstance(ev, Piece):
                return [chunk(ev.text, None)]
            if isinstance(ev, Finished):
                out = [chunk("", ev.reason)]
                if include_usage:
                    out.append({**chunk("", None), "choices": [], "usage": _usage(ev)})
                return out
            return []
        return SseResponse(job, render)  # type: ignore[return-value]
    text, end = await collect(job)
    if not isinstance(end, Finished):
        return failed_response(end) if end else Response(status_code=499)
    out = chunk(text, end.reason)
    out["usage"] = _usage(end)
    return JSONResponse(out)


async def chat_completions(request: Request) -> Response:
    state: _State = request.app.state.vk
    body = await read_json(request, state.max_body)
    check_model(state.model_name, body)
    messages = chat_messages(body)
    params = sampling(body)
    stream, include_usage = stream_flags(body)
    ids = await asyncio.to_thread(chat_prompt_ids, state.engine, messages)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    job = state.start_job(body, ids, params, request.receive, rid)
    make = _chunk_maker(state, rid, created, "chat.completion.chunk", include_usage)

    def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        return make({"delta": delta}, reason)

    if stream:
        def render(ev: Event | None) -> list[dict[str, Any]]:
            if ev is None:
                return [chunk({"role": "assistant", "content": ""}, None)]
            if isinstance(ev, Piece):
                return [chunk({"content": ev.text}, None)]
            if isinstance(ev, Finished):
                out = [chunk({}, ev.reason)]
                if include_usage:
                    out.append({**chunk({}, None), "choices": [], "usage": _usage(ev)})
                return out
            return []
        return SseResponse(job, render)  # type: ignore[return-value]
    text, end = await collect(job)
    if not isinstance(end, Finished):
        return failed_response(end) if end else Response(status_code=499)
    out = _chunk_maker(state, rid, created, "chat.completion", False)(
        {"message": {"role": "assistant", "content": text}}, end.reason)
    out["usage"] = _usage(end)
    return JSONResponse(out)


def _chunk_maker(state: _State, rid: str, created: int, obj: str, include_usage: bool) -> Any:
    """Builds one response object (a stream chunk, or the body without a stream) of the given
    OpenAI `object` type around a choice's content (`{"text": ...}` or `{"delta": ...}`)."""
    def make(content: dict[str, Any], reason: str | None) -> dict[str, Any]:
        c = {"id": rid, "object": obj, "created": created, "model": state.model_name,
             "choices": [{"index": 0, **content, "logprobs": None, "finish_reason": reason}]}
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
    return PlainTextResponse(prometheus_text(s.scheduler, s.engine, s.request_counts()),
                             media_type="text/plain; version=0.0.4")




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
        if key and path != "/health":
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
               prefill_chunk: int = 512, cors_origins: tuple[str, ...] | list[str] = ()) -> Any:
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
    """
    from starlette.exceptions import HTTPException

    scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
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
    ], exception_handlers={ApiError: _api_error, HTTPException: _http_error, ClientDisconnect: _disconnect,
                        Exception: _internal},
        lifespan=lifespan)
    app.state.vk = state
    return _Gate(app, state, tuple(cors_origins))
