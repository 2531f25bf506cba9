"""Continuous batching: one thread owns the engine and decodes every running sequence together.

The engine is not thread-safe, so a single scheduler thread does all model work. Requests
arrive from any thread through `submit()` into a bounded FIFO queue; between two steps the
scheduler drops cancelled sequences, finishes done ones, and admits waiting ones while fewer
than `max_batch` run and the device tier can hold one more KV cache (`kv_session` raising
BudgetError means "wait until a running sequence frees its KV"). Each step is ONE
`forward_batch` call: every decoding sequence contributes its last token, and sequences still
in prefill contribute the next chunk of their prompt, so one weight stream serves them all.

A request of `n` choices is n sequences that share one prefill: the first feeds the prompt, and
once its cache holds it the others copy those positions (`KvSession.copy_from`, the backend's
`copy_kv`; a choice admitted after the first has moved on prefills on its own).

With the prefix cache on (`prefix_cache`, prefix.py), a sequence about to prefill from position 0
first copies the longest run of full blocks it shares with a running sequence or a finished one kept
for that purpose. Kept sessions hold device budget only while nothing else needs it: admission
releases them (oldest first) before a request would wait for KV room, and a step that cannot stream
its weights releases them all before it retries or preempts.

Results leave through each request's `emit` callback (called on the scheduler thread):
`PromptLogprobs` once if asked for (echo with logprobs), `Piece(text, index)` zero or more times
per choice, then one `Finished` per choice, or one `Failed` for the whole request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from ...pack_format.errors import VkpackError
from ..sampler import SamplingParams
from ..tiers import BudgetError
from .logprobs import TokenLogprob, score
from .prefix import Holder, PrefixCache
from .prometheus import RequestLatency

log = logging.getLogger(__name__)
# One INFO line per finished request, llama-server's timings (`--log-level INFO` shows them).
request_log = logging.getLogger("vkpack.runtime.server.requests")


# ---- events sent back to the requester ----


@dataclass(frozen=True)
class Piece:
    """Choice `index`'s newly completed text (never a broken UTF-8 character, never part of a stop
    string) and, when the request asked for logprobs, one entry per token sampled since its last
    Piece (the text of a token may come in a later Piece, or never: a stop string)."""

    text: str
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Each prompt token's logprob given the tokens before it (the first has none: None); sent once,
    before any Piece, when the request set `prompt_logprobs` (the completions API's echo + logprobs)."""

    entries: tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class Finished:
    """Choice `index` ended: reason "stop" (EOS or a stop string) or "length" (max_tokens)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float = 0.0    # submitted -> first admitted to the batch
    prompt_seconds: float = 0.0   # admitted -> the step that completed its prompt
    gen_seconds: float = 0.0      # that step -> finished (sampling every generated token)
    index: int = 0
    cached_tokens: int = 0        # the request's prompt positions copied from the prefix cache

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


Event = Piece | PromptLogprobs | Finished | Failed


class LogitsMask(Protocol):
    """A per-sequence constraint on the next token, e.g. grammar-constrained decoding (JSON schemas,
    tool calls): the hook for a module that only knows about tokens, not about batching.

    For every token a sequence samples, the scheduler thread calls `apply(logits)` just before
    sampling and uses what it returns (float32 [vocab], forbidden tokens at -inf; never modify the
    argument in place: it is a row of the batch's logits, and logprobs are computed from it, so
    they stay the model's raw distribution), then `accept(token)` with the id drawn, EOS included,
    so the constraint can advance. A preempted sequence is recomputed without sampling again, so
    neither is called twice for one position. An exception fails that request (500), no other.
    """

    def apply(self, logits: np.ndarray) -> np.ndarray: ...

    def accept(self, token: int) -> None: ...


class QueueFull(VkpackError):
    """The waiting queue is at its bound; the caller should answer 503."""


class SchedulerStopped(VkpackError):
    """The scheduler is not running (stopped, or its thread died)."""


@dataclass(eq=False)
class GenRequest:
    """One generation: prompt token ids and sampling settings, and where to send events.

    `max_tokens` must already be capped so that len(prompt_ids) + max_tokens <= the
    engine's context; the scheduler reserves a KV cache of exactly that many positions
    for each of the `n` choices. Choice i samples with seed `params.seed + i`, so choice 0
    is what n=1 gives and any choice can be reproduced alone.

    logprobs: None, or k: each sampled token's logprob and the k most likely (Piece.logprobs).
    prompt_logprobs: None, or k: the same for every prompt token (one PromptLogprobs event).
    logits_mask: makes one `LogitsMask` per choice, called by `submit` (None: no constraint).
    keep_special: special token ids whose text stays in the output (tool-call markers, for the parser).
    """

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    label: str = ""                       # names the request in the log (the response id)
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logits_mask: Callable[[], LogitsMask] | None = None
    keep_special: tuple[int, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def n_ctx(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


class _Group:
    """The choices of one request: who prefills the prompt, and whether its logprobs went out."""

    def __init__(self, req: GenRequest):
        self.seqs: list[_Seq] = []
        self.prompt_sent = req.prompt_logprobs is None   # nothing to send, or sent
        self.failed = False
        self.cached_tokens = 0      # prompt positions the first choice took from the prefix cache
        self.looked_up = False      # the first choice tried the prefix cache


class _Seq:
    """One choice of a request inside the scheduler: its token stream (sampler, detokenizer, stop
    strings: the engine's own per-token loop, runtime/generation.py) and, while admitted, its KV session.

    `stream.history` is every token the KV cache must eventually hold (prompt + generated); `pos` is
    how many it holds. Prefill and decode are one thing: feed the unfed tail, and once the cache has
    caught up, sample the next token. A preempted sequence drops its KV and sets `pos` to 0, so
    on re-admission it re-feeds prompt and output (recompute) and carries on where it was.
    """

    def __init__(self, req: GenRequest, engine: Any, group: _Group, index: int):
        self.req, self.group, self.index = req, group, index
        self.session: Any = None              # the engine's KvSession while admitted
        self.kv: Any = None
        self.holder: Holder | None = None     # the session in the prefix index, while admitted
        self.looked_up = False                # tried the prefix cache since its last admission
        self.reserved = 0                     # bytes the session holds in the device tier
        params = req.params if index == 0 or req.params.seed is None else replace(req.params, seed=req.params.seed + index)
        self.stream = engine.token_stream(req.prompt_ids, params, req.max_tokens, req.stop, req.ignore_eos)
        if req.keep_special:
            self.stream.keep_special(req.keep_special)
        self.mask = req.logits_mask() if req.logits_mask is not None else None
        self.history = self.stream.history
        self.n_prompt = len(req.prompt_ids)
        self.pos = 0
        self.shares = index > 0               # may still copy the first choice's prompt instead of prefilling
        self.prompt_lp: list[TokenLogprob | None] = [None] * self.n_prompt   # while scoring the prompt
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

    @property
    def scoring(self) -> bool:
        """Feeding its prompt one position per row, for the prompt's logprobs (nobody sent them yet)."""
        return not self.group.prompt_sent and self.pos < self.n_prompt


class Scheduler:
    """Owns an Engine on one thread and runs continuous batching over submitted requests.

    Args:
        engine: a loaded Engine; nothing else may use it while the scheduler runs.
        max_batch: most sequences decoded together.
        max_queue: most requests waiting for a slot; `submit` raises QueueFull beyond it.
        prefill_chunk: most prompt tokens fed in one step (all prefilling sequences together),
            so a long prompt does not stall the sequences already decoding.
        prefix_cache: reuse the KV of prompt blocks a running or recently finished sequence holds
            (prefix.py); at most `max_batch` finished sessions are kept. Needs the Engine's sessions
            (runtime/kv.py); `vkpack serve` turns it on.

    Example:
        >>> sched = Scheduler(eng, max_batch=8).start()                      # doctest: +SKIP
        >>> sched.submit(GenRequest(ids, SamplingParams(temperature=0), 16, print))  # doctest: +SKIP
    """

    def __init__(self, engine: Any, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512,
                 prefix_cache: bool = False):
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
        self.prompt_tokens_copied = 0          # prompt positions of n > 1 choices copied instead of computed
        self.prompt_tokens_cached = 0          # prompt positions taken from the prefix cache (usage's cached_tokens)
        self.prefix_cache = prefix_cache
        self.prefix = PrefixCache(max_batch)   # its counters read 0 while the cache is off
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}
        self.latency = RequestLatency()        # TTFT, inter-token and duration histograms for /metrics

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
        if req.n < 1:
            raise ValueError(f"n must be >= 1, got {req.n}")
        group = _Group(req)
        group.seqs = [_Seq(req, self.engine, group, i) for i in range(req.n)]
        with self._cv:
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):  # queueing before start() is fine
                raise SchedulerStopped(f"the batch scheduler is not running{': ' + self.error if self.error else ''}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self._waiting)} requests are already waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            self._waiting.extend(group.seqs)  # a request is admitted while the queue has room, whatever its n
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
            self.prefix.clear()

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
                if s.index == 0:  # the prompt of n choices counts once
                    self.prompt_tokens += s.n_prompt
            self._running.append(s)

    def _reserve(self, s: _Seq) -> None:
        """Reserve `s`'s KV cache, keeping two packs of room for the weights beside all reservations.

        `kv_session` evicts unpinned packs to fit, so without the check the reservations could
        starve the next forward pass of room to stream its weights. Kept prefix-cache sessions count
        as reservations and go first (those sharing blocks with `s` last), so none makes `s` wait."""
        session = self.engine.kv_session(s.req.n_ctx, self.prefill_chunk)   # no pass feeds more: rings fit it
        budget, running = self.engine.tier.budget, sum(r.reserved for r in self._running)
        cache = self.prefix
        keep = cache.sharing(s.history) if cache.retained else set()
        while cache.retained and running + session.nbytes + cache.retained_bytes + self._pack_room > budget:
            cache.evict(keep)
        while True:
            try:
                kv = session.__enter__()
            except BudgetError:
                if cache.evict(keep):
                    continue
                raise
            reserved = session.reserved_bytes + running + cache.retained_bytes
            if reserved + self._pack_room <= budget or not cache.evict(keep):
                break
        if reserved + self._pack_room > budget:
            session.__exit__(None, None, None)
            raise BudgetError(f"KV caches and activations of {reserved / 2**20:.1f} MiB would leave less than "
                              f"{self._pack_room / 2**20:.1f} MiB (two packs) of the "
                              f"{budget / 2**20:.1f} MiB device budget for streaming weights")
        s.session, s.kv, s.reserved = session, kv, session.reserved_bytes
        s.looked_up = False
        if self.prefix_cache:
            s.holder = Holder(s.history, session)

    def _release(self, s: _Seq, retain: bool = False) -> None:
        """Free `s`'s KV session, or with `retain` keep it in the prefix cache (if it holds a full block)."""
        kept = False
        if s.holder is not None:
            kept = retain and self.prefix.retain(s.holder)
            if not kept:
                self.prefix.forget(s.holder)
            s.holder = None
        if s.session is not None and not kept:
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
            batch, members = self._plan_step()
            t0 = time.perf_counter()
            try:
                logits = self.engine.forward_batch(batch)
                break
            except BudgetError as e:
                if self.prefix.retained:   # kept prefix sessions give their room first
                    log.info("batch step hit the device budget (%s); releasing %d prefix-cache sessions",
                             e, len(self.prefix.retained))
                    while self.prefix.evict():
                        pass
                    continue
                if not retried:
                    retried = True
                    log.info("batch step hit the device budget (%s); retrying once", e)
                    continue
                if len(self._running) == 1:
                    self._fail([m[0] for m in members], f"the device budget cannot stream the weights next "
                                                         f"to this request's KV cache: {e}")
                    return
                self._preempt(self._running[-1])
            except Exception as e:
                log.exception("forward_batch failed")
                self._fail([m[0] for m in members], f"generation failed: {type(e).__name__}: {e}")
                return
            finally:
                self.step_seconds += time.perf_counter() - t0
                self.steps += 1
        for s, row, n, scored in members:
            try:
                self._took(s, logits, row, n, scored)
            except Exception as e:  # NaN logits or the like: this sequence only
                log.exception("sampling failed")
                self._fail([s], f"sampling failed: {type(e).__name__}: {e}")

    def _plan_step(self) -> tuple[list[tuple[Sequence[int], int, Any]], list[tuple[_Seq, int, int, bool]]]:
        """The step's batch entries, and per member (sequence, its first logits row, tokens fed, scored).

        A decoding sequence feeds its last token; one in prefill the next chunk of what its cache
        lacks (all prefills together at most `prefill_chunk` tokens). While a sequence scores its
        prompt, each position is an entry of its own (same KV), so every position gets logits."""
        batch: list[tuple[Sequence[int], int, Any]] = []
        members: list[tuple[_Seq, int, int, bool]] = []
        budget = self.prefill_chunk
        for s in self._running:
            if self._waits_for_prompt(s):
                continue
            if s.pos == 0 and budget > 0 and not s.looked_up and self.prefix_cache and not s.scoring:
                self._reuse_prefix(s)
            n = s.unfed if s.unfed == 1 else min(budget, s.unfed)
            scored = s.scoring
            if scored:
                n = min(n, s.n_prompt - s.pos)
            if n == 0:
                continue  # its prompt continues next step
            if s.unfed > 1:
                budget -= n
            members.append((s, len(batch), n, scored))
            if scored:
                batch.extend((s.history[p:p + 1], p, s.kv) for p in range(s.pos, s.pos + n))
            else:
                batch.append((s.history[s.pos:s.pos + n], s.pos, s.kv))
        return batch, members

    def _waits_for_prompt(self, s: _Seq) -> bool:
        """Whether choice `s` > 0 should wait for the first choice's prefill and copy it, rather than
        prefill on its own; copies now if the first holds exactly the prompt."""
        if not s.shares or s.pos != 0:
            return False
        lead = s.group.seqs[0]
        if lead.session is None or lead.pos > lead.n_prompt:
            s.shares = False  # prefill on its own
            return False
        if lead.pos == lead.n_prompt:
            self._copy_prompt(lead, s)
            return False
        return True

    def _copy_prompt(self, lead: _Seq, s: _Seq) -> None:
        """`s` takes the prompt's KV from `lead`, then re-feeds the last prompt token for its own logits."""
        s.session.copy_from(lead.session, lead.n_prompt)
        s.pos = lead.n_prompt - 1
        s.shares = False
        self.prompt_tokens_copied += lead.n_prompt - 1
        if s.holder is not None:
            self.prefix.advance(s.holder, s.pos)

    def _reuse_prefix(self, s: _Seq) -> None:
        """Before `s` feeds position 0: copy the most full blocks of its tokens that a running or kept
        session holds (at least one token stays to feed, for the logits), and count the hit or miss."""
        s.looked_up = True
        cache = self.prefix
        src, n = cache.find(s.history, lambda h, n: h.session.serves(n, h.written))
        first = s.index == 0 and not s.group.looked_up   # usage counts the prompt's first lookup only
        s.group.looked_up = True
        if src is None:
            cache.misses += 1
            return
        s.session.copy_from(src.session, n)
        cache.hits += 1
        cache.touch(src)
        s.pos = n
        cache.advance(s.holder, n)
        if first:
            s.group.cached_tokens = min(n, s.n_prompt)
            self.prompt_tokens_cached += s.group.cached_tokens

    def _took(self, s: _Seq, logits: np.ndarray, row: int, n: int, scored: bool) -> None:
        """`s` fed `n` tokens whose logits start at `row` (one row each if `scored`, else one): score
        prompt positions, share the prompt with the other choices, and sample once the cache has caught up."""
        first, s.pos = s.pos, s.pos + n
        if s.holder is not None:
            self.prefix.advance(s.holder, s.pos)
        rows = n if scored else 1
        if scored and not s.group.prompt_sent:
            k = s.req.prompt_logprobs or 0
            for j in range(rows):
                p = first + j + 1  # row j predicts the token at position first + j + 1
                if p < s.n_prompt:
                    s.prompt_lp[p] = score(logits[row + j], s.history[p], k)
            if s.pos == s.n_prompt:
                s.group.prompt_sent = True
                _safe_emit(s.req, PromptLogprobs(tuple(s.prompt_lp)))
        last = logits[row + rows - 1]
        if s.index == 0 and first < s.n_prompt == s.pos:  # the prompt is in the first choice's cache now
            for sib in s.group.seqs[1:]:
                if sib.shares and sib.session is not None and sib.pos == 0:
                    self._copy_prompt(s, sib)
        if s.unfed:
            return  # still prefilling
        if s.t_prompt_done is None:
            s.t_prompt_done = time.perf_counter()
        self._advance(s, last)

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
        """Sample one token for `s` (through its LogitsMask, if any), emit its text and logprob,
        and finish it if it is done."""
        before = s.generated
        piece = s.stream.push(s.mask.apply(logits) if s.mask is not None else logits)
        token = s.stream.sampler.last_token
        if s.mask is not None:
            s.mask.accept(token)
        self.generated_tokens += s.generated - before
        self.latency.tokens(s, s.generated - before)
        lps: tuple[TokenLogprob, ...] = ()
        if s.req.logprobs is not None and s.generated > before:  # an EOS that ended it is no output token
            lps = (score(logits, token, s.req.logprobs),)
        if piece or lps:
            _safe_emit(s.req, Piece(piece, s.index, lps))
        reason = s.stream.finish_reason
        if reason is not None:
            self.finished[reason] += 1
            self._cap = min(self.max_batch, self._cap + 1)
            now = time.perf_counter()
            done = s.t_prompt_done if s.t_prompt_done is not None else now
            ev = Finished(reason, s.n_prompt, s.generated, queue_seconds=s.t_admitted - s.req.submitted,
                          prompt_seconds=done - s.t_admitted, gen_seconds=now - done, index=s.index,
                          cached_tokens=s.group.cached_tokens)
            request_log.info("%s", ev.log_line(s.req.label + (f"[{s.index}]" if s.req.n > 1 else "")))
            self._finish(s, ev)

    def _finish(self, s: _Seq, event: Event | None) -> None:
        """Release the sequence's KV now, then tell the requester (unless it cancelled). A failed
        choice fails its whole request: the others are cancelled, and one Failed is sent."""
        if s in self._running:
            self._running.remove(s)
        self._release(s, retain=isinstance(event, Finished))
        self.latency.ended(s, event)
        if isinstance(event, Failed):
            if s.group.failed:
                return
            s.group.failed = True
            if s.req.n > 1:
                s.req.cancelled.set()
        if event is not None:
            _safe_emit(s.req, event)


def _safe_emit(req: GenRequest, event: Event) -> None:
    try:
        req.emit(event)
    except Exception:  # a consumer that went away must not take the scheduler down
        log.debug("emit failed", exc_info=True)
