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


class HybridKv:
    """A device KvCache and, once the CPU needs it, a host array [n_ctx, width] float32."""

    __slots__ = ("device", "device_rows", "host", "host_rows", "n_ctx", "width")

    def __init__(self, device: Any, n_ctx: int, width: int):
        self.device = device
        self.n_ctx, self.width = n_ctx, width
        self.host: np.ndarray | None = None
        self.device_rows = 0   # leading rows current on the device
        self.host_rows = 0     # leading rows current in host memory

    def host_array(self) -> np.ndarray:
        if self.host is None:
            self.host = np.zeros((self.n_ctx, self.width), dtype=np.float32)
        return self.host

    def ready_on(self, on_host: bool, pos0: int, dev: Any) -> None:
        """Bring rows [0, pos0) up to date on one side before a pass there reads them."""
        if on_host:
            if self.host_rows < pos0:
                a, b = self.host_rows, pos0
                self._need(self.device_rows, b)
                sl = self.device.slice
                raw = dev.download(sl.buffer, (b - a) * self.width * 4, sl.offset + a * self.width * 4)
                self.host_array()[a:b] = np.frombuffer(raw, dtype=np.float32).reshape(b - a, self.width)
                self.host_rows = b
        elif self.device_rows < pos0:
            a, b = self.device_rows, pos0
            self._need(self.host_rows, b)
            sl = self.device.slice
            dev.upload(sl.buffer, self.host_array()[a:b], sl.offset + a * self.width * 4)
            self.device_rows = b

    def written(self, on_host: bool, pos0: int, n: int) -> None:
        """A pass on one side wrote rows [pos0, pos0 + n): the other side's rows from pos0 on are stale."""
        if on_host:
            self.host_rows = pos0 + n
            self.device_rows = min(self.device_rows, pos0)
        else:
            self.device_rows = pos0 + n
            self.host_rows = min(self.host_rows, pos0)

    @staticmethod
    def _need(have: int, rows: int) -> None:
        if have < rows:  # a pass read rows no pass wrote: a caller's bug, never a silent zero
            raise RuntimeError(f"KV rows [{have}, {rows}) are current on neither side")
