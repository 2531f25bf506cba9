"""The server's counters and gauges (scheduler, device and RAM tiers, pack streaming) as Prometheus text.

Served at GET /metrics; docs/SERVER.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import Scheduler


def prometheus_text(scheduler: Scheduler, engine: Any, requests: Iterable[tuple[tuple[str, int], int]]) -> str:
    """The server's counters and gauges in Prometheus text exposition format.

    Args:
        scheduler: the batch `Scheduler` (token, step, queue and finish counters).
        engine: the served Engine (tiers and pack-streaming metrics).
        requests: ((endpoint, status), count) pairs, in the order to print.
    """
    sch, eng = scheduler, engine
    m = eng.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP vkpack_{name} {help}")
        lines.append(f"# TYPE vkpack_{name} {kind}")
        for labels, v in samples:
            lines.append(f"vkpack_{name}{labels} {v:g}" if isinstance(v, float) else f"vkpack_{name}{labels} {v}")

    metric("requests_total", "counter", "HTTP requests by endpoint and status",
           [(f'{{endpoint="{ep}",status="{st}"}}', n) for (ep, st), n in requests])
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
    _placement(metric, eng.backend.placement())
    return "\n".join(lines) + "\n"



def _placement(metric: Any, info: dict[str, Any]) -> None:
    """A hybrid backend's measured rates and plans (runtime/hybrid): nothing for other backends."""
    rates = info.get("rates")
    if rates:
        metric("rate_link_bytes_per_second", "gauge", "measured host->device copy rate", [("", float(rates["link"]))])
        metric("rate_gpu_read_bytes_per_second", "gauge", "measured GPU memory read rate",
               [("", float(rates["gpu_read"]))])
        metric("rate_cpu_bytes_per_second", "gauge", "measured native CPU product rate in stored weight bytes, "
               "by weight type and tokens", [(f'{{dtype="{dt}",tokens="{b}"}}', float(r))
                                             for dt, by in sorted(rates["cpu"].items()) for b, r in sorted(by.items())])
    if info:
        metric("plan_cpu_steps", "gauge", "graph steps the hybrid plan computes on the CPU, by pass size",
               [(f'{{tokens="{p["tokens"]}"}}', len(p["cpu_steps"])) for p in info["plans"]])
        metric("plan_expected_seconds", "gauge", "the plan's expected pass time, by pass size",
               [(f'{{tokens="{p["tokens"]}"}}', float(p["expected_seconds"])) for p in info["plans"]])
        metric("hybrid_passes_total", "counter", "passes by where they ran",
               [(f'{{kind="{k}"}}', v) for k, v in sorted(info["passes"].items())])
