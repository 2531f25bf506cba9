"""A seeded mutation fuzzer for every untrusted input of vkpack, each case in its own limited process.

Targets: archives (`vkpack verify` + `run`), GGUF files and HF folders (safetensors, config.json,
tokenizer configs) (`vkpack build` + `run`), chat templates (`run --chat`), and server requests (a
real server, one process per batch). Each case runs under `ulimit -v 4000000` (RLIMIT_AS) with a
60 s wall limit, and is counted as one of:

    ok            exit 0 (accepted input)            rejected   one-line error, non-zero exit
    traceback     a Python traceback, or a crash     hang       over the time limit
    alloc_refused MemoryError / "out of memory"      exit0_on_invalid  exit 0 (HTTP 2xx) on input the
                                                                 spec says must be rejected

Mutations that the spec says must be rejected are labelled so (a truncated file, a flipped pack
byte under `verify`, a block_count that disagrees with the tensors, an unsupported request
field...); random ones are not, and only the first four counters apply to them.

    python tools/fuzz_hostile.py --minutes 30 --seed 1 --out fuzz.json     # docs/HOSTILE.md
    python tools/fuzz_hostile.py --cases 2 --seed 0                        # a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

MEMORY_KB = 4_000_000          # ulimit -v
CASE_SECONDS = 60
TARGETS = ("archive", "gguf", "hf", "template", "request")
BOUNDARY_INTS = [0, -1, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
BOUNDARY = BOUNDARY_INTS + [0.0, -0.0, 1e-45, -1.0, 1.5, 1e30, float("inf"), float("-inf"), float("nan"),
                            "", "x", [], [1, 2], {}, None, True, False]


@dataclass
class Case:
    target: str
    kind: str
    must_reject: bool
    path: str
    extra: dict[str, Any] = field(default_factory=dict)


# ---- seeds: small valid inputs written by the project's own writers ----
def make_seeds(work: Path) -> dict[str, Path]:
    import make_synthetic as ms

    from vkpack.compiler.build import build

    spec = ms.Spec(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=384)
    seeds = {"gguf": ms.write_gguf(work / "seed.gguf", spec, dtype="Q8_0", seed=0),
             "hf": ms.write_hf(work / "seed-hf", spec, dtype="F16", seed=0)}
    seeds["archive"] = work / "seed.vkpack"
    build(seeds["hf"], seeds["archive"], max_pack_mb=1, progress=False, threads=1)
    seeds["archive_z"] = work / "seed-z.vkpack"
    build(seeds["gguf"], seeds["archive_z"], codec="blosc2-zstd", max_pack_mb=1, progress=False, threads=1)
    return seeds


# ---- mutations ----
def _flip_bytes(rng: random.Random, data: bytearray, lo: int, hi: int, n: int) -> None:
    for _ in range(n):
        if hi > lo:
            data[rng.randrange(lo, hi)] = rng.randrange(256)


def _footer(data: bytes) -> tuple[int, int]:
    from vkpack.pack_format.constants import FOOTER_SIZE, FOOTER_STRUCT

    off, size, _crc, _res, _magic = FOOTER_STRUCT.unpack_from(data, len(data) - FOOTER_SIZE)
    return off, size


def _with_index(data: bytes, index: Any) -> bytes:
    from vkpack.pack_format.constants import FOOTER_MAGIC, FOOTER_STRUCT
    from vkpack.pack_format.writer import pack_index

    off, _ = _footer(data)
    blob = pack_index(index)
    return data[:off] + blob + FOOTER_STRUCT.pack(off, len(blob), zlib.crc32(blob), 0, FOOTER_MAGIC)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:40]):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_tree(rng: random.Random, tree: Any, roots: list[Any] | None = None, n: int = 3) -> list[str]:
    """Replace, delete, wrap or blow up 1-n values anywhere in a JSON/msgpack tree; returns what it did."""
    did = []
    for _ in range(rng.randint(1, n)):
        paths = [p for p in _paths(tree) if p and (roots is None or p[0] in roots)]
        if not paths:
            break
        path = rng.choice(paths)
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        how = rng.choice(["boundary", "boundary", "delete", "wrap", "deep", "big"])
        key = path[-1]
        if how == "delete" and isinstance(parent, dict):
            del parent[key]
        elif how == "wrap":
            parent[key] = [parent[key]]
        elif how == "deep":
            v: Any = 0
            for _ in range(rng.choice([50, 2000, 50_000])):
                v = [v]
            parent[key] = v
        elif how == "big":
            parent[key] = rng.choice([[0] * 200_000, "A" * 5_000_000, list(range(100_000)), 10**29])
        else:
            parent[key] = rng.choice(BOUNDARY)
        did.append(f"{how}:{'.'.join(map(str, path))[:60]}")
    return did


def mutate_archive(rng: random.Random, seeds: dict[str, Path], out: Path) -> Case:
    import msgpack

    seed = seeds[rng.choice(["archive", "archive_z"])]
    data = bytearray(seed.read_bytes())
    off, size = _footer(bytes(data))
    index = msgpack.unpackb(bytes(data[off:off + size]), raw=False)
    kind = rng.choice(["index", "index", "index", "pack_flip", "truncate", "index_flip_nocrc", "bytes", "fifo",
                       "objects"])
    must = kind in ("pack_flip", "truncate", "index_flip_nocrc", "fifo", "objects")
    if kind == "index":
        did = _mutate_tree(rng, index, ["packs", "tensors", "graph", "hparams", "tokenizer", "format"])
        data = bytearray(_with_index(bytes(data), index))
        kind = f"index {did}"
    elif kind == "objects":  # many empty arrays: small bytes, huge object count
        data = bytearray(_with_index(bytes(data), [[]] * rng.choice([5_000_000, 20_000_000])))
    elif kind == "pack_flip":
        p = rng.choice(index["packs"])
        i = p["offset"] + rng.randrange(p["stored_size"])
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "index_flip_nocrc":
        data[off + rng.randrange(size)] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        _flip_bytes(rng, data, 0, len(data), rng.randint(1, 8))
    if kind == "fifo":
        os.mkfifo(out)
    else:
        out.write_bytes(bytes(data))
    small = rng.random() < 0.3
    return Case("archive", kind, must, str(out), {"budget": small, "verify_only": kind == "pack_flip"})


def gguf_bytes(meta: dict[str, Any], infos: list[tuple[str, int, list[int], int]], data: bytes,
                    align: int) -> bytes:
    """A GGUF v3 file: key/values from plain Python values, tensor infos (name, ggml type, ne, rel offset), data."""
    def s(x: str) -> bytes:
        b = x.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(b)) + b

    def value(v: Any) -> tuple[int, bytes]:
        if isinstance(v, bool):
            return 7, struct.pack("<?", v)
        if isinstance(v, int):
            if -2**31 <= v < 2**31:
                return 5, struct.pack("<i", v)
            if 0 <= v < 2**64:
                return 10, struct.pack("<Q", v)
            return 11, struct.pack("<q", max(-2**63, min(v, 2**63 - 1)))
        if isinstance(v, float):
            return 6, struct.pack("<f", v if not math.isfinite(v) or abs(v) < 3e38 else 0.0)
        if isinstance(v, str):
            return 8, s(v)
        if isinstance(v, list):
            items = [value(x) for x in v] or [(5, b"")]
            etype = items[0][0]
            if any(t != etype for t, _ in items) or etype == 9:
                items, etype = [(8, s(str(x))) for x in v], 8
            return 9, struct.pack("<IQ", etype, len(v)) + b"".join(b for _, b in items[:len(v)])
        return 8, s(repr(v))

    out = [b"GGUF", struct.pack("<IQQ", 3, len(infos), len(meta))]
    for k, v in meta.items():
        t, b = value(v)
        out += [s(k), struct.pack("<I", t), b]
    for name, tid, ne, rel in infos:
        out += [s(name), struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *[x % 2**64 for x in ne]),
                struct.pack("<IQ", tid, rel % 2**64)]
    head = b"".join(out)
    return head + bytes(-len(head) % align) + data


def mutate_gguf(rng: random.Random, seeds: dict[str, Path], out: Path) -> Case:
    from vkpack.compiler.sources.gguf_header import read_gguf_header
    from vkpack.pack_format.constants import GGML_TYPE_IDS

    h = read_gguf_header(seeds["gguf"])
    raw = seeds["gguf"].read_bytes()
    meta = dict(h.meta)
    infos = [(t.name, GGML_TYPE_IDS[t.dtype], list(reversed(t.shape)), t.offset - h.data_start) for t in h.tensors]
    data = raw[h.data_start:]
    arch = meta["general.architecture"]
    kind = rng.choice(["meta", "meta", "meta", "delete_key", "offset", "shape", "drop_tensor", "bytes", "truncate",
                       "huge_array", "huge_string"])
    must = False
    exact = {f"{arch}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length")}
    if kind == "meta":
        key = rng.choice([k for k in meta if k.startswith(arch)] * 3 + list(meta))
        v = rng.choice(BOUNDARY + [meta[key] + 1 if isinstance(meta[key], int) and not isinstance(meta[key], bool)
                                   else 0])
        must = (key in exact and v != meta[key]) or (key.endswith(("freq_base", "epsilon")) and not (
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")))
        meta[key] = v
        kind = f"meta {key}={str(v)[:20]}"
    elif kind == "delete_key":
        key = rng.choice(list(meta))
        del meta[key]
        must = key.endswith(("block_count", "embedding_length", "head_count", "feed_forward_length",
                             "tokenizer.ggml.tokens", "tokenizer.ggml.model", "general.architecture"))
        kind = f"delete {key}"
    elif kind == "offset":
        i = rng.randrange(len(infos))
        other = rng.choice(infos)[3]
        new = rng.choice([infos[i][3] + 1, other, other + 32, 2**40, 2**64 - 1])
        must = new != infos[i][3]
        infos[i] = (*infos[i][:3], new)
        kind = f"offset {infos[i][0]}"
    elif kind == "shape":
        i = rng.randrange(len(infos))
        ne = list(infos[i][2])
        ne[rng.randrange(len(ne))] = rng.choice([0, 1, 2**32, 2**63, ne[0] * 2])
        must = ne != infos[i][2]
        infos[i] = (infos[i][0], infos[i][1], ne, infos[i][3])
    elif kind == "drop_tensor":
        i = rng.randrange(len(infos))
        must = infos[i][0].startswith(("blk.", "token_embd"))
        del infos[i]
    elif kind == "huge_array":
        meta["tokenizer.ggml.tokens"] = [""] * rng.choice([3_000_000, 10_000_000])
        must = True
    elif kind == "huge_string":
        meta["tokenizer.chat_template"] = "A" * rng.choice([20_000_000, 60_000_000])
        must = True
    blob = bytearray(gguf_bytes(meta, infos, data, h.alignment))
    if kind == "bytes":
        blob = bytearray(raw)
        _flip_bytes(rng, blob, 0, min(len(blob), h.data_start + 64), rng.randint(1, 6))
    elif kind == "truncate":
        blob = bytearray(raw[:rng.randrange(len(raw) - 1)])
        must = True
    out.write_bytes(bytes(blob))
    return Case("gguf", kind, must, str(out), {"budget": rng.random() < 0.3})


def mutate_hf(rng: random.Random, seeds: dict[str, Path], out: Path) -> Case:
    shutil.copytree(seeds["hf"], out)
    cfg = json.loads((out / "config.json").read_text())
    kind = rng.choice(["config", "config", "config_text", "st_header", "st_truncate", "tokenizer_config", "fifo",
                       "shards"])
    must = False
    exact = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
    if kind == "config":
        key = rng.choice(list(cfg))
        v = rng.choice(BOUNDARY + [10**29])
        must = (key in exact and v != cfg[key]) or (key in ("rope_theta", "rms_norm_eps") and not (
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"))) or (
            key == "architectures" and not (isinstance(v, list) and v and all(isinstance(a, str) for a in v)))
        cfg[key] = v
        (out / "config.json").write_text(json.dumps(cfg))
        kind = f"config {key}={str(v)[:20]}"
    elif kind == "config_text":  # what json.dumps cannot write: inf literals, 5000-digit ints, deep nesting
        key = rng.choice(["num_hidden_layers", "hidden_size", "num_attention_heads", "rope_theta", "rms_norm_eps"])
        text = rng.choice(["1e400", "-1e400", "NaN", "Infinity", "1" * 5001, "[" * 100_000 + "]" * 100_000])
        (out / "config.json").write_text(json.dumps(cfg).replace(f'"{key}": ', f'"{key}": {text}, "x_{key}": ', 1))
        must = True
        kind = f"config_text {key}={text[:12]}"
    elif kind in ("st_header", "st_truncate"):
        st = out / "model.safetensors"
        raw = st.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        if kind == "st_truncate":
            st.write_bytes(raw[:rng.randrange(len(raw) - 1)])
            must = True
        else:
            header = json.loads(raw[8:8 + n])
            did = _mutate_tree(rng, header, [k for k in header if k != "__metadata__"], n=2)
            hb = json.dumps(header).encode()
            st.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
            kind = f"st_header {did}"
    elif kind == "tokenizer_config":
        name = rng.choice(["tokenizer_config.json", "generation_config.json"])
        p = out / name
        tc = json.loads(p.read_text()) if p.exists() else {}
        tc[rng.choice(["bos_token_id", "eos_token_id", "pad_token_id", "bos_token", "chat_template",
                       "add_bos_token"])] = rng.choice(BOUNDARY + [2**40, [2**40, 1]])
        p.write_text(json.dumps(tc))
        kind = f"{name} {list(tc)[-1]}"
    elif kind == "fifo":
        victim = out / rng.choice(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
        victim.unlink()
        os.mkfifo(victim)
        must = True
        kind = f"fifo {victim.name}"
    elif kind == "shards":
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": rng.choice([["model.safetensors"], {"a": 5}, {"a": "../x"}, "x", {"a": "nope.safetensors"}])}))
        must = True
    return Case("hf", kind, must, str(out), {"budget": rng.random() < 0.3})


TEMPLATE_PARTS = [
    ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}", False),
    ("{% for i in range(10**9) %}x{% endfor %}", True),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", True),
    ("{{ 'A' * 10**10 }}", True),
    ("{% set ns = namespace(s='AB') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", True),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", True),
    ("{{ 'a'|center(10**10) }}", True),
    ("{{ ('%09999999d' % 1)|length }}", False),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", True),
    ("{{ cycler.__init__.__globals__.os.popen('id').read() }}", True),
    ("{{ raise_exception('refused') }}", True),
    ("{{ messages[0].content * 1000000 }}", False),
    ("{% for i in range(99999) %}{{ messages }}{% endfor %}", False),
    ("{{ 9 ** (9 ** 9) }}", True),           # (9 ** 9 ** 9 is (9 ** 9) ** 9 in Jinja: 77 digits, harmless)
    ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", False),
    ("{{ x.y.z }}", False),
    ("{% if %}", True),
    ("{{ lipsum(10**6) }}", False),
]


def mutate_template(rng: random.Random, seeds: dict[str, Path], out: Path) -> Case:
    import msgpack

    parts = rng.sample(TEMPLATE_PARTS, rng.randint(1, 3))
    src = "".join(p for p, _ in parts)
    if rng.random() < 0.3:  # a random cut of it: unclosed tags, half expressions
        src = src[:rng.randrange(len(src) + 1)]
        must = False
    else:
        must = any(m for _, m in parts)
    data = seeds["archive"].read_bytes()
    off, size = _footer(data)
    index = msgpack.unpackb(data[off:off + size], raw=False)
    index["tokenizer"]["chat_template"] = src
    out.write_bytes(_with_index(data, index))
    return Case("template", src[:80], must, str(out))


# a value that sets each field the server may refuse (runtime/server/parse.py's UNSUPPORTED_FIELDS)
_SET_VALUES: dict[str, Any] = {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
                               "functions": [{"name": "f"}], "function_call": "auto",
                               "response_format": {"type": "json_object"}, "logit_bias": {"5": 10},
                               "presence_penalty": 0.5, "frequency_penalty": 1.5}


def mutate_requests(rng: random.Random, seeds: dict[str, Path], out: Path) -> Case:
    from vkpack.runtime.server.parse import UNSUPPORTED_FIELDS

    reqs = []
    for _ in range(20):
        chat = rng.random() < 0.5
        body: dict[str, Any] = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
        body |= {"model": "fuzz", "max_tokens": 2}
        kind = rng.choice(["field", "field", "unsupported", "bigint", "deep", "raw", "ids", "delete"])
        must = False
        if kind == "field":
            key = rng.choice(["max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream",
                              "repeat_penalty", "repeat_last_n", "stream_options", "messages", "prompt", "model",
                              "ignore_eos", "best_of", "echo", "logprobs", "suffix", "user"])
            body[key] = rng.choice(BOUNDARY + [[1, 2**40], {"include_usage": 5}, [{"role": 5}], "x" * 600])
        elif kind == "unsupported" and UNSUPPORTED_FIELDS:   # whatever the server's one table refuses today
            key = rng.choice(sorted(UNSUPPORTED_FIELDS))
            body[key] = _SET_VALUES.get(key, {"set": True})
            must = True
        elif kind == "delete":
            body.pop(rng.choice(list(body)))
        raw = json.dumps(body).encode()
        if kind == "bigint":
            raw = raw.replace(b'"max_tokens": 2', b'"max_tokens": ' + b"9" * rng.choice([5001, 20000]))
            must = True
        elif kind == "deep":
            raw = raw[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            must = True
        elif kind == "raw":
            raw = bytearray(raw)
            _flip_bytes(rng, raw, 0, len(raw), rng.randint(1, 4))
            raw = bytes(raw)
        elif kind == "ids":
            raw = json.dumps({"model": "fuzz", "max_tokens": 2,
                              "prompt": [rng.choice([0, 1, 383, 384, -1, 2**32, 2**40, 2**63])]}).encode()
            must = b"384" in raw or b"-1" in raw or len(raw) > 60
        reqs.append({"path": "/v1/chat/completions" if chat else "/v1/completions", "body": raw.decode("latin-1"),
                     "must_reject": must, "kind": kind})
    out.write_text(json.dumps(reqs))
    return Case("request", "batch", False, str(out), {"archive": str(seeds["archive"])})


MUTATORS = {"archive": mutate_archive, "gguf": mutate_gguf, "hf": mutate_hf, "template": mutate_template,
            "request": mutate_requests}


# ---- one case, in the child ----
def run_child(target: str, path: str, extra: dict[str, Any]) -> int:
    """Runs inside the limited process: the CLI steps a user would run on this input, in-process."""
    from vkpack.runtime.cli import main

    flags = ["--device", "numpy", "--temperature", "0", "-n", "2"]
    if extra.get("budget"):
        flags += ["--vram-gb", "0.002", "--ram-gb", "0.001"]
    codes = []
    if target in ("archive", "template"):
        if target == "archive":
            codes.append(main(["verify", path]))
            if not extra.get("verify_only"):
                codes.append(main(["inspect", path]))
        if not extra.get("verify_only"):
            codes.append(main(["run", path, "-p", "hello", *flags, *(["--chat"] if target == "template" else [])]))
    elif target in ("gguf", "hf"):
        out = str(Path(tempfile.mkdtemp(dir=Path(path).parent)) / "out.vkpack")
        code = main(["build", path, "-o", out, "--threads", "1", "--no-progress"])
        codes.append(code)
        if code == 0:
            codes.append(main(["run", out, "-p", "hello", *flags]))
    elif target == "request":
        return _child_requests(path, extra["archive"])
    print(json.dumps({"codes": codes}))
    return 0


def _child_requests(path: str, archive: str) -> int:
    import httpx

    from vkpack.runtime.engine import Engine
    from vkpack.runtime.server.app import create_app
    from vkpack.runtime.server.runner import BackgroundServer

    results = []
    with Engine(archive, device="numpy") as eng, BackgroundServer(create_app(eng, model_name="fuzz")) as srv:
        for r in json.loads(Path(path).read_text()):
            try:
                resp = httpx.post(srv.url + r["path"], content=r["body"].encode("latin-1"),
                                  headers={"Content-Type": "application/json"}, timeout=30)
                status = resp.status_code
            except httpx.TimeoutException:
                status = -1
            results.append({"status": status, "must_reject": r["must_reject"], "kind": r["kind"]})
    print(json.dumps({"requests": results}))
    return 0


# ---- the parent ----
def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_KB * 1024, MEMORY_KB * 1024))
    os.setsid()


def run_case(case: Case, timeout: float) -> tuple[str, dict[str, Any]]:
    """(outcome, details) of one case, run in a child process under the limits."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case.target, case.path, json.dumps(case.extra)]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    # preexec_fn: the fuzzer's parent is single-threaded, so the fork-then-setrlimit is safe here
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limits,  # noqa: PLW1509
                            env=env, text=True, errors="replace")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.communicate()
        return "hang", {"seconds": round(time.monotonic() - t0, 1)}
    detail = {"rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1), "stderr": err[-600:]}
    if "Traceback" in err or proc.returncode != 0:  # a traceback, or a crash (a signal, an uncaught exit)
        return "traceback", detail
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return "traceback", detail
    if "requests" in res:
        detail["requests"] = res["requests"]
        return "requests", detail
    codes = res["codes"]
    if "out of memory" in err:
        return "alloc_refused", detail
    if any(c != 0 for c in codes):
        return "rejected", detail
    return ("exit0_on_invalid" if case.must_reject else "ok"), detail


def fuzz(seed: int, minutes: float | None, cases: int | None, targets: tuple[str, ...], out: Path | None,
         work: Path | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    t_start = time.monotonic()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vkfuzz-", dir=work) as tmp:
        tmpd = Path(tmp)
        seeds = make_seeds(tmpd)
        counts: dict[str, Counter] = {t: Counter() for t in targets}
        findings: list[dict[str, Any]] = []
        deadline = time.monotonic() + minutes * 60 if minutes else None
        n = skipped = 0
        while (deadline is None or time.monotonic() < deadline) and (cases is None or n < cases * len(targets)):
            target = targets[n % len(targets)]
            n += 1
            case_dir = Path(tempfile.mkdtemp(dir=tmpd))
            try:
                case = MUTATORS[target](rng, seeds, case_dir / "input")
            except (ValueError, RecursionError, TypeError, OverflowError, UnicodeEncodeError):
                skipped += 1  # a mutation the writers themselves cannot encode (msgpack nests 512 deep at most)
                continue
            outcome, detail = run_case(case, CASE_SECONDS)
            if outcome == "requests":
                for r in detail["requests"]:
                    st = r["status"]
                    o = ("hang" if st == -1 else "traceback" if st >= 500 else
                         "exit0_on_invalid" if st < 300 and r["must_reject"] else "ok" if st < 300 else "rejected")
                    counts[target][o] += 1
                    if o in ("hang", "traceback", "exit0_on_invalid"):
                        findings.append({"target": target, "outcome": o, "kind": r["kind"], "status": st})
            else:
                counts[target][outcome] += 1
                if outcome not in ("ok", "rejected", "alloc_refused"):
                    findings.append({"target": target, "outcome": outcome, "kind": case.kind, **detail})
            shutil.rmtree(case_dir, ignore_errors=True)
            report = _report(seed, minutes, counts, findings, skipped, time.monotonic() - t_start)
            if out is not None:  # after every case, so that an interrupted run keeps its counts
                out.write_text(json.dumps(report, indent=1))
    return report


def _report(seed: int, minutes: float | None, counts: dict[str, Counter], findings: list[dict[str, Any]],
            skipped: int, seconds: float) -> dict[str, Any]:
    total: Counter = Counter()
    for c in counts.values():
        total.update(c)
    return {"seed": seed, "minutes": minutes, "seconds": round(seconds), "cases": sum(total.values()),
            "total": dict(total), "by_target": {t: dict(c) for t, c in counts.items()},
            "mutations_skipped": skipped, "findings": findings[:200]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=None, help="run for this long (all targets in turn)")
    ap.add_argument("--cases", type=int, default=None, help="or this many cases per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--out", type=Path, default=None, help="write the counts and findings as JSON")
    ap.add_argument("--child", nargs=3, metavar=("TARGET", "PATH", "EXTRA"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child[0], args.child[1], json.loads(args.child[2]))
    if args.minutes is None and args.cases is None:
        args.cases = 1
    report = fuzz(args.seed, args.minutes, args.cases, tuple(args.targets.split(",")), args.out)
    print(json.dumps({k: report[k] for k in ("cases", "total", "by_target")}, indent=1))
    for f in report["findings"][:20]:
        print("finding:", json.dumps(f)[:400], file=sys.stderr)
    bad = sum(report["total"].get(k, 0) for k in ("traceback", "hang", "exit0_on_invalid"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
