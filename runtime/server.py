"""`vkpack serve`: an OpenAI-compatible HTTP API (Starlette on uvicorn) over the batch scheduler.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as
server-sent events or not), GET /health, GET /metrics (Prometheus text). Requests are
untrusted: the body is capped, every field is type-checked, and every failure is an
OpenAI-style JSON error `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx
status, after which the server keeps serving. Model work happens only on the scheduler
thread (runtime/batch.py); this module tokenizes, validates, and relays events.

Example:
    app = create_app(Engine("smol.vkpack"), model_name="smol")
    with BackgroundServer(app) as srv:          # uvicorn on a free loopback port
        print(srv.url)                          # http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .batch import (
    Event,
    Failed,
    Finished,
    GenRequest,
    Piece,
    QueueFull,
    Scheduler,
    SchedulerStopped,
)
from .chat import TemplateError
from .sampler import SamplingError, SamplingParams

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20          # bytes of one request body (413 beyond)
MAX_STOPS = 16              # stop strings per request
MAX_STOP_CHARS = 512        # characters per stop string (matching holds back up to this much text)
DEFAULT_MAX_TOKENS = 512    # generation cap when a request gives none (OpenAI's completions default is 16)
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


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


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)


# ---- request parsing: one check per field, each naming the field ----


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


def _sampling(body: dict[str, Any]) -> SamplingParams:
    """OpenAI fields with OpenAI defaults (temperature 1, top_p 1); llama.cpp's extras off unless given."""
    if _field(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if _field(body, "best_of", int, 1) != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    if body.get("echo") not in (None, False):
        raise ApiError(400, "echo is not supported", param="echo")
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    num = (int, float)
    try:
        return SamplingParams(
            temperature=float(_field(body, "temperature", num, 1.0)),
            top_p=float(_field(body, "top_p", num, 1.0)),
            top_k=_field(body, "top_k", int, 0),
            min_p=float(_field(body, "min_p", num, 0.0)),
            repeat_penalty=float(_field(body, "repeat_penalty", num, 1.0)),
            repeat_last_n=_field(body, "repeat_last_n", int, 64),
            seed=_field(body, "seed", int, None))
    except SamplingError as e:
        param = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param=param if param in body else None) from None


def _max_tokens(body: dict[str, Any], default: int) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = _field(body, name, int, default)
    if n < 1:
        raise ApiError(400, f"'{name}' must be >= 1, got {n}", param=name)
    return n


def _chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "missing required field 'messages'", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object", param=where)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ApiError(400, f"'{where}.role' must be a non-empty string", param=f"{where}.role")
        if content is None:
            content = ""
        elif isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": str}}",
                                   param=f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ApiError(400, f"'{where}.content' must be a string or an array of text parts", param=f"{where}.content")
        out.append({"role": role, "content": content})  # only plain strings reach the template
    return out


# ---- the bridge between one HTTP request and the scheduler thread ----


class _Job:
    """One submitted generation: events arrive on an asyncio queue; a client disconnect cancels it."""

    def __init__(self, state: _State, req_args: dict[str, Any], receive: Callable[[], Any]):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.req = GenRequest(emit=self._emit, **req_args)
        self.receive = receive
        self.watcher: asyncio.Task | None = None
        self.done = False

    def _emit(self, event: Event) -> None:  # scheduler thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # event loop closed: the server is shutting down
            self.state.scheduler.cancel(self.req)

    def start(self) -> None:
        try:
            self.state.scheduler.submit(self.req)
        except QueueFull as e:
            raise ApiError(503, str(e), code="queue_full") from None
        except SchedulerStopped as e:
            raise ApiError(503, str(e), code="unavailable") from None
        except ValueError as e:
            raise ApiError(400, str(e), code="context_length_exceeded") from None
        self.watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        # After the body is read, the next ASGI message is http.disconnect when the client goes.
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                if not self.done:
                    self.state.scheduler.cancel(self.req)
                    self.queue.put_nowait(None)
                return

    async def events(self) -> AsyncIterator[Event]:
        """Pieces, then one Finished or Failed; stops early (no terminal event) on disconnect."""
        try:
            while True:
                ev = await self.queue.get()
                if ev is None:
                    return
                if isinstance(ev, (Finished, Failed)):
                    self.done = True
                    self.state.count_finish(ev)
                yield ev
                if self.done:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.state.scheduler.cancel(self.req)
        if self.watcher is not None:
            self.watcher.cancel()


