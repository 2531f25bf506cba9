"""Counters of one engine: what was streamed, what was hit, how long anything waited."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class Metrics:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    bytes_read: int = 0            # stored bytes read from the archive
    bytes_decompressed: int = 0    # decoded bytes produced by a codec
    bytes_uploaded: int = 0        # bytes placed into the device tier (compute form)
    read_seconds: float = 0.0
    upload_seconds: float = 0.0
    resident_hits: int = 0         # pack already resident from earlier use
    prefetch_hits: int = 0         # pack made resident ahead of time, in time
    prefetch_late: int = 0         # prefetch started but the executor had to wait
    misses: int = 0                # loaded on demand
    stall_seconds: float = 0.0     # executor time spent waiting for packs
    alloc_seconds: float = 0.0     # time finding room for packs (eviction planning), all threads
    prefetch_no_room: int = 0      # prefetches dropped: room only by evicting a pack needed sooner
    prefetch_errors: int = 0
    last_prefetch_error: str = ""
    peak_device_bytes: int = 0
    peak_ram_bytes: int = 0
    device_budget: int = 0
    ram_budget: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_read(self, stored: int, decompressed: int, seconds: float) -> None:
        with self._lock:
            self.bytes_read += stored
            self.bytes_decompressed += decompressed
            self.read_seconds += seconds

    def add_upload(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes_uploaded += nbytes
            self.upload_seconds += seconds

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def prefetch_hit_rate(self) -> float:
        loads = self.prefetch_hits + self.prefetch_late + self.misses
        return self.prefetch_hits / loads if loads else 1.0

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        d.update(prefill_tps=self.prefill_tps, decode_tps=self.decode_tps, prefetch_hit_rate=self.prefetch_hit_rate)
        return d
