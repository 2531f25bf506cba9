"""The engine: wires an archive, budgeted tiers, a backend and a loader, and runs generation.

Example:
    eng = Engine("smollm2.vkpack", vram_gb=0.25)
    print(eng.generate("The capital of France is", max_tokens=16, temperature=0))
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..pack_format.errors import VkpackError
from ..pack_format.reader import Archive
from .backend import Backend, BackendFactory, Placement
from .backends import make_backend
from .generation import TokenStream
from .graph import Executor, make_schedule
from .kv import KvSession, KvViews, layer_windows
from .metrics import Metrics
from .policy import POLICIES
from .prefetch import PackLoader
from .sampler import DEFAULT_PARAMS as _D, SamplingParams
from .tiers import DeviceTier, RamTier, plan_budgets
from .tokenizer import ArchiveTokenizer

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 4096
# the longest pass `stream` and `logits` feed a session whose windowed layers keep rings: a ring holds
# window + PREFILL_CHUNK - 1 rows (runtime/kv.py), so a longer chunk costs KV bytes on every such layer
PREFILL_CHUNK = 512


class Engine:
    """Runs one `.vkpack` archive under a device budget (`vram_gb`) and a RAM budget (`ram_gb`).

    Args:
        path: the archive.
        vram_gb: device tier budget in GiB (None: everything resident).
        ram_gb: budget for streamed packs kept in system memory, in GiB (None: unlimited).
        device: "auto", "cpu", "numpy" or "vulkan" (runtime/backends.py); or a factory `archive -> Backend` (runtime/backend.py).
        prefetch_lookahead: packs to load ahead along the access graph (0: on demand only); a backend
            loading from N threads raises it to at least 2N.
        policy: "graph" (Belady by next use in the graph) or "lru" (the baseline benchmarks compare against).
        context: the longest prompt + generation this engine accepts (default: the model's, at most 4096).
        threads: the numpy backend's product threads (default: one core fewer than the machine has).
        workgroup_size, subgroups, fp32, shader_dir: Vulkan kernel settings (--workgroup-size,
            --no-subgroups, --fp32, --shader-dir); see `vk.Ops.configure` and `vk.spirv.set_shader_dir`.
    """

    def __init__(self, path: str | Path, vram_gb: float | None = None, ram_gb: float | None = None,
                 device: str | BackendFactory = "auto", prefetch_lookahead: int = 3,
                 policy: str = "graph", context: int | None = None, threads: int | None = None,
                 device_index: int | None = None, workgroup_size: int | None = None, subgroups: bool = True,
                 fp32: bool = False, shader_dir: str | Path | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.archive = Archive(path)
        self.loader: PackLoader | None = None
        self.backend: Backend | None = None
        self.tier: DeviceTier | None = None
        try:
            self._wire(vram_gb, ram_gb, device, prefetch_lookahead, policy, context, threads, device_index,
                       {"workgroup_size": workgroup_size, "subgroups": subgroups, "fp32": fp32}, shader_dir)
        except BaseException:
            self.close()
            raise

    def _wire(self, vram_gb: float | None, ram_gb: float | None, device: str | BackendFactory, lookahead: int,
              policy: str, context: int | None, threads: int | None, device_index: int | None,
              kernel_options: dict[str, Any], shader_dir: str | Path | None) -> None:
        archive = self.archive
        self.hp = archive.hparams
        self.text = ArchiveTokenizer(archive.tokenizer)  # a bad tokenizer fails before any pack loads
        self.tokenizer = self.text.raw
        self.eos_ids = self.text.eos_ids
        self.bos_id = self.text.bos_id
        self.add_bos = self.text.add_bos
        self.backend = (make_backend(device, archive, threads, device_index, kernel_options, shader_dir)
                        if isinstance(device, str) else device(archive))
        self.context = min(context or min(self.hp["context"], DEFAULT_CONTEXT), self.hp["context"])
        self.n_token_ids = embedding_rows(archive)
        n_logits = archive.activation_widths.get(archive.graph["outputs"][0], 0)
        if n_logits > self.n_token_ids:  # a sampled id must be a row the next pass can embed
            raise VkpackError(f"the graph makes {n_logits} logits, but the embedding has {self.n_token_ids} rows")
        check_head_widths(archive)  # before any size is derived from the KV cache shape
        self.windows = layer_windows(archive.graph)   # layers whose KV caches may be rings
        self.schedule, where = make_schedule(archive.graph, archive.tensors)
        self.policy = POLICIES[policy](self.schedule)
        sizes = [self.backend.pack_bytes(p.id) for p in archive.packs]
        self.model_bytes = sum(sizes)
        plan = plan_budgets(sizes, self.backend, archive.graph["kv_cache"], self.context, vram_gb, ram_gb,
                            self.windows, PREFILL_CHUNK)
        self.min_bytes = plan.minimum
        self.weight_room_bytes = plan.weight_room
        self.metrics = Metrics(device_budget=plan.device, ram_budget=None if ram_gb is None else int(ram_gb * 2**30))
        self.tier = DeviceTier(plan.device, self.backend.max_block, self.backend.make_backing, self.policy)
        self.tier.evict_batch = plan.evict_batch
        placement = Placement(resident=not plan.streaming, ram_budget=plan.ram, model_bytes=self.model_bytes,
                              pass_tokens=min(self.context, 512 if plan.streaming else 2048))
        self.ram = RamTier(self.backend.attach(self.tier, placement), self.policy)
        workers = self.backend.load_workers
        if placement.resident:  # every pack is loaded at start and stays: nothing to fetch ahead
            lookahead = 0
        elif lookahead > 0 and workers > 1:  # a backend loading from several threads: keep them all busy
            lookahead = max(lookahead, 2 * workers)
        self.loader = PackLoader(archive, self.tier, self.ram, self.backend, self.schedule, lookahead, self.metrics)
        if placement.resident:  # the whole model fits: load it at start, as llama.cpp does
            self.loader.preload()
            self.tier.keep_packs = True
        self.executor = Executor(archive, self.backend, self.loader, where)

    # ---- tokens ----
    def check_ids(self, ids: Sequence[int]) -> None:
        """VkpackError unless every id names a row of the embedding (docs/FORMAT.md, op embed):
        a bad id would otherwise be a row no backend writes."""
        bad = next((i for i in ids if not 0 <= i < self.n_token_ids), None)
        if bad is not None:
            raise VkpackError(f"token id {bad} is outside the embedding's {self.n_token_ids} rows")

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.text.encode(text, add_bos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.text.decode(ids, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from .chat import render_chat

        return render_chat(self.archive.tokenizer, messages, add_generation_prompt)

    # ---- forward ----
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Last-position logits of one fresh pass over `ids` (float32, [vocab])."""
        self.check_ids(ids)
        session = self.kv_session(len(ids), self.pass_limit)
        with session as kv:
            return self.prefill(ids, kv, session.max_pass_tokens)[-1].copy()

    @property
    def pass_limit(self) -> int | None:
        """The pass limit `stream` and `logits` give their sessions: PREFILL_CHUNK where windowed layers
        can keep rings, else None (a whole prompt in one pass, as before)."""
        return PREFILL_CHUNK if self.windows else None

    def prefill(self, ids: Sequence[int], kv: list[tuple[Any, Any]], chunk: int, pos0: int = 0) -> np.ndarray:
        """Feed `ids` at positions pos0.. in passes of at most `chunk` tokens (the session's
        max_pass_tokens: a ring cache holds no more); returns the last pass's output rows."""
        ids = np.asarray(ids)
        for a in range(0, len(ids), chunk):
            out = self.executor.forward(ids[a:a + chunk], pos0 + a, kv)
        return out

    def kv_session(self, n_ctx: int, max_pass_tokens: int | None = None) -> KvSession:
        """`with eng.kv_session(n) as kv:` reserves one sequence's KV cache (and, for the numpy
        backend, activation room for passes of up to `max_pass_tokens` tokens, default n) in the
        device tier; BudgetError when the budget cannot hold it next to pinned packs. Windowed layers
        keep rings of window + max_pass_tokens - 1 rows: no pass of the session may feed more tokens."""
        return KvSession(self.tier, self.backend, self.archive.graph["kv_cache"], n_ctx, self.context,
                         max_pass_tokens, self.windows)

    def session_bytes(self, n_ctx: int, max_pass_tokens: int | None = None) -> int:
        """Device bytes one `kv_session(n_ctx, max_pass_tokens)` reserves."""
        return self.kv_session(n_ctx, max_pass_tokens).nbytes

    def forward_batch(self, seqs: list[tuple[Sequence[int], int, Any]]) -> np.ndarray:
        """Logits [n_seqs, vocab] for several sequences' next tokens in one weight stream.

        Each entry is (new token ids, position of the first, its kv from `kv_session`); VkpackError when
        one feeds more tokens than its session's max_pass_tokens (a ring cache would lose live rows)."""
        for t, p, kv in seqs:
            if isinstance(kv, KvViews) and len(t) > kv.max_pass_tokens:
                raise VkpackError(f"a pass of {len(t)} tokens at position {p}: its KV session takes at most "
                                  f"{kv.max_pass_tokens} per pass (kv_session's max_pass_tokens)")
        return self.executor.forward_batch([(np.asarray(t), p, kv) for t, p, kv in seqs])

    # ---- generation ----
    def token_stream(self, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int,
                     stop: Sequence[str] = (), ignore_eos: bool = False) -> TokenStream:
        """The per-token state of one sequence of this model (runtime/generation.py)."""
        self.check_ids(prompt_ids)
        return TokenStream(self.tokenizer, prompt_ids, params, max_tokens, self.eos_ids, stop, ignore_eos)

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = _D.temperature,
               top_k: int = _D.top_k, top_p: float = _D.top_p, min_p: float = _D.min_p,
               repeat_penalty: float = _D.repeat_penalty, repeat_last_n: int = _D.repeat_last_n,
               seed: int | None = None, stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Yield generated text piece by piece (never a broken UTF-8 character); sampling defaults
        come from `sampler.DEFAULT_PARAMS`, the table `vkpack run` and `vkpack serve` read too.

        The ids of the generated tokens are left in `self.last_ids`.
        """
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                                max_tokens=max_tokens, stop=tuple(stop))
        ids = list(prompt) if not isinstance(prompt, str) else self.encode(prompt)
        if not ids:
            raise VkpackError("empty prompt")
        if len(ids) + 1 > self.context:
            raise VkpackError(f"prompt of {len(ids)} tokens does not fit the context of {self.context} tokens")
        n_new = min(max_tokens, self.context - len(ids))
        seq = self.token_stream(ids, params, n_new, stop, ignore_eos)
        self.last_ids = seq.generated
        if n_new <= 0:
            return
        m = self.metrics
        session = self.kv_session(len(ids) + n_new, self.pass_limit)
        with session as kv:
            t0 = time.perf_counter()
            logits = self.prefill(ids, kv, session.max_pass_tokens)[-1]
            m.prefill_seconds += time.perf_counter() - t0
            m.prompt_tokens += len(ids)
            while True:
                piece = seq.push(logits)
                if piece:
                    yield piece
                if seq.done:
                    return
                t0 = time.perf_counter()
                logits = self.executor.forward(np.asarray(seq.history[-1:]), len(seq.history) - 1, kv)[-1]
                m.decode_seconds += time.perf_counter() - t0
                m.generated_tokens += 1

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> str:
        """The whole completion as one string; keyword arguments as in `stream`."""
        return "".join(self.stream(prompt, **kwargs))

    def stats(self) -> dict[str, Any]:
        m = self.metrics
        m.peak_device_bytes = self.tier.peak
        m.peak_ram_bytes = self.ram.peak + self.pinned_bytes
        return {**m.as_dict(), **self.executor.weights.experts.as_dict()}

    @property
    def pinned_bytes(self) -> int:
        """System memory the backend holds for streamed packs (counted in the RAM budget)."""
        return self.backend.host_bytes()

    def close(self) -> None:
        """Stop the loading threads and free the backend's memory and the archive (safe to call twice)."""
        if self.loader is not None:
            self.loader.close()
            self.loader = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.tier is not None:
            self.tier.entries.clear()  # payloads are views of the freed blocks: let them go too
        self.archive.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_head_widths(archive: Archive) -> None:
    """VkpackError unless each rope and attention op's head counts match the widths the tensors give
    (docs/FORMAT.md §5 leaves this to the runtime): the KV cache is sized from `kv_cache`, so its
    n_kv_heads x head_dim must be the k and v widths, not any count up to 2^40 each."""
    widths = archive.activation_widths
    kv = archive.graph["kv_cache"]
    for s in archive.graph["steps"]:
        for op in s["ops"]:
            a, ins = op["attrs"], op["in"]
            if op["op"] == "rope":
                want = {ins[0]: a["n_heads"] * a["head_dim"]}
            elif op["op"] == "attention":
                kv_width = kv["n_kv_heads"] * kv["head_dim"]
                want = {ins[0]: a["n_heads"] * a["head_dim"], ins[1]: kv_width, ins[2]: kv_width}
            else:
                continue
            for name, width in want.items():
                if widths.get(name) != width:
                    raise VkpackError(f"graph step {s['name']!r}: {op['op']} expects {name!r} {width} wide "
                                      f"(heads x head_dim), but the tensors make it {widths.get(name)}")


def embedding_rows(archive: Archive) -> int:
    """The fewest rows of any weight an `embed` op gathers from: token ids must be below it."""
    rows = [math.prod(archive.tensors[op["w"][0]].shape[:-1]) for s in archive.graph["steps"] for op in s["ops"]
            if op["op"] == "embed"]
    return min(rows, default=0)