class _SseResponse:
    """ASGI response that waits for the first event, so an early failure is a JSON error with
    its own status; after that, `data: {json}` events, ending with `data: [DONE]`."""

    def __init__(self, job: _Job, render: Callable[[Event | None], list[dict[str, Any]]]):
        self.job, self.render = job, render

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        events = self.job.events()
        try:
            first = await anext(events, None)
            if first is None:
                return  # the client left while queued
            if isinstance(first, Failed):
                await _failed_response(first)(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            await self._send_chunks(send, self.render(None))  # the opening chunk (chat: the role)
            ev: Event | None = first
            while ev is not None:
                if isinstance(ev, Failed):
                    await self._send_chunks(send, [error_body(ev.status, ev.message, ev.type, None, ev.code)])
                    break
                await self._send_chunks(send, self.render(ev))
                ev = await anext(events, None)
                if ev is None and not self.job.done:
                    return  # disconnected mid-stream: nothing more to send
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except OSError:  # the socket went away under a send
            pass
        finally:
            await events.aclose()

    @staticmethod
    async def _send_chunks(send: Any, chunks: list[dict[str, Any]]) -> None:
        if chunks:
            body = b"".join(b"data: " + json.dumps(c, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
                            for c in chunks)
            await send({"type": "http.response.body", "body": body, "more_body": True})


def _failed_response(ev: Failed) -> JSONResponse:
    return JSONResponse(error_body(ev.status, ev.message, ev.type, None, ev.code), status_code=ev.status)


async def _collect(job: _Job) -> tuple[str, Finished | Failed | None]:
    parts: list[str] = []
    async with contextlib.aclosing(job.events()) as events:
        async for ev in events:
            if isinstance(ev, Piece):
                parts.append(ev.text)
            else:
                return "".join(parts), ev
    return "".join(parts), None


def _usage(ev: Finished) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


# ---- the application ----


class _State:
    """What the handlers share: the engine, the scheduler, settings and counters."""

    def __init__(self, engine: Any, scheduler: Scheduler, model_name: str, api_key: str | None,
                 default_max_tokens: int, max_body: int):
        self.engine, self.scheduler = engine, scheduler
        self.model_name, self.api_key = model_name, api_key
        self.default_max_tokens, self.max_body = default_max_tokens, max_body
        self.created = int(time.time())
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


async def _read_json(request: Request, max_body: int) -> dict[str, Any]:
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, f"request body larger than {max_body} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(400, f"invalid JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    return body


def _check_model(state: _State, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:  # as llama-server does: one model served, so naming it is optional
        return
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    if model != state.model_name:
        raise ApiError(404, f"model {model!r} not found; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


def _prompt_ids(state: _State, prompt: Any) -> list[int]:
    """`prompt` as a string, a one-string array, or an array of token ids."""
    eng = state.engine
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = eng.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = eng.hp["vocab"]
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} outside the vocabulary (0..{vocab - 1})", param="prompt")
        ids = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or an array of token ids (one prompt per request)",
                       param="prompt", code="invalid_type")
    if not ids:
        raise ApiError(400, "'prompt' is empty", param="prompt")
    return ids


def _gen_args(state: _State, body: dict[str, Any], ids: list[int], params: SamplingParams) -> dict[str, Any]:
    ctx = state.engine.context
    if len(ids) + 1 > ctx:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {ctx} tokens",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    n = min(_max_tokens(body, state.default_max_tokens), ctx - len(ids))
    return {"prompt_ids": ids, "params": params, "max_tokens": n, "stop": _parse_stop(body),
            "ignore_eos": bool(_field(body, "ignore_eos", bool, False))}


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _field(body, "stream", bool, False)
    opts = _field(body, "stream_options", dict, {})
    usage = _field(opts, "include_usage", bool, False, what="a boolean (stream_options.include_usage)")
    return stream, usage


async def completions(request: Request) -> Response:
    state: _State = request.app.state.vk
    body = await _read_json(request, state.max_body)
    _check_model(state, body)
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "missing required field 'prompt'", param="prompt", code="missing_required_parameter")
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "suffix is not supported", param="suffix")
    params = _sampling(body)
    stream, include_usage = _stream_flags(body)
    ids = await asyncio.to_thread(_prompt_ids, state, body["prompt"])
    job = _Job(state, _gen_args(state, body, ids, params), request.receive)
    job.start()
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
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
        return _SseResponse(job, render)  # type: ignore[return-value]
    text, end = await _collect(job)
    if not isinstance(end, Finished):
        return _failed_response(end) if end else Response(status_code=499)
    out = chunk(text, end.reason)
    out["usage"] = _usage(end)
    return JSONResponse(out)


async def chat_completions(request: Request) -> Response:
    state: _State = request.app.state.vk
    body = await _read_json(request, state.max_body)
    _check_model(state, body)
    messages = _chat_messages(body)
    params = _sampling(body)
    stream, include_usage = _stream_flags(body)
    eng = state.engine

    def render_prompt() -> list[int]:
        try:
            return eng.encode(eng.apply_chat_template(messages, add_generation_prompt=True))
        except TemplateError as e:
            # raise_exception() in a template rejects the conversation; anything else is the template's fault
            status = 400 if str(e).startswith("chat template: ") or "no chat template" in str(e) else 500
            raise ApiError(status, str(e), param="messages" if status == 400 else None, code="chat_template_error") from None

    ids = await asyncio.to_thread(render_prompt)
    job = _Job(state, _gen_args(state, body, ids, params), request.receive)
    job.start()
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
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
        return _SseResponse(job, render)  # type: ignore[return-value]
    text, end = await _collect(job)
    if not isinstance(end, Finished):
        return _failed_response(end) if end else Response(status_code=499)
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


