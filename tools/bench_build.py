"""Benchmark `vkpack build`: build MB/s of source, ratio and decode GB/s per codec, verify GB/s.

Models: the real SmolLM2-135M-Instruct (Q4_1 + Q8_0 + F32 GGUF) and a synthetic ~1 GB F16 llama
GGUF (random N(0, 0.02) weights); without --quick also a small BF16 HF folder and an F32 GGUF.
Baselines come from the same run: a cold and a warm sequential read of the source (8 MiB reads,
page cache dropped first when /proc/sys/vm/drop_caches is writable) and `shutil.copyfile` +
fsync, the pure-I/O ceiling a build (which also reads everything and fsyncs) is compared with.
For `--codec none` a timed run wraps the build's steps to show where the seconds go.

Usage: python tools/bench_build.py [--work DIR] [--quick] [--write-docs]
Not part of the test suite (a full run takes a few minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_synthetic as ms
from bench_docs import DOCS, cpu_and_memory, write_section
import smollm2
from vkpack.compiler.build import BuildStats, build
from vkpack.pack_format.reader import Archive

CODECS = ("none", "blosc2-zstd", "blosc2-lz4", "zfp", "auto")
READ_CHUNK = 8 << 20


@dataclass
class Model:
    label: str
    path: Path
    note: str


@dataclass
class Row:
    model: str
    codec: str
    seconds: list[float]
    stats: BuildStats
    decode1: float = 0.0
    decode2: float = 0.0
    verify: float = 0.0
    dtype_ratio: dict[str, tuple[int, int]] = field(default_factory=dict)


# ---- models ----


def _small_spec(layers: int, vocab: int) -> ms.Spec:
    return ms.Spec(arch="llama", layers=layers, hidden=1024, heads=16, kv_heads=4, ffn=4096, vocab=vocab)


def models(work: Path, quick: bool) -> list[Model]:
    """The benchmark's inputs, writing the synthetic ones into `work` on first use."""
    out = [Model("SmolLM2-135M Q4_1", smollm2.smollm2_gguf(), "real trained weights, Q4_1 + Q8_0 + F32 norms")]
    spec = ms.Spec.llama_1b().with_target_gb(1.0, "F16")
    big = work / f"synthetic-llama-{spec.layers}L-F16.gguf"
    if not big.exists():
        ms.write_gguf(big, spec, dtype="F16", seed=0)
    out.append(Model("synthetic 1 GB F16", big, f"llama, {spec.layers} layers, hidden {spec.hidden}, ffn {spec.ffn}, "
                                                "vocab 49152, tied; random N(0, 0.02)"))
    if not quick:
        bf16 = _small_spec(4, 16384)
        hf = work / "synthetic-llama-4L-h1024-BF16-hf"
        if not (hf / "config.json").exists():
            ms.write_hf(hf, bf16, dtype="BF16", seed=0)
        out.append(Model("synthetic BF16 HF", hf, "llama, 4 layers, hidden 1024, vocab 16384, HF safetensors "
                                                  "folder; random N(0, 0.02)"))
        f32s = _small_spec(2, 8192)  # small: zfp runs at ~50-130 MB/s
        f32 = work / "synthetic-llama-2L-h1024-F32.gguf"
        if not f32.exists():
            ms.write_gguf(f32, f32s, dtype="F32", seed=0)
        out.append(Model("synthetic F32", f32, "llama, 2 layers, hidden 1024, vocab 8192; random N(0, 0.02)"))
    return out


def source_files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else [src]


def _source_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in source_files(src))


# ---- baselines ----


