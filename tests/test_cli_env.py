"""The one cache variable (VKPACK_CACHE; the old VKPACK_CACHE_DIR ignored with a warning), `vulkan` as a default
dependency, and `--device auto` quiet on a machine without a Vulkan driver while `--device vulkan` errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import make_synthetic as ms
import pytest

from vkpack.compiler.build import build
from vkpack.runtime.cli import default_model
from vkpack.runtime.cli.config import resolve_settings
from vkpack.runtime.native import loader

ROOT = Path(__file__).resolve().parent.parent
NO_DRIVER = {"VK_ICD_FILENAMES": "/nonexistent/icd.json", "VK_DRIVER_FILES": "/nonexistent/icd.json"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("env")
    out = folder / "m.vkpack"
    build(ms.write_gguf(folder / "m.gguf", ms.Spec(), dtype="Q8_0", seed=1), out, progress=False)
    return out


def vkpack(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VKPACK_")}
    return subprocess.run([sys.executable, "-m", "vkpack", *map(str, argv)], capture_output=True, text=True,
                          timeout=120, env={**clean, **env})


# ---- the cache folder ----


def test_one_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("VKPACK_CACHE", str(tmp_path))
    assert default_model.cache_root() == loader.cache_root() == tmp_path
    monkeypatch.delenv("VKPACK_CACHE")
    assert default_model.cache_root() == loader.cache_root() == Path.home() / ".cache" / "vkpack"


def test_config_checker_accepts_the_cache_variable_and_warns_on_the_old_name(caplog):
    s = resolve_settings(None, {"VKPACK_CACHE": "/tmp/c", "VKPACK_DEVICE": "cpu"}, {})
    assert s.device == "cpu"
    with caplog.at_level(logging.WARNING):
        resolve_settings(None, {"VKPACK_CACHE_DIR": "/tmp/old"}, {})
    (rec,) = [r for r in caplog.records if "VKPACK_CACHE_DIR" in r.getMessage()]
    assert "renamed VKPACK_CACHE" in rec.getMessage()


def test_old_cache_name_does_not_stop_a_run(archive, tmp_path):
    r = vkpack("run", archive, "-p", "hi", "-n", "2", "--device", "cpu",
               env={"VKPACK_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "VKPACK_CACHE_DIR: ignored: renamed VKPACK_CACHE" in r.stderr


def test_cache_variable_is_documented():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`VKPACK_CACHE` is the one folder" in readme


# ---- Vulkan: a default dependency, quiet when absent ----


def test_vulkan_is_a_default_dependency():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "vulkan" for d in deps), deps


def test_auto_without_a_vulkan_driver_prints_no_warning(archive):
    env = NO_DRIVER
    r = vkpack("run", archive, "-p", "hi", "-n", "2", env=env)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("[vkpack] prompt"), r.stderr
    verbose = vkpack("run", archive, "-p", "hi", "-n", "2", "-v", env=env)
    assert "Vulkan unavailable" in verbose.stderr and "DEBUG vkpack.runtime.backends" in verbose.stderr


def test_explicit_vulkan_without_a_driver_is_one_clear_error(archive):
    r = vkpack("run", archive, "-p", "hi", "-n", "2", "--device", "vulkan", env=NO_DRIVER)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "--device vulkan: no usable Vulkan device" in lines[0]