def _model_card(state: _State) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "vkpack",
            "context_length": state.engine.context}


async def models(request: Request) -> Response:
    state: _State = request.app.state.vk
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def model(request: Request) -> Response:
    state: _State = request.app.state.vk
    if request.path_params["name"] != state.model_name:
        raise ApiError(404, f"model {request.path_params['name']!r} not found", param="model", code="model_not_found")
    return JSONResponse(_model_card(state))


async def health(request: Request) -> Response:
    s: _State = request.app.state.vk
    if not s.scheduler.alive:
        return JSONResponse({"status": "error", "error": s.scheduler.error or "scheduler stopped"}, status_code=503)
    return JSONResponse({"status": "ok", "model": s.model_name, "active": s.scheduler.active,
                         "waiting": s.scheduler.queue_depth})


async def metrics(request: Request) -> Response:
    return PlainTextResponse(prometheus_text(request.app.state.vk), media_type="text/plain; version=0.0.4")


def prometheus_text(s: _State) -> str:
    """The server's counters and gauges in Prometheus text exposition format."""
    sch, eng = s.scheduler, s.engine
    m = eng.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP vkpack_{name} {help}")
        lines.append(f"# TYPE vkpack_{name} {kind}")
        for labels, v in samples:
            lines.append(f"vkpack_{name}{labels} {v:g}" if isinstance(v, float) else f"vkpack_{name}{labels} {v}")

    with s.lock:
        reqs = sorted(s.requests.items())
    metric("requests_total", "counter", "HTTP requests by endpoint and status",
           [(f'{{endpoint="{ep}",status="{st}"}}', n) for (ep, st), n in reqs])
    metric("prompt_tokens_total", "counter", "prompt tokens prefilled", [("", sch.prompt_tokens)])
    metric("generation_tokens_total", "counter", "tokens generated", [("", sch.generated_tokens)])
    tps = sch.generated_tokens / sch.step_seconds if sch.step_seconds else 0.0
    metric("generation_tokens_per_second", "gauge", "tokens generated per second of batch-step time",
           [("", float(tps))])
    metric("batch_steps_total", "counter", "forward_batch calls", [("", sch.steps)])
    metric("batch_step_seconds_total", "counter", "seconds spent in forward_batch", [("", float(sch.step_seconds))])
    metric("finished_total", "counter", "sequences ended, by reason",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(sch.finished.items())])
    metric("kv_waits_total", "counter", "requests that had to wait for KV room in the device budget",
           [("", sch.kv_waits)])
    metric("preemptions_total", "counter", "sequences whose KV was dropped (and later recomputed) so that the "
           "weights could stream", [("", sch.preemptions)])
    metric("queue_depth", "gauge", "requests waiting for a batch slot", [("", sch.queue_depth)])
    metric("active_sequences", "gauge", "sequences in the running batch", [("", sch.active)])
    metric("max_batch", "gauge", "most sequences decoded together", [("", sch.max_batch)])
    metric("device_bytes_in_use", "gauge", "bytes allocated in the device tier (packs, KV, activations)",
           [("", eng.tier.in_use)])
    metric("device_bytes_peak", "gauge", "peak bytes allocated in the device tier", [("", eng.tier.peak)])
    metric("device_budget_bytes", "gauge", "device tier budget", [("", eng.tier.budget)])
    metric("ram_bytes_in_use", "gauge", "decoded pack bytes cached in the RAM tier", [("", eng.ram.in_use)])
    if eng.ram.budget is not None:
        metric("ram_budget_bytes", "gauge", "RAM tier budget", [("", eng.ram.budget)])
    metric("prefetch_hit_rate", "gauge", "share of pack loads the prefetcher finished in time",
           [("", float(m.prefetch_hit_rate))])
    metric("bytes_read_total", "counter", "stored bytes read from the archive", [("", m.bytes_read)])
    metric("bytes_uploaded_total", "counter", "bytes placed into the device tier", [("", m.bytes_uploaded)])
    metric("stall_seconds_total", "counter", "seconds the executor waited for packs", [("", float(m.stall_seconds))])
    return "\n".join(lines) + "\n"


class _Gate:
    """Outermost ASGI layer: counts requests by endpoint and status, checks the API key and
    the declared body size, and turns uncaught errors into JSON."""

    def __init__(self, app: Any, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
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
               prefill_chunk: int = 512) -> Any:
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
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={ApiError: _api_error, HTTPException: _http_error, ClientDisconnect: _disconnect,
                        Exception: _internal},
        lifespan=lifespan)
    app.state.vk = state
    return _Gate(app, state)


# ---- running it ----


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket; OSError names the address if it is taken."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind {host}:{port}: {e.strerror}") from None
    return sock


class BackgroundServer:
    """uvicorn serving `app` on a thread (tests, benchmarks). Port 0 picks a free port.

    Example:
        >>> with BackgroundServer(create_app(eng, "m")) as srv:   # doctest: +SKIP
        ...     httpx.get(srv.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="vkpack-uvicorn", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