def drop_caches() -> bool:
    """Empty the page cache (root only; some containers forbid it). Returns whether it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_all(files: list[Path]) -> float:
    """Seconds to read `files` sequentially in READ_CHUNK reads into one reused buffer."""
    buf = bytearray(READ_CHUNK)
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def copy_all(files: list[Path], dest: Path) -> float:
    """Seconds for shutil.copyfile of every file plus an fsync of each copy (a build fsyncs too)."""
    dest.mkdir(parents=True, exist_ok=True)
    outs = [dest / p.name for p in files]
    for o in outs:
        o.unlink(missing_ok=True)
    prefault(sum(p.stat().st_size for p in files) + (512 << 20))
    t0 = time.perf_counter()
    for p, o in zip(files, outs):
        shutil.copyfile(p, o)
        fd = os.open(o, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dt = time.perf_counter() - t0
    for o in outs:
        o.unlink()
    return dt


# ---- build, decode, verify ----


PREFAULT_S: list[float] = []  # seconds per GiB that each prefault() took


def prefault(nbytes: int) -> None:
    """Touch and free `nbytes` of anonymous memory so the next step finds hot free pages.

    This VM (Firecracker, virtio-balloon free page reporting) hands idle guest memory back to the
    host; touching such memory again costs ~2-3 s/GiB, whoever touches it. Every archive or copy
    written lands in fresh page-cache pages, so without this the measurement is mostly that cost.
    """
    t0 = time.perf_counter()
    a = np.ones(nbytes, dtype=np.uint8)
    del a
    PREFAULT_S.append((time.perf_counter() - t0) / (nbytes / 2**30))


def timed_build(src: Path, out: Path, codec: str, hot: bool = True) -> tuple[float, BuildStats]:
    out.unlink(missing_ok=True)  # replacing an old archive would charge its unlink to the build
    if hot:
        prefault(_source_bytes(src) + (512 << 20))
    t0 = time.perf_counter()
    stats = build(src, out, codec=codec, progress=False)
    return time.perf_counter() - t0, stats


def decode_gbps(out: Path, threads: int) -> float:
    """GB/s of raw bytes: read_pack(verify=False) of every pack, copied into a staging buffer.

    The copy stands for the upload that follows a decode; for `none` read_pack is a zero-copy
    view of the mmap, so that number is the page-cache-to-memory copy alone.
    """
    with Archive(out) as a:
        biggest = max(p.raw_size for p in a.packs)
        local = threading.local()

        def one(i: int) -> int:
            dst = getattr(local, "dst", None)
            if dst is None:
                dst = local.dst = np.empty(biggest, dtype=np.uint8)
            raw = a.read_pack(i, verify=False)
            n = len(raw)
            dst[:n] = np.frombuffer(raw, dtype=np.uint8)  # numpy copies without the GIL
            del raw
            return n

        ids = [p.id for p in a.packs]
        t0 = time.perf_counter()
        if threads == 1:
            total = sum(one(i) for i in ids)
        else:
            with ThreadPoolExecutor(threads) as pool:
                total = sum(pool.map(one, ids))
        return total / 1e9 / (time.perf_counter() - t0)


def verify_gbps(out: Path) -> float:
    """GB/s of archive file for Archive.verify() (crc32 of stored bytes, decode, crc32 of raw)."""
    with Archive(out) as a:
        t0 = time.perf_counter()
        bad = a.verify()
        dt = time.perf_counter() - t0
    if bad:
        raise SystemExit(f"{out}: verify found bad packs: {bad[:3]}")
    return out.stat().st_size / 1e9 / dt


def dtype_ratios(out: Path) -> dict[str, tuple[int, int]]:
    """Main dtype of each pack (by bytes) -> (raw bytes, stored bytes) summed over packs."""
    with Archive(out) as a:
        per_pack: dict[int, dict[str, int]] = {}
        for t in a.tensors.values():
            for part in t.parts:
                d = per_pack.setdefault(part.pack, {})
                d[t.dtype] = d.get(t.dtype, 0) + part.nbytes
        acc: dict[str, tuple[int, int]] = {}
        for p in a.packs:
            main = max(per_pack[p.id], key=lambda k: per_pack[p.id][k])
            raw, stored = acc.get(main, (0, 0))
            acc[main] = (raw + p.raw_size, stored + p.stored_size)
    return acc


# ---- where the time goes ----


class Timeline:
    """Wraps functions by module attribute and records (label, thread kind, start, end) per call."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.events: list[tuple[str, str, float, float]] = []
        self._undo: list[tuple[Any, str, Any]] = []
        self._lock = threading.Lock()

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        orig = getattr(owner, attr, None)
        if orig is None:
            return

        def timed(*a: Any, **k: Any) -> Any:
            s = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                e = time.perf_counter()
                name = threading.current_thread().name
                kind = "main" if name == "MainThread" else "pool" if name.startswith("vkpack-build") else "thread"
                with self._lock:
                    self.events.append((label, kind, s - self.t0, e - self.t0))

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig))

    def restore(self) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)
        self._undo.clear()

    def summary(self) -> list[tuple[str, str, int, float, float, float]]:
        """Per label: thread kind, calls, summed seconds, first start, last end (in call order)."""
        rows: dict[str, list[Any]] = {}
        for label, kind, s, e in self.events:
            r = rows.setdefault(label, [kind, 0, 0.0, s, e])
            if kind not in r[0].split("+"):
                r[0] += "+" + kind
            r[1] += 1
            r[2] += e - s
            r[3], r[4] = min(r[3], s), max(r[4], e)
        return sorted(((k, *v) for k, v in rows.items()), key=lambda r: r[4])


