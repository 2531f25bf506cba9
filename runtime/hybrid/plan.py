"""Which steps of a pass the CPU computes, from the measured rates (rates.py) and the budgets.

A pass is the graph's steps in order. Steps on the GPU read their weights from the device tier:
what the tier cannot hold streams over the link each pass. The tier's room for weights is its budget
less the KV caches and activations; a plan whose GPU steps fit it streams nothing, and a plan that
streams keeps a window of that room free for the packs in flight (the GPU backend's pin limit), so it
streams its GPU bytes less the room outside the window. Steps on the CPU read their weights from system
memory with the native kernels. While the CPU computes, the link fills the tier for the next GPU
steps, but only as far as the window lets go of packs already used (half of it: the pins are released
down to half the limit); the rest streams while the GPU's steps wait for it. So a pass that repeats
(decode, and batches up to the largest batch the CPU's rates were measured at) takes about

    max(cpu time + max(gpu time, unhidden streamed bytes / link), streamed bytes / link,
        (cpu bytes + streamed bytes) / host read) + hand-overs * sync

Measured on the H100 host at 4 GiB (bench_hybrid --sweep): streaming 0.47 GiB beside the CPU's steps
cost nothing, 0.88 GiB added 22 ms a token, 2.9 GiB 75 ms; the planner that assumed the whole stream
hidden expected every one of these plans at the same 129.5 ms.

A larger pass (a prefill) is followed by passes of another plan, so the link has no next pass of its
own to stream for while the CPU computes: cpu time + max(gpu time, streamed bytes / link). Measured on
the H100 host when the planner still assumed the overlap for a 512-token prefill: one MLP step given
to the CPU made the prefill 798 tok/s against 1,408 for all-GPU streaming.

The CPU takes a run of layer steps at the end of the layers (one hand-over each way); the plan is
the length of that run minimizing the time above, within the RAM budget for held weights; among
plans of equal time (system memory the bound, however the bytes are split) the one streaming least. Decode
(one token) favours the CPU for part of a model that does not fit; a prefill multiplies the CPU's
time by its tokens and not the link's, so it streams. No fraction is set by hand: the choice follows
from the rates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .rates import Rates


@dataclass(frozen=True)
class StepCost:
    """One graph step as the planner sees it: its weights' bytes by stored type, and whether the CPU
    may take it (not the embedding gather or the head, which stay where the pass starts and ends)."""

    index: int
    name: str
    nbytes: int
    by_dtype: tuple[tuple[str, int], ...]
    movable: bool


@dataclass(frozen=True)
class Plan:
    """A pass's placement and the time it is expected to take (seconds)."""

    tokens: int
    host: frozenset[int]
    seconds: float
    cpu_seconds: float
    gpu_seconds: float
    link_seconds: float
    host_bytes: int
    streamed_bytes: int

    def describe(self, steps: list[StepCost]) -> str:
        names = [s.name for s in steps if s.index in self.host]
        where = f"CPU computes {len(names)} steps ({names[0]} .. {names[-1]}, {self.host_bytes / 2**30:.2f} GiB)" \
            if names else "GPU computes every step"
        return (f"{self.tokens}-token pass: {where}; streamed {self.streamed_bytes / 2**30:.2f} GiB; expected "
                f"{self.seconds * 1e3:.1f} ms (CPU {self.cpu_seconds * 1e3:.1f}, GPU {self.gpu_seconds * 1e3:.1f}, "
                f"link {self.link_seconds * 1e3:.1f})")


