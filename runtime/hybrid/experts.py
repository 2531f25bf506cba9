"""Cold experts on the CPU: a chosen expert that is not on the device is computed from system memory
by the native kernels instead of being copied over the link, where the measured rates say that is sooner.

A mixture of experts that does not fit the device misses experts every pass (random routing on a
tier holding a sixth of them misses five in six). Each miss costs its bytes over the link; the CPU can
instead read those bytes from RAM at its own rate, at the same time as the link copies the other
misses and the GPU computes the experts it holds. So, per moe op and pass, once the router has chosen
(runtime/vk/moe.py), the misses are split between the two: the CPU takes those that make
max(CPU seconds, link seconds) smallest, cheapest (fewest rows) first. The CPU's seconds come from the
machine's measured rates (rates.py), scaled by what the CPU really took in the passes so far, per bucket
of rows an expert has (an expert is a few MB: the threads' start and the bytes shared with the link's DMA
count, which the rates' large probes leave out, and a prefill's experts run other kernels than a
decode's); the link's from its measured rate.

The CPU reads an expert where its bytes already are in system memory, never copying them: the GPU's
pinned cache of streamed packs (vk/host_cache.py, within the RAM budget), else the archive's own
mapping where the pack is stored raw (checked against its checksum once). An expert in neither goes
over the link, which puts it in the pinned cache for the next time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from .rates import Rates

if TYPE_CHECKING:
    from ...pack_format.reader import Archive

CALIBRATION = 0.2          # weight of the latest pass in the CPU's measured/predicted ratio
SCALE_RANGE = (0.25, 50.0)  # bounds of that ratio (a descheduled thread can make one pass very slow)
RECOVERY = 0.05           # per pass the CPU takes nothing, the ratio's step back toward 1
FUSED_MAX_ROWS = 8         # experts with up to this many rows go to the kernels' one-call path (more: each
                           # product on its own, where the kernels' GEMM takes over from 16 rows)
ROW_BUCKETS = (1, 8, 32)   # the CPU's measured/predicted ratio is kept per bucket of rows an expert has:
                           # decode and prefill run different kernels (on the H100 host a prefill's experts
                           # took x6.9 their rates while decode's took ~x1)


class _Parts:
    """`part(name, i)` over payloads this module described, for CpuBackend.glu."""

    def __init__(self, tensors: dict[str, Any], payload: dict[tuple[str, int], Any]):
        self.tensors, self.payload = tensors, payload

    @contextmanager
    def part(self, name: str, part_idx: int) -> Iterator[Any]:
        yield self.payload[(name, self.tensors[name].parts[part_idx].row_start)]


class ExpertOffload:
    """Which chosen experts the CPU computes (`split`), and their weighted sum (`compute`).

    cpu: the native CPU backend (its `describe` and `glu`); host_view(pack): the pack's bytes in the
    GPU's pinned cache (a uint8 array) or None.
    """

    def __init__(self, archive: Archive, cpu: Any, rates: Rates, host_view: Callable[[int], np.ndarray | None]):
        self.archive, self.cpu, self.rates, self.host_view = archive, cpu, rates, host_view
        self.tensors = archive.tensors
        self._payloads: dict[int, dict[tuple[str, int], Any]] = {}
        self._bytes: dict[tuple[str, ...], tuple[int, tuple[tuple[str, int], ...]]] = {}
        self.scales = [1.0] * (len(ROW_BUCKETS) + 1)   # the CPU's measured/predicted seconds, per row bucket
        self.cpu_experts = 0       # experts computed on the CPU
        self.link_experts = 0      # misses the link copied (besides the hits the GPU held)
        self.cpu_seconds = 0.0

    # ---- the split ----
    def _cost(self, names: tuple[str, ...]) -> tuple[int, tuple[tuple[str, int], ...]]:
        """An expert's stored bytes, all and by type."""
        got = self._bytes.get(names)
        if got is None:
            by: dict[str, int] = {}
            for n in names:
                t = self.tensors[n]
                by[t.dtype] = by.get(t.dtype, 0) + sum(p.nbytes for p in t.parts)
            got = self._bytes[names] = (sum(by.values()), tuple(sorted(by.items())))
        return got

    def cpu_estimate(self, names: tuple[str, ...], rows: int) -> float:
        """Seconds the CPU is expected to take for one expert over `rows` rows (unscaled)."""
        return sum(self.rates.cpu_seconds(dt, n, rows) for dt, n in self._cost(names)[1])

    def split(self, experts: dict[int, tuple[str, ...]], rows: dict[int, int], packs: dict[int, list[int]]) -> list[int]:
        """The CPU's share of the misses `experts` (expert -> its tensors; `rows`: how many rows chose it;
        `packs`: its packs): those readable from system memory that bring max(CPU, link) down."""
        link = self.rates.link
        costs = []
        for e, names in experts.items():
            nbytes = self._cost(names)[0]
            cpu = self.scales[_bucket(rows[e])] * self.cpu_estimate(names, rows[e])
            costs.append((cpu / max(nbytes / link, 1e-12), e, cpu, nbytes / link))
        link_total = sum(c[3] for c in costs)
        cpu_total = 0.0
        out = []
        for _ratio, e, cpu, lk in sorted(costs):
            if max(cpu_total + cpu, link_total - lk) >= max(cpu_total, link_total):
                continue
            if not self._readable(packs[e]):
                continue
            out.append(e)
            cpu_total += cpu
            link_total -= lk
        if not out:   # no measurement this pass: drift back toward the rates, so one slow pass is not forever
            b = _bucket(max(rows.values(), default=1))
            self.scales[b] += RECOVERY * (1.0 - self.scales[b])
        self.cpu_experts += len(out)
        self.link_experts += len(experts) - len(out)
        return sorted(out)

    def _readable(self, packs: list[int]) -> bool:
        return all(self._payload(p) is not None for p in packs)

    def _payload(self, pack: int) -> dict[tuple[str, int], Any] | None:
        """The native backend's description of the pack's bytes in system memory (None: not there)."""
        got = self._payloads.get(pack)
        if got is not None:
            return got
        raw = self.host_view(pack)
        if raw is None:
            if self.archive.packs[pack].codec != "none":
                return None
            raw = np.frombuffer(self.archive.stored_bytes(pack), dtype=np.uint8)
            self.archive.check_stored(pack, raw)   # read from the file's mapping: untrusted until checked
        got = self._payloads[pack] = self.cpu.describe(pack, raw[:self.archive.packs[pack].raw_size])
        return got

    # ---- the CPU's share ----
    def compute(self, experts: dict[int, tuple[str, ...]], packs: dict[int, list[int]], idx: np.ndarray,
                gate: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out = the sum over `experts` of each one's FFN of the rows that chose it, times their routing
        weights (idx, gate: [T, k]; x, out: [T, width]); calibrates the CPU's scale from the time taken."""
        t0 = time.perf_counter()
        work = []   # (names, rows, routing weights, payload) per expert, in the order given
        for e, names in experts.items():
            rows, slot = np.nonzero(idx == e)
            work.append((names, rows, gate[rows, slot], {k: v for p in packs[e] for k, v in self._payload(p).items()}))
        if all(len(rows) <= FUSED_MAX_ROWS and all(len(self.tensors[n].parts) == 1 for n in names)
               for names, rows, _w, _p in work):
            # whole matrices and few rows (decode): one call for all of them (native/experts.h)
            self.cpu.kernels.experts([(*(payload[(n, 0)].product for n in names), rows, wts)
                                      for names, rows, wts, payload in work], np.ascontiguousarray(x), out,
                                     self.cpu.threads)
        else:
            out[:] = 0.0
            for names, rows, wts, payload in work:
                y = self.cpu.glu(list(names), np.ascontiguousarray(x[rows]), _Parts(self.tensors, payload))
                out[rows] += y * wts[:, None]
        predicted = sum(self.cpu_estimate(names, len(rows)) for names, rows, _w, _p in work)
        took = time.perf_counter() - t0
        self.cpu_seconds += took
        if predicted > 0:   # the pass's time, credited to the bucket of its largest expert
            b = _bucket(max(len(rows) for _n, rows, _w, _p in work))
            ratio = min(max(took / predicted, SCALE_RANGE[0]), SCALE_RANGE[1])
            self.scales[b] += CALIBRATION * (ratio - self.scales[b])

    def describe(self) -> str:
        uses = self.cpu_experts + self.link_experts
        share = f"{self.cpu_experts / uses:.0%}" if uses else "none yet"
        scales = ", ".join(f"{lo}-{hi}: x{s:.2f}" for lo, hi, s in zip((1, *(b + 1 for b in ROW_BUCKETS)),
                                                                       (*ROW_BUCKETS, "more"), self.scales))
        return (f"experts missing on the device: the CPU computed {self.cpu_experts} ({share}) in "
                f"{self.cpu_seconds:.2f} s, the link copied {self.link_experts}; CPU time of its rates by rows "
                f"{scales}")


def _bucket(rows: int) -> int:
    """The index of the row bucket (ROW_BUCKETS) `rows` falls in."""
    return next((i for i, b in enumerate(ROW_BUCKETS) if rows <= b), len(ROW_BUCKETS))
