"""The engine: an archive, budgeted tiers, a backend, and the generation loop.

Example:
    eng = Engine("smollm2.vkpack", vram_gb=0.25)
    print(eng.generate("The capital of France is", max_tokens=16, temperature=0))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..pack_format.errors import VkpackError
from ..pack_format.reader import Archive
from .graph import Executor, make_schedule
from .metrics import Metrics
from .policy import POLICIES
from .prefetch import PackLoader
from .sampler import Sampler, SamplingParams
from .tiers import BudgetError, DeviceTier, RamTier

log = logging.getLogger(__name__)
GIB = 1 << 30
DEFAULT_CONTEXT = 4096


class Engine:
    """Runs one `.vkpack` archive under a device budget (`vram_gb`) and a RAM budget (`ram_gb`).

    Args:
        path: the archive.
        vram_gb: device tier budget in GiB (None: everything resident).
        ram_gb: budget for cached decoded packs in GiB (None: unlimited).
        device: "auto", "cpu" or "vulkan".
        prefetch_lookahead: packs to load ahead along the access graph (0: on demand only); a backend
            loading from N threads raises it to at least 2N.
        eviction_aggression: the graph policy's scoring knob, 0..1.
        policy: "graph" (Belady by next use in the graph) or "lru" (the baseline).
        context: the longest prompt + generation this engine accepts (default: the model's, at most 4096).
        workgroup_size, subgroups, fp32, shader_dir: Vulkan kernel settings (--workgroup-size,
            --no-subgroups, --fp32, --shader-dir); see `vk.Ops.configure` and `vk.spirv.set_shader_dir`.
    """

    def __init__(self, path: str | Path, vram_gb: float | None = None, ram_gb: float | None = None,
                 device: str = "auto", prefetch_lookahead: int = 3, eviction_aggression: float = 0.7,
                 policy: str = "graph", context: int | None = None, threads: int | None = None,
                 device_index: int | None = None, workgroup_size: int | None = None, subgroups: bool = True,
                 fp32: bool = False, shader_dir: str | Path | None = None):
        self.archive = Archive(path)
        self.hp = self.archive.hparams
        self.backend = _make_backend(device, self.archive, device_index,
                                     {"workgroup_size": workgroup_size, "subgroups": subgroups, "fp32": fp32},
                                     shader_dir)
        if threads and hasattr(self.backend, "set_threads"):
            self.backend.set_threads(threads, threads)
        self.context = min(context or min(self.hp["context"], DEFAULT_CONTEXT), self.hp["context"])
        self.schedule, where = make_schedule(self.archive.graph, self.archive.tensors)
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy = POLICIES[policy](self.schedule, eviction_aggression)
        self.model_bytes = sum(self.backend.pack_bytes(p.id) for p in self.archive.packs)
        self.min_bytes = self._minimum_budget()
        if vram_gb is None:  # everything resident: weights, a full-context KV cache, activations twice
            # over, and 10 % slack so that reservations never fragment their way into evicting packs
            budget = (self.model_bytes * 11 // 10 + self._kv_bytes(self.context)
                      + 2 * self._act_bytes(min(self.context, 2048), self.context) + (64 << 20))
        else:
            budget = int(vram_gb * GIB)
            if budget < self.min_bytes:
                raise BudgetError(f"--vram-gb {vram_gb:g} ({budget / 2**20:.1f} MiB) is below what this model needs "
                                  f"at minimum: {self.min_bytes / 2**20:.1f} MiB ({self.min_bytes / GIB:.3f} GiB)")
        if vram_gb is not None:
            budget -= getattr(self.backend, "reserved_bytes", 0)  # staging and io buffers live outside the tier
        budget = -(-budget // 256) * 256
        self.metrics = Metrics(device_budget=budget, ram_budget=None if ram_gb is None else int(ram_gb * GIB))
        self.tier = DeviceTier(budget, self.backend.max_block, self.backend.backing_factory, self.policy)
        # Decoded bytes are worth caching only when packs get evicted from the device tier.
        streaming = budget < self.model_bytes + self._kv_bytes(self.context)
        if streaming and hasattr(self.backend, "run_step"):  # a device backend: loads from many threads
            largest = max(self.backend.pack_bytes(p.id) for p in self.archive.packs)
            self.tier.evict_batch = min(4 * largest, budget // 16)
        ram_budget = self.metrics.ram_budget if streaming else 0
        # a device backend keeps streamed packs in pinned memory under the RAM budget (one DMA per
        # reload, vk/host_cache.py); decoded bytes then need no second cache
        if streaming and hasattr(self.backend, "enable_host_cache") and self.backend.enable_host_cache(
                ram_budget, self.model_bytes):
            ram_budget = 0
        self.ram = RamTier(ram_budget, self.policy)
        if hasattr(self.backend, "attach"):
            self.backend.attach(self.tier, resident=not streaming,
                                pass_tokens=min(self.context, 2048 if not streaming else 512))
        if prefetch_lookahead > 0:  # a device backend loads from several threads: keep them all busy
            prefetch_lookahead = max(prefetch_lookahead, 2 * getattr(self.backend, "prefetch_workers", 0))
        self.loader = PackLoader(self.archive, self.tier, self.ram, self.backend, self.schedule, prefetch_lookahead,
                                 self.metrics, workers=getattr(self.backend, "prefetch_workers", 1))
        if not streaming and hasattr(self.backend, "run_step"):  # a device backend holding the whole model
            self.loader.preload()
        self.executor = Executor(self.archive, self.backend, self.loader, where)
        self.tokenizer = _load_tokenizer(self.archive.tokenizer)
        tok = self.archive.tokenizer
        self.eos_ids = set(tok.get("eos_ids") or ([tok["eos_id"]] if tok.get("eos_id") is not None else []))
        self.bos_id = tok.get("bos_id")
        self.add_bos = bool(tok.get("add_bos"))

    # ---- sizes ----
    def _kv_dim(self) -> int:
        kv = self.archive.graph["kv_cache"]
        return kv["n_kv_heads"] * kv["head_dim"]

    def _kv_bytes(self, n_ctx: int) -> int:
        return 2 * self.archive.graph["kv_cache"]["n_layers"] * n_ctx * self._kv_dim() * 4

    def _act_bytes(self, t: int, n_ctx: int) -> int:
        """Activations of one pass over `t` tokens: the residual stream and every intermediate,
        the attention scores of one layer, and the logits of the last token."""
        hp = self.hp
        width = 3 * hp["hidden"] + hp["n_heads"] * hp["head_dim"] * 2 + 2 * self._kv_dim() + 3 * hp["ffn"]
        return 4 * (t * width + hp["n_heads"] * t * n_ctx + 2 * hp["vocab"])

    def _minimum_budget(self) -> int:
        """Two packs (a weight part and its bias may be pinned together; bigger steps are streamed
        part by part), the KV cache and activations of a short sequence, and the backend's staging."""
        largest = 2 * max(self.backend.pack_bytes(p.id) for p in self.archive.packs)
        return largest + self._kv_bytes(64) + self._act_bytes(16, 64) + getattr(self.backend, "reserved_bytes", 0)

    # ---- tokens ----
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from .chat import render_chat

        return render_chat(self.archive.tokenizer, messages, add_generation_prompt)

    # ---- forward ----
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Last-position logits of one fresh pass over `ids` (float32, [vocab])."""
        with self.kv_session(len(ids)) as kv:
            return self.executor.forward(np.asarray(ids), 0, kv)[-1].copy()

    def kv_session(self, n_ctx: int, max_pass_tokens: int | None = None) -> _KvSession:
        """`with eng.kv_session(n) as kv:` reserves one sequence's KV cache (and, for the numpy
        backend, activation room for passes of up to `max_pass_tokens` tokens, default n) in the
        device tier; BudgetError when the budget cannot hold it next to pinned packs."""
        return _KvSession(self, n_ctx, max_pass_tokens)

    def session_bytes(self, n_ctx: int, max_pass_tokens: int | None = None) -> int:
        """Device bytes one `kv_session(n_ctx, max_pass_tokens)` reserves."""
        return _KvSession(self, n_ctx, max_pass_tokens).nbytes

    @property
    def weight_room_bytes(self) -> int:
        """Room the weights need at the least next to sessions (two packs, see _minimum_budget)."""
        return 2 * max(self.backend.pack_bytes(p.id) for p in self.archive.packs)

    def forward_batch(self, seqs: list[tuple[Sequence[int], int, Any]]) -> np.ndarray:
        """Logits [n_seqs, vocab] for several sequences' next tokens in one weight stream.

        Each entry is (new token ids, position of the first, its kv from `kv_session`)."""
        return self.executor.forward_batch([(np.asarray(t), p, kv) for t, p, kv in seqs])

    # ---- generation ----
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40,
               top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
               seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Yield generated text piece by piece (never a broken UTF-8 character).

        The ids of the generated tokens are left in `self.last_ids`.
        """
        from .detok import StopMatcher, StreamDecoder

        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                                max_tokens=max_tokens, stop=tuple(stop))
        ids = list(prompt) if not isinstance(prompt, str) else self.encode(prompt)
        if not ids:
            raise VkpackError("empty prompt")
        if len(ids) + 1 > self.context:
            raise VkpackError(f"prompt of {len(ids)} tokens does not fit the context of {self.context} tokens")
        n_new = min(max_tokens, self.context - len(ids))
        sampler = Sampler(params)
        decoder = StreamDecoder(self.tokenizer, skip_special_tokens=True, context_ids=ids[-4:])
        stops = StopMatcher(list(stop)) if stop else None
        history = list(ids)
        self.last_ids: list[int] = []
        with self.kv_session(len(ids) + n_new) as kv:
            t0 = time.perf_counter()
            logits = self.executor.forward(np.asarray(ids), 0, kv)[-1]
            self.metrics.prefill_seconds += time.perf_counter() - t0
            self.metrics.prompt_tokens += len(ids)
            pos = len(ids)
            for i in range(n_new):
                tok = sampler.sample(logits, history)
                if tok in self.eos_ids and not ignore_eos:
                    break
                history.append(tok)
                self.last_ids.append(tok)
                piece = decoder.push(tok)
                if stops is not None:
                    piece, stopped = stops.feed(piece)
                    if piece:
                        yield piece
                    if stopped:
                        return
                elif piece:
                    yield piece
                if i == n_new - 1:
                    break
                t0 = time.perf_counter()
                logits = self.executor.forward(np.asarray([tok]), pos, kv)[-1]
                self.metrics.decode_seconds += time.perf_counter() - t0
                self.metrics.generated_tokens += 1
                pos += 1
        tail = decoder.flush()
        if stops is not None:
            tail = stops.feed(tail)[0] + stops.flush()
        if tail:
            yield tail

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        """The whole completion as one string; keyword arguments as in `stream`."""
        return "".join(self.stream(prompt, **kwargs))

    def stats(self) -> dict[str, Any]:
        m = self.metrics
        m.peak_device_bytes = self.tier.peak
        m.peak_ram_bytes = self.ram.peak + self.pinned_bytes
        return m.as_dict()

    @property
    def pinned_bytes(self) -> int:
        """System memory the device backend pinned for streamed packs (counted in the RAM budget)."""
        hc = getattr(self.backend, "host_cache", None)
        return 0 if hc is None else hc.used

    def close(self) -> None:
        self.loader.close()
        if hasattr(self.backend, "close"):
            self.backend.close()
            if hasattr(self.tier.backing, "close"):
                self.tier.backing.close()
            self.backend.dev.close()
        self.archive.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


