"""The hybrid backend: the GPU runs the pass, except a run of layers the plan gives to the CPU.

It is runtime/backend.py's contract made of two backends: the Vulkan backend owns the device tier
(every pack that goes to the GPU travels as it always does: resident, or streamed along the graph),
and the native CPU backend computes the plan's CPU steps from weights this backend holds in system
memory (loaded once at start, counted in `host_bytes`; their packs leave the schedule in passes that
compute them on the CPU: `host_steps`). Which steps those are follows from the machine's measured
rates and the budgets (plan.py, rates.py), per pass size: a one-token decode computes part of a model
that does not fit on the CPU while the link streams the rest; a prefill streams everything.

Where the model does not fit, the CPU also gathers the embedding's rows (when the embedding fits the RAM
budget): a GPU gather loads a whole pack of rows into the tier for each token's row, and every such
load moves the tier, which undoes the GPU's one-command-buffer replay of its steps.

Activations cross only where the pass changes sides, through host-visible memory: the activations the
next run of steps reads that the other side wrote (the residual stream). Each layer's KV cache lives
on the side that computes it, brought up to date when that changes (kv.py).

A mixture of experts is placed per expert, not per layer: which experts a pass reads is known only
once its router has chosen, so the GPU runs every step and, where the model does not fit, the CPU
computes some of the chosen experts the device tier misses, from system memory (experts.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ...pack_format.reader import pread_into
from ..backend import PassInputs, Placement
from ..tiers import kv_bytes
from .experts import ExpertOffload
from .kv import HybridKv
from .calibrate import CpuCalibration
from .plan import Plan, StepCost, evaluate, plan_pass, step_costs
from ..vk.host_cache import default_budget
from .rates import Rates, measure_rates, store_rates

if TYPE_CHECKING:
    from ...pack_format.reader import Archive
    from ..graph import WeightAccess
    from ..prefetch import PackSource
    from ..tiers import DeviceTier

log = logging.getLogger(__name__)
PLAN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _bucket(tokens: int) -> int:
    """The pass size a pass of `tokens` tokens is planned as."""
    return next((b for b in PLAN_BUCKETS if b >= tokens), PLAN_BUCKETS[-1])


class HeldWeights:
    """`weights.part(si, oi, name, i)` for the CPU's steps: their weights as this backend holds them."""

    holds_every_weight = True

    def __init__(self, tensors: dict[str, Any]):
        self.tensors = tensors
        self.payload: dict[tuple[str, int], Any] = {}

    @contextmanager
    def part(self, si: int, oi: int, name: str, part_idx: int) -> Iterator[Any]:
        yield self.payload[(name, self.tensors[name].parts[part_idx].row_start)]

    def hold_step(self, si: int, step: dict[str, Any], gather_tokens: Any) -> list[HeldWeights]:
        """As WeightAccess.hold_step: one "entry" whose payload holds every part."""
        return [self]

    def release(self, entries: list[Any]) -> None:
        pass


class HeldSource:
    """A PackSource (runtime/prefetch.py) over the archive, for packs this backend loads itself."""

    background = False

    def __init__(self, archive: Archive, pack: int):
        self.archive, self.pack = archive, pack

    def read_into(self, dest: np.ndarray) -> bool:
        if self.archive.packs[self.pack].codec != "none":
            return False
        offset, size = self.archive.pack_span(self.pack)
        pread_into(self.archive.fileno(), dest[:size], offset)
        self.archive.check_stored(self.pack, dest[:size])
        return True

    def decoded(self) -> bytes | memoryview:
        return self.archive.read_pack(self.pack, verify=True)

    def file_span(self) -> None:
        return None


