"""Continuous batching: one thread owns the engine and decodes every running sequence together.

The engine is not thread-safe, so a single scheduler thread does all model work. Requests
arrive from any thread through `submit()` into a bounded FIFO queue; between two steps the
scheduler drops cancelled sequences, finishes done ones, and admits waiting ones while fewer
than `max_batch` run and the device tier can hold one more KV cache (`kv_session` raising
BudgetError means "wait until a running sequence frees its KV"). Each step is ONE
`forward_batch` call: every decoding sequence contributes its last token, and sequences still
in prefill contribute the next chunk of their prompt, so one weight stream serves them all.

Results leave through each request's `emit` callback (called on the scheduler thread):
`Piece(text)` zero or more times, then exactly one `Finished` or `Failed`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...pack_format.errors import VkpackError
from ..sampler import SamplingParams
from ..tiers import BudgetError

log = logging.getLogger(__name__)
# One INFO line per finished request, llama-server's timings (`--log-level INFO` shows them).
request_log = logging.getLogger("vkpack.runtime.server.requests")


# ---- events sent back to the requester ----


@dataclass(frozen=True)
class Piece:
    """Newly completed text (never a broken UTF-8 character, never part of a stop string)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The sequence ended: reason "stop" (EOS or a stop string) or "length" (max_tokens)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float = 0.0    # submitted -> first admitted to the batch
    prompt_seconds: float = 0.0   # admitted -> the step that completed its prompt
    gen_seconds: float = 0.0      # that step -> finished (sampling every generated token)

    def log_line(self, label: str) -> str:
        """llama-server's per-request numbers on one line: prompt and generation tokens and tok/s, total time."""
        def rate(n: int, t: float) -> str:
            return f"{n / t:.1f} tok/s" if t > 0 else "- tok/s"
        total = self.queue_seconds + self.prompt_seconds + self.gen_seconds
        return (f"{label or 'request'}: prompt {self.prompt_tokens} tok in {self.prompt_seconds * 1e3:.1f} ms "
                f"({rate(self.prompt_tokens, self.prompt_seconds)}), generated {self.completion_tokens} tok in "
                f"{self.gen_seconds * 1e3:.1f} ms ({rate(self.completion_tokens, self.gen_seconds)}), total "
                f"{total * 1e3:.1f} ms (queued {self.queue_seconds * 1e3:.1f} ms), finish {self.reason}")


@dataclass(frozen=True)
class Failed:
    """The request could not be served; `status` is the HTTP status the server should answer."""

    status: int
    message: str
    type: str = "server_error"
    code: str | None = None


Event = Piece | Finished | Failed


class QueueFull(VkpackError):
    """The waiting queue is at its bound; the caller should answer 503."""


class SchedulerStopped(VkpackError):
    """The scheduler is not running (stopped, or its thread died)."""


@dataclass(eq=False)
class GenRequest:
    """One generation: prompt token ids and sampling settings, and where to send events.

    `max_tokens` must already be capped so that len(prompt_ids) + max_tokens <= the
    engine's context; the scheduler reserves a KV cache of exactly that many positions.
    """

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    label: str = ""                       # names the request in the log (the response id)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def n_ctx(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


class _Seq:
    """One request inside the scheduler: its token stream (sampler, detokenizer, stop strings: the
    engine's own per-token loop, runtime/generation.py) and, while admitted, its KV session.

    `stream.history` is every token the KV cache must eventually hold (prompt + generated); `pos` is
    how many it holds. Prefill and decode are one thing: feed the unfed tail, and once the cache has
    caught up, sample the next token. A preempted sequence drops its KV and sets `pos` to 0, so
    on re-admission it re-feeds prompt and output (recompute) and carries on where it was.
    """

    def __init__(self, req: GenRequest, engine: Any):
        self.req = req
        self.session: Any = None              # the engine's KvSession while admitted
        self.kv: Any = None
        self.reserved = 0                     # bytes the session holds in the device tier
        self.stream = engine.token_stream(req.prompt_ids, req.params, req.max_tokens, req.stop, req.ignore_eos)
        self.history = self.stream.history
        self.pos = 0
        self.started = False                  # admitted at least once
        self.kv_waited = False                # had to wait for KV room at least once
        self.t_admitted = 0.0                 # perf_counter at the first admission
        self.t_prompt_done: float | None = None   # ... at the end of the step that completed the prompt

    @property
    def generated(self) -> int:
        return len(self.stream.generated)

    @property
    def unfed(self) -> int:
        return len(self.history) - self.pos