def breakdown(src: Path, out: Path) -> tuple[float, BuildStats, list[tuple[str, str, int, float, float, float]]]:
    """One `--codec none` build with its steps timed (the wrappers cost microseconds per call)."""
    import zlib

    from vkpack.compiler import build as b
    from vkpack.compiler import tokenizer
    from vkpack.compiler.sources import base
    from vkpack.compiler.sources import gguf as src_gguf
    from vkpack.compiler.sources import safetensors as src_st
    from vkpack.pack_format import writer

    tl = Timeline()
    tl.wrap(b, "open_source", "open source (all of the below parse steps)")
    tl.wrap(src_gguf, "read_gguf_header", "  GGUF header + metadata parse (compiler/sources/gguf_header.py)")
    tl.wrap(src_st, "read_safetensors", "  safetensors headers")
    tl.wrap(tokenizer, "tokenizer_from_gguf", "  tokenizer conversion")
    tl.wrap(tokenizer, "tokenizer_from_hf_folder", "  tokenizer conversion")
    tl.wrap(b, "plan_packs", "plan packs")
    tl.wrap(base.Source, "provenance", "sha256 provenance (background thread)")
    tl.wrap(b, "_make_pack", "gather + encode one pack (pool)")
    tl.wrap(base.FileReader, "read_into", "  pread rows into the pack buffer")
    tl.wrap(zlib, "crc32", "  crc32 (inside encode)")
    tl.wrap(writer.ArchiveWriter, "add_pack", "write packs (main thread)")
    tl.wrap(writer, "pack_index", "index msgpack")
    tl.wrap(os, "fsync", "fsync")
    tl.wrap(os, "replace", "rename into place")
    out.unlink(missing_ok=True)
    prefault(_source_bytes(src) + (512 << 20))
    try:
        tl.t0 = time.perf_counter()
        stats = build(src, out, codec="none", progress=False)
        dt = time.perf_counter() - tl.t0
    finally:
        tl.restore()
    return dt, stats, tl.summary()


# ---- report ----


def parallelism() -> str:
    """Load average and the 2-thread speedup of sha256 (GIL-free) right now: the machine is shared."""
    import hashlib

    buf = os.urandom(32 << 20)
    t0 = time.perf_counter()
    for _ in range(4):
        hashlib.sha256(buf).digest()
    one = time.perf_counter() - t0
    with ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda _: hashlib.sha256(buf).digest(), range(4)))
        two = time.perf_counter() - t0
    return f"load average {os.getloadavg()[0]:.1f}, 2-thread speedup {one / two:.2f}x"



def machine() -> dict[str, str]:
    cpu, mem = cpu_and_memory()

    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "missing"

    return {"cpu": cpu, "ram": mem, "os": f"Linux {platform.release()}",
            "python": platform.python_version(),
            "packages": ", ".join(f"{p} {ver(p)}" for p in ("numpy", "blosc2", "zfpy", "gguf", "msgpack"))}


