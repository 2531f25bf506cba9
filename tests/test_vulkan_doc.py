"""docs/VULKAN.md: every `docs/VULKAN.md §N` the code cites names a section that exists, and no
comment cites notes that are not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"docs/VULKAN\.md §(\d+)(?:-(\d+))?")


def _sources() -> list[Path]:
    return [p for d in ("runtime", "tools", "shaders", "docs", "compiler", "pack_format")
            for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".md", ".comp", ".glsl")]


def test_every_citation_names_a_section():
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", (ROOT / "docs/VULKAN.md").read_text(), re.MULTILINE)}
    assert sections == set(range(1, len(sections) + 1)), f"sections are not numbered 1..N: {sorted(sections)}"
    cited, bad = 0, []
    for p in _sources():
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in CITED.finditer(line):
                cited += 1
                lo, hi = int(m[1]), int(m[2] or m[1])
                if not (lo <= hi and {lo, hi} <= sections):
                    bad.append(f"{p.relative_to(ROOT)}:{i}: {m[0]}")
    assert cited >= 10 and not bad, bad


def test_no_citation_of_notes_outside_the_repository():
    stale = [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if re.search(r"\bVULKAN_NOTES\b|\(NOTES \d", line)]
    assert not stale, f"cite docs/VULKAN.md §N instead: {stale}"
