"""The planner's CPU rate and the tier's room corrected from the decode passes the plan runs.

The start-up probe (rates.py) times one product over a fresh buffer; a pass runs a whole run of
layers over the weights where they are held, and on the H100 host the two differed by 13 %
(the probe 107 GB/s for F16 at one token, the CPU's steps of a split pass 121 GB/s). A plan made
from a wrong CPU rate balances the CPU against the link at the wrong point, so after a few passes
of one-token decode the measured CPU time replaces the probe's: the CPU's one-token rates scale by
measured over expected, the host's read rate is raised to at least what the CPU itself read, the
rates cache keeps the correction for the next start, and the decode plan is made again (among the
steps already held: a slower CPU hands steps back to the GPU; a faster one keeps what it holds).

The tier's room for weights is an estimate too (its budget less the KV caches, the activations and two
of the largest packs for the sub-allocator's holes). Where a plan that should stream nothing uploads
packs every pass, the room was too big by about that much: it shrinks by 1.25x the bytes a pass
uploaded, and the plan is made again (the backend holds the steps of a plan for a room 10 % smaller
from the start, so the CPU can take more).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field, replace

from .plan import Plan
from .rates import Rates

log = logging.getLogger(__name__)

SKIP_PASSES = 4       # the first passes fault in pages, warm caches and bring KV rows over
PASSES = 8            # passes measured before correcting; each figure their median (on the H100 host
                      # the first passes after a prefill ran at 79 GB/s, the timed ones at 109)
TOLERANCE = 0.05      # a correction smaller than this is noise: keep the plan


@dataclass
class CpuCalibration:
    """Measured against expected CPU seconds of the one-token plan's passes (the median of PASSES after
    SKIP_PASSES); corrects once."""

    seen: int = 0
    ratios: list[float] = field(default_factory=list)     # measured / expected CPU seconds, per pass
    reads: list[float] = field(default_factory=list)      # bytes per second the CPU's steps read, per pass
    uploads: list[int] = field(default_factory=list)      # bytes uploaded to the tier, per pass
    done: bool = False
    ratio: float | None = None   # measured / expected, once corrected (or found within tolerance)
    history: list[str] = field(default_factory=list)
    _streams: bool = False

    def add(self, plan: Plan, seconds: float, uploaded: int = 0) -> bool:
        """Count one pass of `plan` whose CPU steps took `seconds` and which uploaded `uploaded` bytes
        of packs to the tier; True once the pass count is reached (then `ratio` and `room_excess`)."""
        if self.done or plan.tokens != 1 or not plan.host or plan.cpu_seconds <= 0:
            return False
        self.seen += 1
        if self.seen <= SKIP_PASSES:
            return False
        self.ratios.append(seconds / plan.cpu_seconds)
        self.reads.append(plan.host_bytes / max(seconds, 1e-9))
        self.uploads.append(uploaded)
        self._streams = plan.streamed_bytes > 0
        if self.seen < SKIP_PASSES + PASSES:
            return False
        self.done = True
        self.ratio = statistics.median(self.ratios)
        return True

    @property
    def room_excess(self) -> int:
        """Bytes the tier's room was overestimated by: 1.25x a pass's uploads where the plan streamed
        nothing (0 otherwise, or before the passes are counted)."""
        if not self.done or self._streams:
            return 0
        return int(1.25 * statistics.median(self.uploads))

    def corrected(self, rates: Rates) -> Rates:
        """`rates` with the one-token CPU rates scaled by the measured ratio and the host's read rate
        at least the CPU's own (`rates` itself where the ratio is within TOLERANCE)."""
        assert self.ratio is not None
        if abs(self.ratio - 1) <= TOLERANCE:
            return rates
        cpu = {dt: {b: (r / self.ratio if b == 1 else r) for b, r in by.items()} for dt, by in rates.cpu.items()}
        read = statistics.median(self.reads)
        # 0: no shared limit was measured, and a CPU's rate is no upper bound of it
        out = replace(rates, cpu=cpu, host_read=max(rates.host_read, read) if rates.host_read else 0.0)
        line = (f"CPU steps took {self.ratio:.2f}x the expected time over {PASSES} passes ({read / 1e9:.1f} GB/s "
                f"read): one-token CPU rates scaled by {1 / self.ratio:.2f}, host read {out.host_read / 1e9:.0f} GB/s")
        self.history.append(line)
        log.info("calibrated: %s", line)
        return out

    def describe(self) -> str | None:
        if self.history:
            return "calibrated: " + "; ".join(self.history)
        if self.ratio is not None:
            return f"calibration: CPU steps took {self.ratio:.2f}x the expected time (within {TOLERANCE:.0%}: kept)"
        return None