class HybridBackend:
    """GPU steps by `gpu` (the device tier's backend), the plan's CPU steps by `cpu` from held weights.

    host_steps: the CPU's steps of a pass of n tokens, set by hand (tests, tools): `host_steps(n)`
    (the weights of every step it names for some n are held); None: planned per pass size from the machine's rates,
    measured (or read from their cache) when a model does not fit, unless given as `rates`;
    calibrate: correct the CPU's rates from the decode passes (calibrate.py; off: plans from `rates` as given).
    """

    name = "hybrid"

    def __init__(self, archive: Archive, gpu: Any, cpu: Any,
                 host_steps: Callable[[int], frozenset[int]] | None = None, rates: Rates | None = None,
                 calibrate: bool = True):
        self.archive = archive
        self.gpu, self.cpu = gpu, cpu
        self.rates = rates
        self.calibration = CpuCalibration(done=not calibrate)
        self._measured_rates = rates is None   # a calibration then updates the machine's cached rates
        self.steps = archive.graph["steps"]
        self.costs: list[StepCost] = step_costs(archive.graph, archive.tensors, gpu.pack_bytes)
        self.fixed = host_steps
        self.max_block = gpu.max_block
        self.load_workers = gpu.load_workers
        self.held = HeldWeights(archive.tensors)
        self.held_steps: frozenset[int] = frozenset()
        self._held_bytes = 0
        self._buffers: list[np.ndarray] = []
        self._plans: dict[int, Plan] = {}
        self.tier: DeviceTier | None = None
        self.weight_room = 0    # the tier's room for weights (its budget less KV caches and activations)
        self.window = 0         # of which packs in flight take this much where a plan streams
        self.largest_pack = 0   # bytes of the largest pack on the GPU (two of them are kept out of weight_room)
        self.host_room: int | None = None
        # embedding gathers: where the model streams the CPU gathers the rows, from the held embedding
        # (a GPU gather loads a pack of rows into the tier for each token's row: on the H100 host
        # 3.4 MB a token, and every load moved the tier and undid the GPU's replay)
        self.gathers = frozenset(si for si, st in enumerate(self.steps) if st.get("gather"))
        self.layer_of = {si: [op["attrs"]["layer"] for op in st["ops"] if op["op"] == "attention"]
                         for si, st in enumerate(self.steps)}
        self._layers_cache: dict[frozenset[int], frozenset[int]] = {}
        self._reads = [self._live_in(st) for st in self.steps]
        self._writes = [{op["out"] for op in st["ops"]} for st in self.steps]
        self.passes = {"gpu_only": 0, "split": 0}
        moe = [op for st in self.steps for op in st["ops"] if op["op"] == "moe"]
        self.moe = bool(moe)
        self.offload: ExpertOffload | None = None
        if moe:   # before the engine sizes the device tier from reserved_bytes
            gpu.runner.moe.reserve_offload(max(archive.tensors[op["w"][0]].shape[1] for op in moe))
        self.handover_seconds = 0.0   # hand-overs, waiting for the GPU's steps before them included
        self.cpu_seconds = 0.0        # the CPU's steps
        self.split_seconds = 0.0      # whole split passes (the rest of a token's time is the engine's)

    @property
    def dev(self) -> Any:
        """The GPU's Vulkan device (tests and tools read its allocation counters)."""
        return self.gpu.dev

    # ---- the contract, mostly the GPU's ----
    @property
    def reserved_bytes(self) -> int:
        return self.gpu.reserved_bytes

    def make_backing(self, block_sizes: list[int]) -> Any:
        return self.gpu.make_backing(block_sizes)

    def pack_bytes(self, pack: int) -> int:
        return self.gpu.pack_bytes(pack)

    def activation_bytes(self, tokens: int, n_ctx: int) -> int:
        return self.gpu.activation_bytes(tokens, n_ctx)

    def session_activation_bytes(self, tokens: int, n_ctx: int) -> int:
        return self.gpu.session_activation_bytes(tokens, n_ctx)

    def kv_rows(self, n_ctx: int) -> int:
        return self.gpu.kv_rows(n_ctx)

    def kv_view(self, mem: Any, n_ctx: int, width: int) -> Any:
        """The GPU's KV cache; wrapped to follow which side holds which rows where the CPU may compute
        some layers (with nothing held for the CPU, the GPU's own, untouched)."""
        kv = self.gpu.kv_view(mem, n_ctx, width)
        return HybridKv(kv, n_ctx, width) if self.held_steps else kv

    def copy_kv(self, src: list[tuple[Any, Any]], dst: list[tuple[Any, Any]], n: int) -> None:
        """Each cache from the side that holds positions [0, n) current (the GPU's where both do: a
        prefill ran there), in one device submission for all the GPU-side ones; `dst` then holds them
        on that side only (kv.py brings the other side up to date when a pass needs it)."""
        pairs = [(s, d) for ps, pd in zip(src, dst, strict=True) for s, d in zip(ps, pd, strict=True)]
        if not self.held_steps:   # plain device caches (kv_view wraps nothing)
            self.gpu.copy_caches(pairs, n)
            return
        on_gpu = [(s, d) for s, d in pairs if s.device_rows >= n]
        self.gpu.copy_caches([(s.device, d.device) for s, d in on_gpu], n)
        for s, d in on_gpu:
            d.copied(False, n)
        for s, d in pairs:
            if s.device_rows < n:
                s.copy_host_to(d, n)

    def load(self, pack: int, source: PackSource, dest: Any) -> Any:
        return self.gpu.load(pack, source, dest)

    def host_bytes(self) -> int:
        """The GPU's pinned cache (held packs included where they live there) and held packs outside it."""
        return self.gpu.host_bytes() + self._held_bytes

    def attach(self, tier: DeviceTier, placement: Placement) -> int | None:
        """Plan the one-token pass from the budgets, then hold its CPU steps' weights in system memory:
        in the GPU's pinned cache of streamed packs where it keeps one (a prefill that streams those
        steps to the GPU then copies them with one DMA each), else in plain host memory."""
        self.tier = tier
        ram_left = self.gpu.attach(tier, placement)
        kv = kv_bytes(self.archive.graph["kv_cache"], placement.pass_tokens)
        reserved = self.gpu.activation_bytes(placement.pass_tokens, placement.pass_tokens) + kv
        # streaming, the GPU's steps in flight keep up to its pin limit of packs pinned: room that
        # cannot hold packs from one pass to the next (on the H100 host a plan without this counted
        # 2.1 GB streamed per token where 3.8 moved); a plan that streams nothing needs no such window
        self.window = 0 if placement.resident else self.gpu.runner.pin_limit
        # less two of the largest packs, as tiers.py's least weight room: the sub-allocator's holes
        self.largest_pack = max((self.gpu.pack_bytes(p) for p in range(len(self.archive.packs))), default=0)
        self.weight_room = max(0, tier.budget - reserved - 2 * self.largest_pack)
        ram = placement.ram_budget
        self.host_room = default_budget(placement.model_bytes) if ram is None else ram
        if self.moe:
            # experts, not layers: the CPU computes chosen experts the tier misses (experts.py)
            self.held_steps = frozenset()
            if not placement.resident:
                self.offload = ExpertOffload(self.archive, self.cpu, self._rates(), self._host_view)
                self.gpu.runner.moe.enable_offload(self.offload)
        elif self.fixed is not None:
            self.held_steps = frozenset().union(*(self.fixed(b) for b in PLAN_BUCKETS))
        elif placement.resident:
            self.held_steps = frozenset()   # the GPU holds the whole model: nothing to gain on the CPU
        else:
            decode = plan_pass(self.costs, self._rates(), 1, self.weight_room, self.host_room, window=self.window)
            # and the steps a plan for a room 10 % smaller gives the CPU: a calibration may find less room
            tighter = plan_pass(self.costs, self.rates, 1, int(0.9 * self.weight_room), self.host_room,
                                window=self.window)
            held = decode.host | tighter.host
            # gathers too where nothing else is on the CPU: the GPU then holds every layer it can, the
            # embedding's rows only read as each token needs them (llama.cpp keeps token embeddings on
            # the CPU for the same reason)
            self.held_steps = held | self._gathers_within(held)
        plain = self._hold(self.held_steps)
        return None if ram_left is None else max(0, ram_left - plain)

    def _gathers_within(self, held: frozenset[int]) -> frozenset[int]:
        """The gather steps, where their packs fit the RAM budget beside the steps `held` (else the GPU
        keeps gathering)."""
        packs = {p for si in held for p in self.steps[si]["packs"]}
        extra = {p for si in self.gathers for p in self.steps[si]["packs"]} - packs
        total = sum(self.cpu.pack_bytes(p) for p in packs | extra)
        return self.gathers if self.host_room is None or total <= self.host_room else frozenset()

    def _rates(self) -> Rates:
        """The machine's rates (measured now, or read from their cache, unless given)."""
        if self.rates is None:
            dtypes = {t.dtype for t in self.archive.tensors.values() if len(t.shape) == 2}
            self.rates = measure_rates(self.gpu.dev, self.cpu, dtypes)
        return self.rates

    def _host_view(self, pack: int) -> np.ndarray | None:
        """The pack's bytes in the GPU's pinned cache of streamed packs, if it holds them."""
        hc = self.gpu.host_cache
        at = hc.lookup(pack) if hc is not None else None
        return None if at is None else hc.host_view(*at)

    def _hold(self, steps: frozenset[int]) -> int:
        """Load the weights of `steps` in the CPU backend's form, once; returns the bytes held
        outside the GPU's pinned cache."""
        t0 = time.perf_counter()
        packs = sorted({p for si in steps for p in self.steps[si]["packs"]})
        hc = self.gpu.host_cache
        plain = 0
        for pack in packs:
            n = self.cpu.pack_bytes(pack)
            room = hc.reserve(n) if hc is not None else None
            dest = hc.host_view(room[0], room[1], n) if room is not None else np.empty(n, dtype=np.uint8)
            self.held.payload.update(self.cpu.load(pack, HeldSource(self.archive, pack), dest))
            if room is not None:
                hc.commit(pack, room[0], room[1], self.archive.packs[pack].raw_size)
            else:
                self._buffers.append(dest)
                plain += n
            self.archive.drop_pages(pack)
        self._held_bytes = plain
        if packs:
            log.info("holding %d packs (%.2f GiB, %.2f GiB of it pinned) for the CPU's steps, in %.1f s", len(packs),
                     sum(self.cpu.pack_bytes(p) for p in packs) / 2**30,
                     sum(self.cpu.pack_bytes(p) for p in packs if hc is not None and hc.lookup(p)) / 2**30,
                     time.perf_counter() - t0)
        return plain

    # ---- planning ----
    def plan(self, tokens: int) -> Plan | None:
        """The plan of a pass of `tokens` tokens (None: steps fixed by hand)."""
        if self.fixed is not None:
            return None
        bucket = _bucket(tokens)
        plan = self._plans.get(bucket)
        if plan is None:
            plan = self._plans[bucket] = plan_pass(self.costs, self.rates, bucket, self.weight_room, self.host_room,
                                                   allowed=self.held_steps, window=self.window)
            log.info("plan: %s", plan.describe(self.costs))
        return plan

    def host_steps(self, tokens: int) -> frozenset[int]:
        if not self.held_steps:
            return frozenset()
        if self.fixed is not None:
            return frozenset(self.fixed(tokens)) & self.held_steps
        return self.plan(tokens).host | (self.gathers & self.held_steps)

    # ---- a pass ----
    def forward(self, inputs: PassInputs, weights: WeightAccess) -> np.ndarray:
        if not self.held_steps:  # the GPU computes everything, always: its pass as it is
            self.passes["gpu_only"] += 1
            return self.gpu.forward(inputs, weights)
        host = self.host_steps(len(inputs.tokens))
        n = len(self.steps)
        segments: list[tuple[bool, range]] = []
        start = 0
        for si in range(1, n + 1):
            if si == n or (si in host) != (start in host):
                segments.append((start in host, range(start, si)))
                start = si
        gpu_in = replace(inputs, seqs=[(r0, r1, p0, [(k.device, v.device) for k, v in kv])
                                       for r0, r1, p0, kv in inputs.seqs])
        if len(segments) == 1 and not segments[0][0]:
            self.passes["gpu_only"] += 1
            self._kv_ready(segments[0][1], False, inputs)
            return self.gpu.forward(gpu_in, weights)
        self.passes["split"] += 1
        layers = self._host_layers(host)
        cpu_in = replace(inputs, seqs=[(r0, r1, p0, [(k.host_array(), v.host_array()) if i in layers
                                                     else (None, None) for i, (k, v) in enumerate(kv)])
                                       for r0, r1, p0, kv in inputs.seqs])
        t0 = time.perf_counter()
        ps = self.gpu.begin(gpu_in, weights)
        try:
            return self._split_pass(segments, inputs, gpu_in, cpu_in, ps, weights)
        except BaseException:
            self.gpu.inflight.flush(weights)   # unpin what the GPU's steps hold
            raise
        finally:
            self.split_seconds += time.perf_counter() - t0

    def _split_pass(self, segments: list[tuple[bool, range]], inputs: PassInputs, gpu_in: PassInputs,
                    cpu_in: PassInputs, ps: Any, weights: WeightAccess) -> np.ndarray:
        """The pass's runs of steps in order, each on its side, handing over what the next run reads."""
        acts = self.cpu.begin(cpu_in)
        side: dict[str, bool] = {}   # activation -> written last on the host
        cpu_took = 0.0
        up0 = weights.loader.metrics.bytes_uploaded
        for on_host, order in segments:
            self._hand_over(order, on_host, side, ps, acts, weights)
            self._kv_ready(order, on_host, inputs)
            if on_host:
                plan = self.plan(len(inputs.tokens))
                # the link fills the tier for the GPU's next steps while the CPU computes these
                weights.prefetch_bytes(max(0, self.weight_room - self.window) // 4 if plan is None
                                       else int(1.25 * self.rates.link * plan.cpu_seconds))
                t0 = time.perf_counter()
                self.cpu.run_steps(order, acts, self.held)
                cpu_took += time.perf_counter() - t0
            else:
                self.gpu.run_steps(order, ps, weights)
            for si in order:
                for name in self._writes[si]:
                    side[name] = on_host
        self.cpu_seconds += cpu_took
        self._calibrate(len(inputs.tokens), cpu_took, weights.loader.metrics.bytes_uploaded - up0)
        if segments[-1][0]:
            self.gpu.inflight.flush(weights)
            return acts[inputs.output]
        return self.gpu.finish(gpu_in, ps, weights)

    def _calibrate(self, tokens: int, cpu_took: float, uploaded: int) -> None:
        """Correct the CPU's rates and the tier's room from the decode passes (calibrate.py) and plan again."""
        cal = self.calibration
        if cal.done:
            return
        plan = self.plan(tokens)
        if plan is None or not cal.add(plan, cpu_took, uploaded):
            return
        rates = cal.corrected(self.rates)
        excess = cal.room_excess
        if rates is not self.rates and self._measured_rates:
            store_rates(rates)
        if excess:
            self.weight_room = max(0, self.weight_room - excess)
            cal.history.append(f"a plan streaming nothing uploaded {excess / 1.25 / 2**20:.0f} MiB a pass: "
                               f"room for weights {self.weight_room / 2**30:.2f} GiB")
            log.info("calibrated: %s", cal.history[-1])
        if rates is not self.rates or excess:
            self.rates = rates
            self._plans.clear()

    def pin_plan(self, tokens: int, host: frozenset[int]) -> Plan:
        """Tools: run passes of `tokens` tokens with the CPU computing `host` (held steps only), to
        measure a placement the planner did not choose."""
        assert host <= self.held_steps and self.fixed is None
        bucket = _bucket(tokens)
        self.calibration.done = True
        plan = self._plans[bucket] = evaluate(self.costs, self.rates, bucket, self.weight_room, host, self.window)
        return plan

    def _host_layers(self, host: frozenset[int]) -> frozenset[int]:
        """The layers whose attention the steps `host` compute (their KV caches live on the host then)."""
        layers = self._layers_cache.get(host)
        if layers is None:
            layers = self._layers_cache[host] = frozenset(la for si in host for la in self.layer_of[si])
        return layers

    def _hand_over(self, order: range, on_host: bool, side: dict[str, bool], ps: Any, acts: dict[str, Any],
                   weights: WeightAccess) -> None:
        """Copy the activations the steps `order` read that the other side wrote last."""
        names = [n for si in order for n in self._reads[si] if side.get(n, on_host) != on_host]
        if not names:
            return
        t0 = time.perf_counter()
        dev = self.gpu.dev
        for name in dict.fromkeys(names):
            sl, width, rows = ps.bufs[name]
            if on_host:
                self.gpu.inflight.flush(weights)   # the GPU's steps so far must be done
                raw = dev.download(sl.buffer, rows * width * 4, sl.offset)
                acts[name] = np.frombuffer(raw, dtype=np.float32).reshape(rows, width).copy()
            else:
                dev.upload(sl.buffer, np.ascontiguousarray(acts[name], dtype=np.float32), sl.offset)
        self.handover_seconds += time.perf_counter() - t0

    def _kv_ready(self, order: range, on_host: bool, inputs: PassInputs) -> None:
        """The KV rows the steps `order` read, current on their side; then mark what they write."""
        for si in order:
            for layer in self.layer_of[si]:
                for r0, r1, pos0, kv in inputs.seqs:
                    for cache in kv[layer]:
                        cache.ready_on(on_host, pos0, self.gpu.dev)
                        cache.written(on_host, pos0, r1 - r0)

    @staticmethod
    def _live_in(step: dict[str, Any]) -> list[str]:
        """Activations a step reads before writing them (the residual stream, usually)."""
        written: set[str] = set()
        out: list[str] = []
        for op in step["ops"]:
            for name in op["in"]:
                if name not in written and name not in ("tokens", "positions") and name not in out:
                    out.append(name)
            written.add(op["out"])
        return out

    def describe(self) -> list[str]:
        """The measured rates and the plans made so far, one line each."""
        lines = [] if self.rates is None else [f"rates: {self.rates.describe()}"]
        if self.moe:
            lines.append(self.offload.describe() if self.offload is not None
                         else "GPU computes every step and expert (the model fits)")
        elif self.fixed is not None:
            lines.append(f"CPU steps set by hand; for one token: {sorted(self.held_steps)}")
        elif not self.held_steps:
            lines.append("GPU computes every step (the model fits, or the CPU would not gain)")
        if self.gathers & self.held_steps:
            lines.append("the CPU gathers the embedding's rows")
        lines += [f"plan: {p.describe(self.costs)}" for _b, p in sorted(self._plans.items())]
        cal = self.calibration.describe()
        return lines + ([cal] if cal else [])

    def placement(self) -> dict[str, Any]:
        plans = [{"tokens": b, "cpu_steps": sorted(p.host), "cpu_bytes": p.host_bytes,
                  "streamed_bytes": p.streamed_bytes, "expected_seconds": p.seconds}
                 for b, p in sorted(self._plans.items())]
        return {"rates": None if self.rates is None else asdict(self.rates), "plans": plans,
                "held_steps": sorted(self.held_steps), "passes": dict(self.passes),
                "experts_on_cpu": self.offload.cpu_experts if self.offload else 0,
                "experts_over_link": self.offload.link_experts if self.offload else 0,
                "handover_seconds": self.handover_seconds, "cpu_seconds": self.cpu_seconds,
                "split_seconds": self.split_seconds,
                "cpu_calibration": self.calibration.ratio, "lines": self.describe()}

    def close(self) -> None:
        self.gpu.close()
        self.held.payload.clear()
        self._buffers.clear()
        self._held_bytes = 0
