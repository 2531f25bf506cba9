"""`vkpack build`: source model -> `.vkpack` archive, streaming and deterministic.

Packs are gathered from the source's mmap and compressed on worker threads (blosc2, zlib and
hashlib release the GIL), then written strictly in plan order by the calling thread, with a
bounded number in flight so peak memory stays a few packs whatever the model size.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..pack_format.constants import FORMAT_MAJOR, FORMAT_MINOR
from ..pack_format.errors import FormatError, SourceError
from ..pack_format.shapes import activation_widths
from ..pack_format.writer import ArchiveWriter
from .archs import family_for
from .codecs import CHOICES, Encoded, encode_pack
from .hparams_check import check_hparams, check_source_keys
from .plan import PlannedPack, attach_packs, plan_packs, tensor_table
from .sources import open_source
from .sources.base import FileReader, SourceTensor

log = logging.getLogger(__name__)
DEFAULT_MAX_PACK_MB = 32
MAX_PACK_MB_LIMIT = 128  # one Vulkan storage-buffer binding on lavapipe


@dataclass
class BuildStats:
    packs: int = 0
    tensors: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    source_bytes: int = 0
    seconds: float = 0.0
    codecs: dict[str, int] = field(default_factory=dict)
    time_gather: float = 0.0   # copying tensor rows out of the source mmap (reads the disk)
    time_encode: float = 0.0   # compression and checksums
    time_write: float = 0.0    # writing the archive

    def as_dict(self, out: Path) -> dict[str, Any]:
        return {"output": str(out), "packs": self.packs, "tensors": self.tensors, "raw_bytes": self.raw_bytes,
                "stored_bytes": self.stored_bytes, "ratio": round(self.raw_bytes / max(self.stored_bytes, 1), 4),
                "seconds": round(self.seconds, 3), "source_bytes": self.source_bytes,
                "mb_per_s": round(self.source_bytes / 1e6 / max(self.seconds, 1e-9), 1), "codecs": self.codecs,
                "thread_seconds": {"gather": round(self.time_gather, 3), "encode": round(self.time_encode, 3),
                                   "write": round(self.time_write, 3)}}


def default_output(src: Path) -> Path:
    """model.gguf -> model.vkpack; model.safetensors -> model.vkpack; a folder or index -> <folder>.vkpack."""
    if src.is_dir():
        return src.parent / f"{src.name}.vkpack"
    if src.name.endswith(".index.json"):
        return src.parent.parent / f"{src.parent.name}.vkpack"
    return src.with_suffix(".vkpack")


def build(src: str | Path, out: str | Path | None = None, codec: str = "auto", max_pack_mb: float = DEFAULT_MAX_PACK_MB,
          threads: int | None = None, progress: bool | None = None) -> BuildStats:
    """Compile `src` into an archive at `out`; returns the build statistics."""
    t0 = time.perf_counter()
    src = Path(src)
    out = Path(out) if out else default_output(src)
    if codec not in CHOICES:
        raise ValueError(f"--codec {codec!r}: choose one of {', '.join(CHOICES)}")
    if not 1 <= max_pack_mb <= MAX_PACK_MB_LIMIT:
        raise ValueError(f"--max-pack-mb {max_pack_mb}: must be between 1 and {MAX_PACK_MB_LIMIT}")
    threads = threads or os.cpu_count() or 1
    source = open_source(src)
    family = family_for(source)
    check_source_keys(source)
    hp = _family_hparams(family, source)
    tensors, freq_factors = _normalize(source, family, hp)
    check_hparams(hp, tensors, source.format)  # before the graph: its size comes from n_layers
    plan = plan_packs(tensors, family, int(max_pack_mb * (1 << 20)))
    graph = attach_packs(family.graph(hp, set(tensors), freq_factors), plan)
    for s in graph["steps"]:
        if not s["packs"]:
            raise SourceError(f"the {s['name']} step has no weights")
    try:  # the runtime sizes its activation buffers from this map (docs/FORMAT.md §8.4)
        graph["activations"] = activation_widths(graph, tensors)
    except FormatError as e:
        raise SourceError(f"the model's tensor shapes do not fit its graph: {e}") from None

    stats = BuildStats(tensors=len(tensors), source_bytes=sum(t.nbytes for t in tensors.values()))
    provenance: dict[str, Any] = {}
    hasher = threading.Thread(target=lambda: provenance.setdefault("files", source.provenance()), daemon=True)
    hasher.start()
    lock = threading.Lock()
    records: list[dict[str, Any]] = []
    bar = _progress_bar(stats.source_bytes, progress)
    with ArchiveWriter(out) as writer, FileReader() as reader, \
            ThreadPoolExecutor(threads, thread_name_prefix="vkpack-build") as pool:
        pending: deque = deque()

        def drain_one() -> None:
            p, enc = pending.popleft()
            enc = enc.result()
            tw = time.perf_counter()
            offset = writer.add_pack(enc.stored)
            stats.time_write += time.perf_counter() - tw
            records.append({"id": p.id, "kind": p.kind, "layer": p.layer, "offset": offset,
                            "stored_size": len(enc.stored), "raw_size": p.size, "codec": enc.codec,
                            "codec_params": enc.params, "crc32": enc.crc32, "raw_crc32": enc.raw_crc32})
            stats.raw_bytes += p.size
            stats.stored_bytes += len(enc.stored)
            stats.codecs[enc.codec] = stats.codecs.get(enc.codec, 0) + 1
            if bar is not None:
                bar.update(sum(s.nbytes for s in p.slices))

        try:
            for p in plan:
                pending.append((p, pool.submit(_make_pack, p, codec, stats, lock, reader)))
                while len(pending) > 2 * threads:
                    drain_one()
            while pending:
                drain_one()
        except BaseException:
            for _, f in pending:
                f.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
        hasher.join()
        index = {
            "format": [FORMAT_MAJOR, FORMAT_MINOR],
            "generator": f"vkpack {__version__}",
            "source": {"format": source.format, "files": provenance["files"]},
            "arch": family.name,
            "hparams": hp,
            "tokenizer": source.tokenizer.to_dict(),
            "tensors": tensor_table(plan, tensors),
            "packs": records,
            "graph": graph,
            "build": {"codec": codec, "max_pack_mb": max_pack_mb},
        }
        try:  # the reader's own checks, on the index as it will be written: never an archive readers reject
            writer.finish(index, validate=True)
        except FormatError as e:
            raise SourceError(f"the compiled archive would be invalid: {e}") from None
    stats.packs = len(records)
    stats.seconds = time.perf_counter() - t0
    return stats


def _family_hparams(family: Any, source: Any) -> dict[str, Any]:
    """The family's normalized hyperparameters; check_source_keys has vetted what it reads, and
    anything it still trips on is the source's fault, reported as such."""
    try:
        return family.hparams(source)
    except (ArithmeticError, TypeError, ValueError, AttributeError, KeyError) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"the model's hyperparameters are unusable: {type(e).__name__}: {e}") from None