class Scheduler:
    """Owns an Engine on one thread and runs continuous batching over submitted requests.

    Args:
        engine: a loaded Engine; nothing else may use it while the scheduler runs.
        max_batch: most sequences decoded together.
        max_queue: most requests waiting for a slot; `submit` raises QueueFull beyond it.
        prefill_chunk: most prompt tokens fed in one step (all prefilling sequences together),
            so a long prompt does not stall the sequences already decoding.

    Example:
        >>> sched = Scheduler(eng, max_batch=8).start()                      # doctest: +SKIP
        >>> sched.submit(GenRequest(ids, SamplingParams(temperature=0), 16, print))  # doctest: +SKIP
    """

    def __init__(self, engine: Any, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"max_batch {max_batch} and prefill_chunk {prefill_chunk} must be >= 1, "
                             f"max_queue {max_queue} >= 0")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._cap = max_batch                  # lowered after a preemption, raised as sequences finish
        # Room the weights need beside all KV reservations: two of the largest packs (the engine's minimum).
        self._pack_room = engine.weight_room_bytes
        self.error: str | None = None          # why the thread died, if it did
        # counters (written by the scheduler thread only; reads from elsewhere are racy but atomic)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.kv_waits = 0                      # requests that waited for KV room in the device budget
        self.preemptions = 0                   # sequences whose KV was dropped to let the others proceed
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}

    # ---- any thread ----
    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="vkpack-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; pending requests get Failed(503)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    def submit(self, req: GenRequest) -> None:
        """Queue a request; raises QueueFull or SchedulerStopped instead of queueing."""
        if not req.prompt_ids:
            raise ValueError("empty prompt")
        if req.n_ctx > self.engine.context:
            raise ValueError(f"prompt {len(req.prompt_ids)} + max_tokens {req.max_tokens} tokens exceed "
                             f"the context of {self.engine.context}")
        seq = _Seq(req, self.engine)
        with self._cv:
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):  # queueing before start() is fine
                raise SchedulerStopped(f"the batch scheduler is not running{': ' + self.error if self.error else ''}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self._waiting)} requests are already waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            self._waiting.append(seq)
            self._cv.notify_all()

    def cancel(self, req: GenRequest) -> None:
        """Ask the scheduler to drop `req` (waiting or running) before its next step."""
        req.cancelled.set()
        with self._cv:
            self._cv.notify_all()

    # ---- the scheduler thread ----
    def _main(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and not self._running and not self._waiting:
                        self._cv.wait()
                    if self._stopping:
                        break
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._step()
        except BaseException as e:  # a bug, not a request's fault: report it on /health
            log.exception("batch scheduler died")
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self._cv:
                self._stopping = True
                waiting, self._waiting = list(self._waiting), deque()
            reason = self.error or "server shutting down"
            for s in [*self._running, *waiting]:
                self._finish(s, Failed(503, reason, code="unavailable"))

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [s for s in self._waiting if s.req.cancelled.is_set()]
            for s in gone:
                self._waiting.remove(s)
        gone += [s for s in self._running if s.req.cancelled.is_set()]
        for s in gone:
            self._finish(s, None)
            self.finished["cancelled"] += 1

    def _admit(self) -> None:
        """Move waiting sequences into the batch while a slot and KV room exist (FIFO)."""
        while len(self._running) < min(self.max_batch, self._cap):
            with self._cv:
                if not self._waiting:
                    return
                s = self._waiting[0]
            try:
                self._reserve(s)
            except BudgetError as e:
                if self._running:
                    if not s.kv_waited:
                        s.kv_waited = True
                        self.kv_waits += 1
                    return  # wait for a running sequence to free its KV
                with self._cv:
                    self._waiting.popleft()
                self.finished["error"] += 1
                self._finish(s, Failed(
                    400, f"prompt + max_tokens ({s.req.n_ctx} tokens) need more KV cache than the device budget "
                         f"can hold even with nothing else running ({e}); lower max_tokens or raise --vram-gb",
                    type="invalid_request_error", code="context_length_exceeded"))
                continue
            with self._cv:
                self._waiting.popleft()
            if not s.started:
                s.started = True
                s.t_admitted = time.perf_counter()
                self.prompt_tokens += len(s.req.prompt_ids)
            self._running.append(s)

    def _reserve(self, s: _Seq) -> None:
        """Reserve `s`'s KV cache, keeping two packs of room for the weights beside all reservations.

        `kv_session` evicts unpinned packs to fit, so without the check the reservations could
        starve the next forward pass of room to stream its weights."""
        session = self.engine.kv_session(s.req.n_ctx)
        kv = session.__enter__()
        size = session.reserved_bytes
        reserved = size + sum(r.reserved for r in self._running)
        if reserved + self._pack_room > self.engine.tier.budget:
            session.__exit__(None, None, None)
            raise BudgetError(f"KV caches and activations of {reserved / 2**20:.1f} MiB would leave less than "
                              f"{self._pack_room / 2**20:.1f} MiB (two packs) of the "
                              f"{self.engine.tier.budget / 2**20:.1f} MiB device budget for streaming weights")
        s.session, s.kv, s.reserved = session, kv, size

    def _release(self, s: _Seq) -> None:
        if s.session is not None:
            s.session.__exit__(None, None, None)
        s.session, s.kv, s.reserved = None, None, 0

    def _step(self) -> None:
        """One forward_batch over every running sequence, then sample and emit.

        If the weights cannot be streamed next to all KV reservations (BudgetError), the step is
        tried once more as it is (packs still being prefetched are not evictable until they land),
        then the newest sequence is preempted and the step retried without it. Re-running a step
        is safe: it rewrites the same KV positions."""
        retried = False
        while True:
            batch: list[tuple[Sequence[int], int, Any]] = []
            members: list[_Seq] = []
            budget = self.prefill_chunk
            for s in self._running:
                n = s.unfed if s.unfed == 1 else min(budget, s.unfed)
                if n == 0:
                    continue  # its prompt continues next step
                if s.unfed > 1:
                    budget -= n
                batch.append((s.history[s.pos:s.pos + n], s.pos, s.kv))
                members.append(s)
            t0 = time.perf_counter()
            try:
                logits = self.engine.forward_batch(batch)
                break
            except BudgetError as e:
                if not retried:
                    retried = True
                    log.info("batch step hit the device budget (%s); retrying once", e)
                    continue
                if len(self._running) == 1:
                    self._fail(members, f"the device budget cannot stream the weights next to this request's KV "
                                        f"cache: {e}")
                    return
                self._preempt(self._running[-1])
            except Exception as e:
                log.exception("forward_batch failed")
                self._fail(members, f"generation failed: {type(e).__name__}: {e}")
                return
            finally:
                self.step_seconds += time.perf_counter() - t0
                self.steps += 1
        for row, (s, (toks, _, _)) in enumerate(zip(members, batch)):
            s.pos += len(toks)
            if s.unfed:
                continue  # still prefilling
            if s.t_prompt_done is None:
                s.t_prompt_done = time.perf_counter()
            try:
                self._advance(s, logits[row])
            except Exception as e:  # NaN logits or the like: this sequence only
                log.exception("sampling failed")
                self._fail([s], f"sampling failed: {type(e).__name__}: {e}")

    def _preempt(self, s: _Seq) -> None:
        self._running.remove(s)
        self._release(s)
        s.pos = 0
        self.preemptions += 1
        self._cap = max(1, len(self._running))
        with self._cv:
            self._waiting.appendleft(s)
        log.info("preempted a sequence (%d tokens) to fit the device budget; batch cap now %d",
                 len(s.history), self._cap)

    def _fail(self, seqs: list[_Seq], message: str) -> None:
        for s in seqs:
            self.finished["error"] += 1
            self._finish(s, Failed(500, message))

    def _advance(self, s: _Seq, logits: np.ndarray) -> None:
        """Sample one token for `s`, emit its text, and finish it if it is done."""
        before = s.generated
        piece = s.stream.push(logits)
        self.generated_tokens += s.generated - before
        if piece:
            _safe_emit(s.req, Piece(piece))
        reason = s.stream.finish_reason
        if reason is not None:
            self.finished[reason] += 1
            self._cap = min(self.max_batch, self._cap + 1)
            now = time.perf_counter()
            done = s.t_prompt_done if s.t_prompt_done is not None else now
            ev = Finished(reason, len(s.req.prompt_ids), s.generated, queue_seconds=s.t_admitted - s.req.submitted,
                          prompt_seconds=done - s.t_admitted, gen_seconds=now - done)
            request_log.info("%s", ev.log_line(s.req.label))
            self._finish(s, ev)

    def _finish(self, s: _Seq, event: Event | None) -> None:
        """Release the sequence's KV now, then tell the requester (unless it cancelled)."""
        if s in self._running:
            self._running.remove(s)
        self._release(s)
        if event is not None:
            _safe_emit(s.req, event)


def _safe_emit(req: GenRequest, event: Event) -> None:
    try:
        req.emit(event)
    except Exception:  # a consumer that went away must not take the scheduler down
        log.debug("emit failed", exc_info=True)