KV_GRANULE = 256  # device sessions' KV rows are a multiple of this (at most the engine's context)


class _KvSession:
    """Reserves one sequence's KV cache (and numpy activation room) as ONE range of the device
    tier, cut into per-layer views, so that sessions do not scatter small holes across the budget."""

    def __init__(self, eng: Engine, n_ctx: int, max_pass_tokens: int | None = None):
        self.eng = eng
        if getattr(eng.backend, "resident", False):
            # a device backend's recordings depend on the cache's size and place: sessions rounded to
            # a granule land where an earlier one of that size was, and replay its recordings (only
            # when the model is resident: under a small budget the KV bytes are worth more)
            n_ctx = -(-n_ctx // KV_GRANULE) * KV_GRANULE
        self.n_ctx = max(1, min(n_ctx, eng.context))
        self.layers = eng.archive.graph["kv_cache"]["n_layers"]
        self.width = eng._kv_dim()
        self.per = -(-self.n_ctx * self.width * 4 // 256) * 256
        t = self.n_ctx if max_pass_tokens is None else max(1, min(max_pass_tokens, self.n_ctx))
        # a device backend lays out its own activation buffers (and counts them) per pass
        self.act = 0 if hasattr(eng.backend, "begin") else eng._act_bytes(t, self.n_ctx)
        self.nbytes = 2 * self.layers * self.per + self.act
        self.allocs: list[Any] = []

    def __enter__(self) -> list[tuple[Any, Any]]:
        e = self.eng
        try:
            if self.act:
                self.allocs.append(e.tier.reserve(self.act, "activations"))
            kv_bytes = 2 * self.layers * self.per
            if kv_bytes <= e.tier.allocator.max_request:
                block = e.tier.reserve(kv_bytes, "kv")
                self.allocs.append(block)
                views = [self._cut(block, i) for i in range(2 * self.layers)]
            else:  # larger than one block of the tier: one range per layer and kind
                views = []
                for _ in range(2 * self.layers):
                    a = e.tier.reserve(self.per, "kv")
                    self.allocs.append(a)
                    views.append(e.backend.kv_view(e.tier.view(a), self.n_ctx, self.width))
        except BaseException:
            self.__exit__()
            raise
        return [(views[2 * i], views[2 * i + 1]) for i in range(self.layers)]

    def _cut(self, block: Any, i: int) -> Any:
        from dataclasses import replace

        sub = replace(block, offset=block.offset + i * self.per, size=self.per, requested=self.per)
        return self.eng.backend.kv_view(self.eng.tier.view(sub), self.n_ctx, self.width)

    def __exit__(self, *exc: object) -> None:
        for a in self.allocs:
            self.eng.tier.release(a)
        self.allocs = []


def _make_backend(device: str, archive: Archive, device_index: int | None = None,
                  kernel_options: dict[str, Any] | None = None, shader_dir: str | Path | None = None) -> Any:
    """The Vulkan backend where a device works (`auto` falls back to numpy with one warning).
    `kernel_options` (workgroup_size, subgroups, fp32) and `shader_dir` only concern Vulkan."""
    if device not in ("auto", "cpu", "vulkan"):
        raise ValueError(f"device {device!r}: choose auto, cpu or vulkan")
    if device in ("auto", "vulkan"):
        from . import vk

        ok, why = vk.available()
        if ok:
            try:
                from .vk import spirv
                from .vk.backend import VulkanBackend

                spirv.set_shader_dir(shader_dir)
                backend = VulkanBackend(archive, device_index, **(kernel_options or {}))
                if device == "vulkan" or backend.dev.info.type != "cpu":
                    return backend
                # a software rasterizer (lavapipe) is slower than numpy: auto keeps to the CPU backend
                backend.close()
                backend.dev.close()
                log.info("only a CPU Vulkan device (%s); using the numpy backend", backend.dev.info.name)
                why = ""
            except vk.VulkanError as e:
                why = str(e)
        if device == "vulkan":
            raise VkpackError(f"--device vulkan: no usable Vulkan device ({why})")
        if why:
            log.warning("Vulkan unavailable (%s); running on the CPU (numpy) backend", why)
    from .cpu.backend import CpuBackend

    return CpuBackend(archive)


def _load_tokenizer(tok: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(tok["json"])
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad JSON
        raise VkpackError(f"the archive's tokenizer does not load: {e}") from None