def fs_of(path: Path) -> str:
    best = ("", "?", "?")
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for ln in f:
            _dev, mnt, typ, opts = ln.split()[:4]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, typ, opts.split(",")[0])
    return f"{best[1]} on {best[0]}"


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def render(info: dict[str, Any], base_rows: list[dict[str, Any]], rows: list[Row],
           parts: dict[str, tuple[float, BuildStats, list]]) -> str:
    m = info["machine"]
    L = [f"Machine: {m['cpu']}, {m['ram']} RAM, {m['os']}, Python {m['python']}; {m['packages']}.  ",
         f"Work dir: `{info['work']}` ({info['fs']}). Date: {info['date']}.  ",
         f"Command: `{info['command']}` ({info['seconds']:.0f} s in all).  ",
         (f"Shared machine: at the start {info['par'][0]}; at the end {info['par'][1]} (other sessions' work "
         "makes single runs vary by up to 2x; build times are medians)."), "",
         ("MB = 1e6 bytes, GB = 1e9. *Source MB/s* counts tensor bytes over the whole `build()` call (parse, "
         "packs, index, fsync), as `vkpack build` prints it; *x copy* is copy time / build time for the same "
         "files, where copy = `shutil.copyfile` + fsync of the source (the pure-I/O ceiling, same run, median). "
         "Ratio = raw / stored. Thread seconds (gather, encode, write) are summed over threads. "
         f"Decode = `read_pack(i, verify=False)` of every pack plus a copy into a staging buffer, 1 and 2 threads, "
         "GB/s of raw bytes; verify = `Archive.verify()`, GB/s of archive file. All reads after the build are warm "
         "(page cache). Before each timed copy and build the tool touches and frees source size + 512 MiB of "
         "memory (*prefault*), because this VM charges "
         f"{info['prefault']} for memory it has handed back to the host; *no prefault* is one build without that, "
         "as a user of this VM sees it. *Cold* = after `echo 3 > /proc/sys/vm/drop_caches`."), "",
         "### Source baselines", "",
         ("| model | source | size MB | cold read MB/s | warm read MB/s | copy+fsync MB/s | build none MB/s | "
         "build none x copy | build none, no prefault MB/s | cold build none MB/s |"),
         "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for b in base_rows:
        cold = _f(b["cold_read"], 0) if b["cold_read"] else "n/a"
        cb = _f(b["cold_build"], 0) if b["cold_build"] else "n/a"
        L.append(f"| {b['model']} | {b['note']} | {b['size'] / 1e6:.0f} | {cold} | {b['warm_read']:.0f} | "
                 f"{b['copy']:.0f} | {b['build_none']:.0f} | {b['frac']:.2f} | {b['no_prefault']:.0f} | {cb} |")
    L += ["", "### Build, decode and verify per codec", "",
          ("| model | codec | build s | source MB/s | x copy | ratio | stored MB | packs by codec | gather s | "
          "encode s | write s | decode 1T GB/s | decode 2T GB/s | verify GB/s |"),
          "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|"]
    copy_s = {b["model"]: b["copy_s"] for b in base_rows}
    for r in rows:
        s = r.stats
        sec = statistics.median(r.seconds)
        spread = f" ({min(r.seconds):.2f}-{max(r.seconds):.2f})" if len(r.seconds) > 1 else ""
        by = " ".join(f"{k}:{v}" for k, v in sorted(s.codecs.items()))
        L.append(f"| {r.model} | {r.codec} | {sec:.2f}{spread} | {s.source_bytes / 1e6 / sec:.0f} | "
                 f"{copy_s[r.model] / sec:.2f} | {s.raw_bytes / max(s.stored_bytes, 1):.3f} | "
                 f"{s.stored_bytes / 1e6:.0f} | {by} | {s.time_gather:.2f} | {s.time_encode:.2f} | "
                 f"{s.time_write:.2f} | {r.decode1:.2f} | {r.decode2:.2f} | {r.verify:.2f} |")
    L += ["", "### Compression ratio by the pack's main dtype (`--codec blosc2-zstd`, every pack compressed)", "",
          "| model | dtype | raw MB | stored MB | ratio |", "|---|---|--:|--:|--:|"]
    for r in rows:
        for d, (raw, st) in sorted(r.dtype_ratio.items()):
            L.append(f"| {r.model} | {d} | {raw / 1e6:.1f} | {st / 1e6:.1f} | {raw / st:.3f} |")
    for label, (dt, stats, summ) in parts.items():
        L += ["", (f"### Where the time goes: {label}, `--codec none` ({dt:.2f} s, "
              f"{stats.source_bytes / 1e6 / dt:.0f} MB/s)"), "",
              ("The faster of two runs. Each step's calls timed by wrapping it; *from/to* are seconds since "
              "`build()` started, *sum* adds up every call (steps on the pool and the background thread "
              "overlap the main thread)."), "",
              "| step | thread | calls | sum s | from s | to s |", "|---|---|--:|--:|--:|--:|"]
        for name, kind, n, tot, s0, s1 in summ:
            L.append(f"| {name.replace(' ', '&nbsp;', 2) if name.startswith('  ') else name} | {kind} | {n} | "
                     f"{tot:.3f} | {s0:.3f} | {s1:.3f} |")
        L.append(f"| (BuildStats thread seconds) | pool / main | | gather {stats.time_gather:.3f}, encode "
                 f"{stats.time_encode:.3f}, write {stats.time_write:.3f} | | |")
    return "\n".join(L) + "\n"


NOTES = """
Notes (from the runs made while writing this tool; the tables above are this run's):
- **Ratios.** blosc2-zstd level 1 with byte shuffle on random N(0, 0.02) weights: F16 1.18x, BF16 1.45x, F32
  1.18x; lz4 1.00-1.13x; zfp's reversible mode 1.00x on F32 at ~50-130 MB/s (`auto` never picks it). SmolLM2's
  trained Q4_1 / Q8_0 blocks: 1.04x / 1.06x, so with `auto`'s bar now at 5 % only the Q8_0 embedding packs are
  compressed (a blosc2 pack decodes at ~1-1.5 GB/s where a raw one loads zero-copy). Random weights are not trained weights (no trained
  F16/BF16 model is available offline here, so that ratio is unmeasured), but nothing measured comes near the
  2-3x the seed project claimed: a lossless codec gains only the exponent bits' redundancy.
- **The GGUF parse was most of a `--codec none` build** while the compiler used `gguf.GGUFReader`: ~1.6-2.5 s
  for a 49k-token vocabulary (0.25 s for 8k), whatever the weights' size, since every vocabulary entry and merge
  became a numpy memmap slice (~1M `memmap.__array_finalize__` calls for SmolLM2). The compiler now parses the
  header itself (`compiler/sources/gguf_header.py`, 0.05 s for SmolLM2); the step table above times it.
- **Noise.** `--codec zfp` on an F16 model stores all but the all-F32 packs raw, so it does nearly the same
  work as `none`; the spread between those rows (and the load line above) is the shared machine, not the codec.
- **After the parse** the pack pipeline (pread into the pack buffer, crc32, write) and the sha256 provenance
  thread share the two cores; sha256 (~1.9 GB/s alone) finishes last on the 1 GB model. Its `f.read(8 MiB)` loop
  now uses `hashlib.file_digest` (a reused buffer) rather than a fresh 8 MiB per chunk.
- **Not the disk.** copy + fsync of the source runs at ~1.5-2 GB/s with hot memory, and a warm read at
  ~6-20 GB/s, so a build is limited by our CPU work (parse, hashing, checksums), not by reading the source.
  A cold read (guest page cache dropped; the host may still hold the file) ran at 0.5-3.4 GB/s.
- **This VM hands idle memory back to its host** (virtio-balloon free page reporting); touching it again costs
  1-3 s/GiB, charged to whatever writes a new file or allocates a new buffer. Hence the prefault before each
  timed step, and the *no prefault* column for what a user of this VM sees.
- **blosc2 and the GIL.** python-blosc2 4.x holds the GIL in `compress2`/`decompress2` unless
  `blosc2.set_releasegil(True)` was called (its default is False), so compressing "in parallel threads"
  serialised. `compiler/codecs.py` now sets it before the first blosc2 encode; the decode columns above ran in
  the same process, so they have it too. A reader-only process does not until `pack_format/codecs.py` sets it.
"""


# ---- main ----


def run(work: Path, quick: bool, repeat: int) -> tuple[dict[str, Any], list[dict[str, Any]], list[Row], dict]:
    t_start = time.perf_counter()
    par_start = parallelism()
    work.mkdir(parents=True, exist_ok=True)
    outdir = work / "out"
    outdir.mkdir(exist_ok=True)
    base_rows, rows, parts = [], [], {}
    for m in models(work, quick):
        files = source_files(m.path)
        size = sum(p.stat().st_size for p in files)
        print(f"== {m.label}: {m.path} ({size / 1e6:.0f} MB)", file=sys.stderr)
        dropped = drop_caches()
        cold = size / 1e6 / read_all(files) if dropped else 0.0
        warm = size / 1e6 / read_all(files)
        copy_s = statistics.median(copy_all(files, outdir / "copy") for _ in range(repeat))
        out = outdir / "bench.vkpack"
        for codec in CODECS:
            secs, stats = [], None
            for _ in range(repeat if codec == "none" else max(1, repeat - 1)):
                dt, stats = timed_build(m.path, out, codec)
                secs.append(dt)
            row = Row(m.label, codec, secs, stats)
            row.decode1, row.decode2 = decode_gbps(out, 1), decode_gbps(out, 2)
            row.verify = verify_gbps(out)
            if codec == "blosc2-zstd":
                row.dtype_ratio = dtype_ratios(out)
            rows.append(row)
            print(f"   {codec:12s} {statistics.median(secs):6.2f} s  ratio {stats.raw_bytes / stats.stored_bytes:.3f}",
                  file=sys.stderr)
        if m.path.suffix == ".gguf":  # the faster of two runs: the machine is shared
            parts[m.label] = min((breakdown(m.path, out) for _ in range(2)), key=lambda r: r[0])
        dt, stats = timed_build(m.path, out, "none", hot=False)
        no_prefault = stats.source_bytes / 1e6 / dt
        cold_build = 0.0
        if dropped and not quick:
            drop_caches()
            dt, stats = timed_build(m.path, out, "none")
            cold_build = stats.source_bytes / 1e6 / dt
        out.unlink(missing_ok=True)
        none = next(r for r in rows if r.model == m.label and r.codec == "none")
        none_s = statistics.median(none.seconds)
        base_rows.append({"model": m.label, "note": m.note, "size": size, "cold_read": cold, "warm_read": warm,
                          "copy": size / 1e6 / copy_s, "copy_s": copy_s,
                          "build_none": none.stats.source_bytes / 1e6 / none_s, "frac": copy_s / none_s,
                          "cold_build": cold_build, "no_prefault": no_prefault})
    info = {"machine": machine(), "work": str(work), "fs": fs_of(work),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + shlex.join(["tools/bench_build.py", *sys.argv[1:]]),
            "seconds": time.perf_counter() - t_start, "par": (par_start, parallelism()),
            "prefault": f"{statistics.median(PREFAULT_S):.2f} s/GiB (median of {len(PREFAULT_S)}; "
                        f"{min(PREFAULT_S):.2f}-{max(PREFAULT_S):.2f})"}
    return info, base_rows, rows, parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=smollm2.cache_root() / "bench",
                    help="folder for the synthetic models (kept) and the archives (deleted)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 and the 1 GB model only, one run each, no cold build")
    ap.add_argument("--repeat", type=int, default=None, help="runs of the copy ceiling and of --codec none (median)")
    ap.add_argument("--write-docs", action="store_true", help=f"replace this tool's section of {DOCS}")
    args = ap.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    info, base_rows, rows, parts = run(args.work, args.quick, repeat)
    section = render(info, base_rows, rows, parts)
    print(section)
    if args.write_docs:
        write_section("bench_build", "## Build (vkpack build)", f"{section}\n{NOTES}")
        print(f"wrote {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