def step_costs(graph: dict[str, Any], tensors: dict[str, Any], pack_bytes: Any) -> list[StepCost]:
    """Each step's weight bytes (as the GPU stores them) by type, from the archive's index. A gather
    step (the embedding) reads a few rows, not its packs: it counts nothing; a pack two steps read
    (a head tied to the embedding) counts once."""
    out = []
    seen: set[int] = set()
    for si, step in enumerate(graph["steps"]):
        by: dict[str, int] = {}
        gather = bool(step.get("gather"))
        if not gather:
            for op in step["ops"]:
                for name in op["w"]:
                    t = tensors[name]
                    if len(t.shape) == 2:
                        by[t.dtype] = by.get(t.dtype, 0) + sum(p.nbytes for p in t.parts)
        new = [] if gather else [p for p in step["packs"] if p not in seen]
        seen.update(new)
        movable = not gather and not any(op["op"] == "last_token" for op in step["ops"])
        out.append(StepCost(si, step["name"], sum(pack_bytes(p) for p in new), tuple(sorted(by.items())), movable))
    return out


def plan_pass(steps: list[StepCost], rates: Rates, tokens: int, weight_room: int, host_room: int | None,
              allowed: frozenset[int] | None = None, window: int = 0) -> Plan:
    """The placement of a pass of `tokens` tokens minimizing its expected time.

    weight_room: device tier bytes for weights (the tier's budget less the KV caches and activations);
    host_room: bytes of system memory the CPU's weights may take (None: no limit);
    allowed: the steps the CPU may take (those whose weights are held already; None: any movable);
    window: the part of weight_room that packs in flight take when a plan streams.
    """
    best: Plan | None = None
    for host in host_runs(steps, host_room, allowed):
        plan = evaluate(steps, rates, tokens, weight_room, host, window)
        # equal times (bound by system memory, whatever the split): the plan streaming least, since
        # every streamed pack also costs pins, stalls and the GPU's waits that the model leaves out
        if best is None or plan.seconds < best.seconds * (1 - 1e-9) or (
                plan.seconds <= best.seconds * (1 + 1e-9) and plan.streamed_bytes < best.streamed_bytes):
            best = plan
    assert best is not None
    return best


def host_runs(steps: list[StepCost], host_room: int | None, allowed: frozenset[int] | None = None) -> list[frozenset[int]]:
    """The CPU's candidate step sets, shortest first: runs of movable steps ending at the last
    movable one (one hand-over each way), within `host_room` bytes."""
    movable = [s for s in steps if s.movable and (allowed is None or s.index in allowed)]
    runs = [frozenset()]
    host_bytes = 0
    for k in range(1, len(movable) + 1):
        s = movable[-k]
        if host_room is not None and host_bytes + s.nbytes > host_room:
            break
        if k > 1 and s.index + 1 != movable[-k + 1].index:
            break
        host_bytes += s.nbytes
        runs.append(runs[-1] | {s.index})
    return runs


def evaluate(steps: list[StepCost], rates: Rates, tokens: int, weight_room: int, host: frozenset[int],
             window: int = 0) -> Plan:
    """The expected time of a pass of `tokens` tokens with the CPU computing the steps `host` (the
    module docstring's model)."""
    total = sum(s.nbytes for s in steps)
    repeats = tokens <= max(max(by) for by in rates.cpu.values()) if rates.cpu else tokens == 1
    cpu = sum(rates.cpu_seconds(dt, n, tokens) for s in steps if s.index in host for dt, n in s.by_dtype)
    host_bytes = sum(s.nbytes for s in steps if s.index in host)
    gpu_bytes = total - host_bytes
    streamed = 0 if gpu_bytes <= weight_room else gpu_bytes - max(0, weight_room - window)
    gpu = gpu_bytes / rates.gpu_read
    link = streamed / rates.link
    # the CPU's weights and the streamed ones are both read from system memory each pass
    dram = (host_bytes + streamed) / rates.host_read if rates.host_read else 0.0
    hidden = min(streamed, window // 2) if host else 0
    overlapped = (max(cpu + max(gpu, (streamed - hidden) / rates.link), link, dram) if repeats
                  else cpu + max(gpu, link))
    seconds = overlapped + (2 * rates.sync if host else 0.0)
    return Plan(tokens, host, seconds, cpu, gpu, link, host_bytes, streamed)
