"""Find, load and (when stale) rebuild the SPIR-V in `vkpack/shaders/`.

The `.spv` files are committed, so users need no compiler. A developer who edits a `.comp` gets it
rebuilt on the next load when `glslc` is on PATH (set VKPACK_SHADER_AUTOBUILD=0 to turn that off);
`tools/build_shaders.py` builds everything. This module does not import `vulkan`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vkpack.shaders import variants as _variants

from .errors import VulkanError

SHADER_DIR = Path(_variants.__file__).resolve().parent
GLSLC_FLAGS = ("--target-env=vulkan1.2", "-O")


def variants() -> dict[str, dict]:
    """name -> {"source": "x.comp", "defines": {...}, "reduce": bool}, `_nosg` twins included."""
    return _variants.all_variants()


def glslc_path() -> str | None:
    return os.environ.get("GLSLC") or shutil.which("glslc")


def spv_path(name: str) -> Path:
    return SHADER_DIR / f"{name}.spv"


def _inputs(name: str) -> list[Path]:
    v = variants()[name]
    return [SHADER_DIR / v["source"], Path(_variants.__file__), *sorted((SHADER_DIR / "common").glob("*.glsl"))]


def is_stale(name: str) -> bool:
    """True when the .spv is missing or older than its source, a common include, or the table."""
    out = spv_path(name)
    if not out.exists():
        return True
    t = out.stat().st_mtime
    return any(p.exists() and p.stat().st_mtime > t for p in _inputs(name))


def compile_variant(name: str, out: Path | None = None, glslc: str | None = None) -> Path:
    """Compile variant `name` with glslc to `out` (default: shaders/<name>.spv), atomically."""
    table = variants()
    if name not in table:
        raise VulkanError(f"unknown shader variant {name!r}; known: {', '.join(sorted(table))}")
    glslc = glslc or glslc_path()
    if glslc is None:
        raise VulkanError("glslc not found (Debian package `glslc`); needed to rebuild shaders")
    v = table[name]
    out = out or spv_path(name)
    defines = [f"-D{k}={val}" for k, val in v["defines"].items()]
    fd, tmp = tempfile.mkstemp(suffix=".spv", dir=out.parent)
    os.close(fd)
    cmd = [glslc, *GLSLC_FLAGS, f"-I{SHADER_DIR}", *defines, str(SHADER_DIR / v["source"]), "-o", tmp]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise VulkanError(f"glslc failed on {name} ({v['source']}):\n{r.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build_all(force: bool = False) -> list[str]:
    """Compile every stale (or, with force, every) variant; returns the names built."""
    built = []
    for name in variants():
        if force or is_stale(name):
            compile_variant(name)
            built.append(name)
    return built


def load_spirv(name: str) -> bytes:
    """The SPIR-V words of variant `name`, rebuilding a stale file first when glslc is available."""
    path = spv_path(name)
    if os.environ.get("VKPACK_SHADER_AUTOBUILD", "1") != "0" and is_stale(name) and glslc_path():
        try:
            path = compile_variant(name)
        except (OSError, VulkanError) as e:
            if not path.exists():
                raise VulkanError(f"shader {name}: {e}") from e
    try:
        data = path.read_bytes()
    except OSError as e:
        raise VulkanError(f"shader {name}: cannot read {path} ({e}); run tools/build_shaders.py") from e
    if len(data) < 20 or len(data) % 4 or data[:4] != b"\x03\x02\x23\x07":
        raise VulkanError(f"shader {name}: {path} is not SPIR-V")
    return data
