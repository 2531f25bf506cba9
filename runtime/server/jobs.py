"""The bridge between one HTTP request and the scheduler thread: submit, relay events, cancel on disconnect.

A `Job` submits a `GenRequest` and receives its events (`Piece`s, then one `Finished` per choice,
or one `Failed`) on an asyncio queue; the handler either collects them (`collect`) or streams them
as server-sent events (`SseResponse`). A client that goes away cancels its sequence, so its batch
slot and KV cache are freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from .batch import Event, Failed, Finished, GenRequest, Piece, PromptLogprobs, QueueFull, Scheduler, SchedulerStopped
from .logprobs import TokenLogprob
from .parse import ApiError, error_body


class Job:
    """One submitted generation: events arrive on an asyncio queue; a client disconnect cancels it.

    `on_end` sees each choice's `Finished`, or the one `Failed`, on the event loop. The job is done
    when every choice has finished or the request failed.
    """

    def __init__(self, scheduler: Scheduler, req_args: dict[str, Any], receive: Callable[[], Any],
                 on_end: Callable[[Finished | Failed], None]):
        self.scheduler, self.on_end = scheduler, on_end
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.req = GenRequest(emit=self._emit, **req_args)
        self.ended = 0                      # choices finished
        self.receive = receive
        self.watcher: asyncio.Task | None = None
        self.done = False

    def _emit(self, event: Event) -> None:  # scheduler thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # event loop closed: the server is shutting down
            self.scheduler.cancel(self.req)

    def start(self) -> None:
        try:
            self.scheduler.submit(self.req)
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
                    self.scheduler.cancel(self.req)
                    self.queue.put_nowait(None)
                return

    async def events(self) -> AsyncIterator[Event]:
        """Pieces, then a Finished per choice or one Failed; stops early (without them) on disconnect."""
        try:
            while True:
                ev = await self.queue.get()
                if ev is None:
                    return
                if isinstance(ev, Finished):
                    self.ended += 1
                    self.done = self.ended == self.req.n
                    self.on_end(ev)
                elif isinstance(ev, Failed):
                    self.done = True
                    self.on_end(ev)
                yield ev
                if self.done:
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.scheduler.cancel(self.req)
        if self.watcher is not None:
            self.watcher.cancel()


class SseResponse:
    """ASGI response that waits for the first event, so an early failure is a JSON error with
    its own status; after that, `data: {json}` events, ending with `data: [DONE]`."""

    def __init__(self, job: Job, render: Callable[[Event | None], list[dict[str, Any]]]):
        self.job, self.render = job, render

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        events = self.job.events()
        try:
            first = await anext(events, None)
            if first is None:
                return  # the client left while queued
            if isinstance(first, Failed):
                await failed_response(first)(scope, receive, send)
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


def failed_response(ev: Failed) -> JSONResponse:
    return JSONResponse(error_body(ev.status, ev.message, ev.type, None, ev.code), status_code=ev.status)


@dataclass
class Choice:
    """One choice as collected: its text, its tokens' logprobs (when asked for) and how it ended."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    end: Finished | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class Collected:
    """A whole non-streamed generation: every choice, the prompt's logprobs (echo), or the failure."""

    choices: list[Choice]
    prompt: tuple[TokenLogprob | None, ...] | None = None
    failed: Failed | None = None

    @property
    def complete(self) -> bool:
        return self.failed is None and all(c.end is not None for c in self.choices)


async def collect(job: Job) -> Collected:
    """Every event of `job` until it is done (or the client left: then `complete` is False)."""
    out = Collected([Choice() for _ in range(job.req.n)])
    async with contextlib.aclosing(job.events()) as events:
        async for ev in events:
            if isinstance(ev, Piece):
                out.choices[ev.index].parts.append(ev.text)
                out.choices[ev.index].logprobs.extend(ev.logprobs)
            elif isinstance(ev, PromptLogprobs):
                out.prompt = ev.entries
            elif isinstance(ev, Finished):
                out.choices[ev.index].end = ev
            else:
                out.failed = ev
    return out