def _make_pack(p: PlannedPack, codec: str, stats: BuildStats, lock: threading.Lock, reader: FileReader) -> Encoded:
    t0 = time.perf_counter()
    dtypes: dict[str, int] = {}
    raw = bytearray(p.size)
    view = memoryview(raw)
    for s in p.slices:
        dtypes[s.tensor.dtype] = dtypes.get(s.tensor.dtype, 0) + s.nbytes
        reader.read_into(s.tensor, s.row_start, s.row_end, view[s.offset:s.offset + s.nbytes])
    t1 = time.perf_counter()
    enc = encode_pack(raw, dtypes, codec)
    t2 = time.perf_counter()
    with lock:
        stats.time_gather += t1 - t0
        stats.time_encode += t2 - t1
    return enc


def _normalize(source: Any, family: Any, hp: dict[str, Any]) -> tuple[dict[str, SourceTensor], list[float] | None]:
    """Normalized name -> tensor, and the rope frequency divisors if the model scales rope."""
    tensors: dict[str, SourceTensor] = {}
    freq_factors = None
    for name, t in family.source_tensors(source, hp):  # HF names normalized, fused tensors split
        if name == "rope_freqs.weight":  # llama3 scaling baked into the GGUF as divisors
            if t.dtype == "F32" and t.shape != (hp["rope_dim"] // 2,):
                raise SourceError(f"tensor 'rope_freqs.weight' has shape {list(t.shape)}, but rope_dim "
                                  f"{hp['rope_dim']} needs [{hp['rope_dim'] // 2}]")
            freq_factors = [float(v) for v in np.frombuffer(t.read(), dtype="<f4")] if t.dtype == "F32" else None
            continue
        if name in tensors:
            raise SourceError(f"tensor {name!r} appears twice")
        tensors[name] = SourceTensor(name, t.dtype, t.shape, t.nbytes, t.path, t.offset)
    if freq_factors is None and hp.get("rope_scaling"):
        try:
            freq_factors = rope_freq_factors(hp)
        except (ArithmeticError, TypeError, ValueError, KeyError) as e:
            if isinstance(e, SourceError):
                raise
            raise SourceError(f"rope scaling {hp['rope_scaling']!r} is unusable: {type(e).__name__}: {e}") from None
    if "token_embd.weight" not in tensors:
        raise SourceError("the model has no token embedding (token_embd.weight / model.embed_tokens.weight)")
    return tensors, freq_factors


def rope_freq_factors(hp: dict[str, Any]) -> list[float]:
    """Per-frequency divisors for linear and llama3 rope scaling (what llama.cpp stores as rope_freqs)."""
    sc = hp["rope_scaling"]
    dim, base = hp["rope_dim"], hp["rope_theta"]
    n = dim // 2
    if sc["type"] == "linear":
        return [float(sc["factor"])] * n
    if sc["type"] != "llama3":
        raise SourceError(f"rope scaling type {sc['type']!r} is not supported (linear and llama3 are)")
    factor, old = sc["factor"], sc["original_context"]
    lo, hi = old / sc.get("low_freq_factor", 1.0), old / sc.get("high_freq_factor", 4.0)
    out = []
    for i in range(n):
        inv = base ** (-2 * i / dim)
        wavelen = 2 * math.pi / inv
        if wavelen < hi:
            new = inv
        elif wavelen > lo:
            new = inv / factor
        else:
            smooth = (old / wavelen - sc.get("low_freq_factor", 1.0)) / (sc.get("high_freq_factor", 4.0) - sc.get("low_freq_factor", 1.0))
            new = (1 - smooth) * inv / factor + smooth * inv
        out.append(inv / new)
    return out


def _progress_bar(total: int, progress: bool | None):
    import sys

    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="build", file=sys.stderr)
