"""One layer's K or V cache where a hybrid plan may compute that layer on either side.

The cache lives in the device tier (the session's reservation: a prefill streams every layer through
the GPU) and, for layers the CPU computes in some passes, in system memory too. Each copy knows how
many leading rows it holds current; before a layer runs on one side, the rows it lacks come from the
other (after a prefill on the GPU, the CPU layers' rows go down once; they come back up only if a later
pass runs those layers on the GPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import copy_spans


class HybridKv:
    """A device KvCache and, once the CPU needs it, a host array [n_ctx, width] float32. Both sides put
    position p at row p % n_ctx: a windowed layer's cache may be a ring of fewer rows than the session's
    positions (runtime/kv.py); for a full layer that is row p."""

    __slots__ = ("device", "device_rows", "host", "host_rows", "n_ctx", "width")

    def __init__(self, device: Any, n_ctx: int, width: int):
        self.device = device
        self.n_ctx, self.width = n_ctx, width   # n_ctx: the rows of either copy
        self.host: np.ndarray | None = None
        self.device_rows = 0   # positions [0, device_rows) current on the device (their last n_ctx held)
        self.host_rows = 0     # positions [0, host_rows) current in host memory

    def host_array(self) -> np.ndarray:
        if self.host is None:
            self.host = np.zeros((self.n_ctx, self.width), dtype=np.float32)
        return self.host

    def ready_on(self, on_host: bool, pos0: int, dev: Any) -> None:
        """Bring positions [0, pos0) up to date on one side before a pass there reads them: only the last
        n_ctx of them, the rows a ring still holds."""
        have, other = (self.host_rows, self.device_rows) if on_host else (self.device_rows, self.host_rows)
        if have >= pos0:
            return
        lo = max(have, pos0 - self.n_ctx)
        self._need(other, lo, pos0)
        sl, w = self.device.slice, self.width
        for a, b in self._row_spans(lo, pos0):
            if on_host:
                raw = dev.download(sl.buffer, (b - a) * w * 4, sl.offset + a * w * 4)
                self.host_array()[a:b] = np.frombuffer(raw, dtype=np.float32).reshape(b - a, w)
            else:
                dev.upload(sl.buffer, self.host_array()[a:b], sl.offset + a * w * 4)
        if on_host:
            self.host_rows = pos0
        else:
            self.device_rows = pos0

    def written(self, on_host: bool, pos0: int, n: int) -> None:
        """A pass on one side wrote positions [pos0, pos0 + n): the other side's from pos0 on are stale."""
        if on_host:
            self.host_rows = pos0 + n
            self.device_rows = min(self.device_rows, pos0)
        else:
            self.device_rows = pos0 + n
            self.host_rows = min(self.host_rows, pos0)

    def copied(self, on_host: bool, n: int) -> None:
        """Positions [0, n) were copied into this (fresh) cache's copy on one side, from another cache."""
        self.host_rows, self.device_rows = (n, 0) if on_host else (0, n)

    def copy_host_to(self, dst: HybridKv, n: int) -> None:
        """Give `dst` this cache's host rows of positions [0, n) (a sequence sharing a prompt's KV)."""
        if self.host_rows < n:   # a ring's rows of positions below n - window may be newer ones: never read
            raise RuntimeError(f"KV positions [0, {n}) are not current in host memory")
        src, out = self.host_array(), dst.host_array()
        for a, b, k in copy_spans(n, self.n_ctx, dst.n_ctx):
            out[b:b + k] = src[a:a + k]
        dst.copied(True, n)

    def _row_spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The rows of positions [lo, hi) (at most n_ctx of them) as one or two [a, b) ranges."""
        return [(a, a + k) for a, _, k in copy_spans(hi, self.n_ctx, self.n_ctx, lo)]

    def _need(self, have: int, lo: int, hi: int) -> None:
        # the other side holds positions [have - n_ctx, have): a pass would read rows no pass wrote (or a
        # ring already overwrote): a caller's bug, never a silent zero
        if have < hi or have - self.n_ctx > lo:
            raise RuntimeError(f"KV positions [{lo}, {hi}) are current on neither side")
