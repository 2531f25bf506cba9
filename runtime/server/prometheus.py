"""GET /metrics through prometheus_client: one CollectorRegistry per app, so two servers in one process never clash.

Two kinds of metrics, each counted once:
- what other parts already count (the scheduler's tokens and steps, the device and RAM tiers, pack
  streaming, the hybrid backend's rates and plans) is read when scraped, by `_Snapshot`;
- request latencies (time to first token, between tokens, whole request, queued) are observed by the
  scheduler thread as they happen, into the histograms of its `RequestLatency`.

docs/SERVER.md ("Metrics") lists every metric with its type and labels; tests/test_server_metrics.py
checks that list against a live scrape.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from .batch import Event, Scheduler

# Seconds, 1-2.5-5 per decade from 1 ms (a decode step of a small model) to 60 s (a long request on a CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)


class RequestLatency:
    """Latency histograms, fed by the scheduler thread (`tokens`, `ended`) and read by any scrape.

    Observed per sequence: a request with `n` choices counts n times. Times run from
    `GenRequest.submitted`: the request reached the scheduler, its prompt already tokenized. A
    sequence that is cancelled or fails still adds its tokens' latencies, but no duration.
    """

    def __init__(self) -> None:
        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=None)  # registered per app, later
        self.ttft = hist("vkpack_time_to_first_token_seconds", "submitted -> first generated token")
        self.inter_token = hist("vkpack_inter_token_latency_seconds",
                                "time between two generated tokens of one sequence (per output token)")
        self.duration = hist("vkpack_request_duration_seconds", "submitted -> finished, for sequences that finished")
        self.queue = hist("vkpack_request_queue_seconds", "submitted -> first admitted to the batch, for sequences "
                          "that finished")
        self._last: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()  # seq -> its last token

    def histograms(self) -> list[Histogram]:
        return [self.ttft, self.inter_token, self.duration, self.queue]

    def tokens(self, seq: Any, n: int) -> None:
        """`n` tokens were just sampled for `seq` (the scheduler's `_Seq`, whose `req` is a GenRequest)."""
        if n <= 0:
            return
        now = time.perf_counter()
        last = self._last.get(seq)
        if last is None:
            self.ttft.observe(now - seq.req.submitted)
            n -= 1
            last = now
        for _ in range(n):  # one observation per token, as vLLM's inter-token histogram
            self.inter_token.observe((now - last) / n)
        self._last[seq] = now

    def ended(self, seq: Any, event: Event | None) -> None:
        """`seq` left the scheduler with `event` (None: cancelled); only a `Finished` one has a duration."""
        from .batch import Finished

        self._last.pop(seq, None)
        if isinstance(event, Finished):
            self.duration.observe(time.perf_counter() - seq.req.submitted)
            self.queue.observe(event.queue_seconds)


class _Snapshot:
    """A collector that reads what the scheduler, the engine and the HTTP gate already count, at each scrape."""

    def __init__(self, scheduler: Scheduler, engine: Any,
                 requests: Callable[[], Iterable[tuple[tuple[str, int], int]]]):
        self.scheduler, self.engine, self.requests = scheduler, engine, requests

    def collect(self) -> Iterator[Metric]:
        sch, eng = self.scheduler, self.engine
        m = eng.metrics
        yield _family(CounterMetricFamily, "requests_total", "HTTP requests by endpoint and status",
                      ["endpoint", "status"], [((ep, str(st)), n) for (ep, st), n in self.requests()])
        yield _one(CounterMetricFamily, "prompt_tokens_total", "prompt tokens prefilled", sch.prompt_tokens)
        yield _one(CounterMetricFamily, "generation_tokens_total", "tokens generated", sch.generated_tokens)
        tps = sch.generated_tokens / sch.step_seconds if sch.step_seconds else 0.0
        yield _one(GaugeMetricFamily, "generation_tokens_per_second", "tokens generated per second of batch-step time",
                   tps)
        yield _one(CounterMetricFamily, "batch_steps_total", "forward_batch calls", sch.steps)
        yield _one(CounterMetricFamily, "batch_step_seconds_total", "seconds spent in forward_batch", sch.step_seconds)
        yield _family(CounterMetricFamily, "finished_total", "sequences ended, by reason", ["reason"],
                      [((k,), v) for k, v in sorted(sch.finished.items())])
        yield _one(CounterMetricFamily, "kv_waits_total", "requests that had to wait for KV room in the device budget",
                   sch.kv_waits)
        yield _one(CounterMetricFamily, "preemptions_total", "sequences whose KV was dropped (and later recomputed) "
                   "so that the weights could stream", sch.preemptions)
        pc = sch.prefix
        yield _one(CounterMetricFamily, "prompt_tokens_cached_total", "prompt tokens whose KV came from the prefix "
                   "cache (usage's cached_tokens)", sch.prompt_tokens_cached)
        yield _one(CounterMetricFamily, "prefix_cache_hits_total", "prefills that started from a cached prefix",
                   pc.hits)
        yield _one(CounterMetricFamily, "prefix_cache_misses_total", "prefills that looked for a cached prefix and "
                   "found none", pc.misses)
        yield _one(CounterMetricFamily, "prefix_cache_evictions_total", "kept sessions released to make room",
                   pc.evictions)
        retained = list(pc.retained)   # a copy: the scheduler thread may change it meanwhile
        yield _one(GaugeMetricFamily, "prefix_cache_sessions", "finished sequences' KV sessions kept for reuse",
                   len(retained))
        yield _one(GaugeMetricFamily, "prefix_cache_bytes", "device tier bytes those sessions hold",
                   sum(h.nbytes for h in retained))
        yield _one(GaugeMetricFamily, "queue_depth", "requests waiting for a batch slot", sch.queue_depth)
        yield _one(GaugeMetricFamily, "active_sequences", "sequences in the running batch", sch.active)
        yield _one(GaugeMetricFamily, "max_batch", "most sequences decoded together", sch.max_batch)
        yield _one(GaugeMetricFamily, "device_bytes_in_use", "bytes allocated in the device tier (packs, KV, "
                   "activations)", eng.tier.in_use)
        yield _one(GaugeMetricFamily, "device_bytes_peak", "peak bytes allocated in the device tier", eng.tier.peak)
        yield _one(GaugeMetricFamily, "device_budget_bytes", "device tier budget", eng.tier.budget)
        yield _one(GaugeMetricFamily, "ram_bytes_in_use", "decoded pack bytes cached in the RAM tier", eng.ram.in_use)
        if eng.ram.budget is not None:
            yield _one(GaugeMetricFamily, "ram_budget_bytes", "RAM tier budget", eng.ram.budget)
        yield _one(GaugeMetricFamily, "prefetch_hit_rate", "share of pack loads the prefetcher finished in time",
                   m.prefetch_hit_rate)
        yield _one(CounterMetricFamily, "bytes_read_total", "stored bytes read from the archive", m.bytes_read)
        yield _one(CounterMetricFamily, "bytes_uploaded_total", "bytes placed into the device tier", m.bytes_uploaded)
        yield _one(CounterMetricFamily, "stall_seconds_total", "seconds the executor waited for packs",
                   m.stall_seconds)
        stats = eng.stats()   # the moe ops' choices (0 for an archive without experts)
        yield _one(CounterMetricFamily, "expert_hits_total", "chosen experts already in the device tier",
                   stats["expert_hits"])
        yield _one(CounterMetricFamily, "expert_misses_total", "chosen experts that had to be loaded",
                   stats["expert_misses"])
        yield from _placement(eng.backend.placement())


def _placement(info: dict[str, Any]) -> Iterator[Metric]:
    """A hybrid backend's measured rates and plans (runtime/hybrid); nothing for other backends."""
    rates = info.get("rates")
    if rates:
        yield _one(GaugeMetricFamily, "rate_link_bytes_per_second", "measured host->device copy rate", rates["link"])
        yield _one(GaugeMetricFamily, "rate_gpu_read_bytes_per_second", "measured GPU memory read rate",
                   rates["gpu_read"])
        yield _family(GaugeMetricFamily, "rate_cpu_bytes_per_second", "measured native CPU product rate in stored "
                      "weight bytes, by weight type and tokens", ["dtype", "tokens"],
                      [((dt, str(b)), r) for dt, by in sorted(rates["cpu"].items()) for b, r in sorted(by.items())])
    if info:
        plans = info["plans"]
        yield _family(GaugeMetricFamily, "plan_cpu_steps", "graph steps the hybrid plan computes on the CPU, by pass "
                      "size", ["tokens"], [((str(p["tokens"]),), len(p["cpu_steps"])) for p in plans])
        yield _family(GaugeMetricFamily, "plan_expected_seconds", "the plan's expected pass time, by pass size",
                      ["tokens"], [((str(p["tokens"]),), p["expected_seconds"]) for p in plans])
        yield _family(CounterMetricFamily, "hybrid_passes_total", "passes by where they ran", ["kind"],
                      [((k,), v) for k, v in sorted(info["passes"].items())])
        yield _family(CounterMetricFamily, "expert_misses_by_side_total", "chosen experts missing on the device, "
                      "by where they were computed (a mixture of experts on the hybrid backend)", ["side"],
                      [(("cpu",), info["experts_on_cpu"]), (("link",), info["experts_over_link"])])


def _one(kind: Any, name: str, doc: str, value: float) -> Metric:
    return kind(f"vkpack_{name}", doc, value=float(value))


def _family(kind: Any, name: str, doc: str, labels: list[str], samples: Iterable[tuple[tuple[str, ...], float]]
            ) -> Metric:
    fam = kind(f"vkpack_{name}", doc, labels=labels)
    for values, v in samples:
        fam.add_metric(list(values), float(v))
    return fam


def server_registry(scheduler: Scheduler, engine: Any,
                    requests: Callable[[], Iterable[tuple[tuple[str, int], int]]]) -> CollectorRegistry:
    """The registry of one app: the snapshot collector and the scheduler's latency histograms.

    Args:
        scheduler: the app's batch `Scheduler` (counters, and `latency`, its `RequestLatency`).
        engine: the served Engine (tiers, pack streaming, the backend's placement).
        requests: returns ((endpoint, status), count) pairs: the gate's request counts.
    """
    registry = CollectorRegistry()
    registry.register(_Snapshot(scheduler, engine, requests))
    for h in scheduler.latency.histograms():
        registry.register(h)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The scrape body and its content type: Prometheus text 0.0.4, or OpenMetrics when `accept` asks for it
    (Prometheus itself does), as prometheus_client's own HTTP handler negotiates."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type
