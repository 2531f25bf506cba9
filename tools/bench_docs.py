"""docs/benchmarks.md is shared by the benchmark tools: each owns one marked section of it.

`write_section` re-reads the file right before writing (another tool may have written meanwhile),
replaces only the text between this tool's markers, and renames a temporary file into place.
"""

from __future__ import annotations

import os
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = ("# vkpack benchmarks\n\nEach section names the machine it ran on and the exact command that produced it; "
          "rerun that command to refresh the section. Tools rewrite only their own section.\n")


def markers(tool: str) -> tuple[str, str]:
    return f"<!-- {tool}:start -->", f"<!-- {tool}:end -->"


def write_section(tool: str, heading: str, body: str, docs: Path = DOCS) -> None:
    """Put `body` between `tool`'s markers, appending them under `heading` if absent."""
    start, end = markers(tool)
    block = f"{start}\n{body}{end}"
    text = docs.read_text() if docs.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    tmp = docs.with_name(f".{docs.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, docs)


def cpu_and_memory() -> tuple[str, str]:
    """("<CPU model>, <n> cores", "<total RAM> GiB"), read from /proc; "?" where unreadable."""
    import contextlib

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        kb = next((int(ln.split()[1]) for ln in f if ln.startswith("MemTotal")), 0)
        mem = f"{kb / 2**20:.1f} GiB"
    return f"{cpu}, {os.cpu_count()} cores", mem
