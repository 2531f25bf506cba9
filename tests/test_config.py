"""Settings resolution: defaults < INI file < VKPACK_* env < CLI flags, and one-line errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vkpack.pack_format.errors import VkpackError
from vkpack.runtime.cli.config import (
    KEYS, ConfigError, Settings, add_settings_flags, parse_size_gib, resolve_settings,
    settings_from_args,
)

FULL_INI = """\
[memory]
vram_budget_gb = 6
ram_budget_gb = 512MiB   ; inline comment
prefetch_lookahead = 5

[performance]
device = vulkan
device_index = 1
threads = 4
workgroup_size = 128
use_subgroups = no
fp32 = yes
shader_dir = shaders

[logging]
level = info
file = /var/log/vkpack.log
verbose = off

[model]
path = models/smol.vkpack
context = 2048
max_batch = 2
"""


def _ini(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "vkpack.ini"
    p.write_text(text)
    return p


def _error(tmp_path: Path | None = None, ini: str | None = None, env=None, flags=None) -> str:
    cfg = _ini(tmp_path, ini) if ini is not None else None
    with pytest.raises(ConfigError) as ei:
        resolve_settings(cfg, env or {}, flags or {})
    msg = str(ei.value)
    assert "\n" not in msg and isinstance(ei.value, VkpackError)
    return msg


def test_defaults():
    s = resolve_settings(None, {}, {})
    assert s == Settings()
    assert (s.vram_gb, s.ram_gb, s.prefetch_lookahead) == (None, None, 3)
    assert (s.device, s.use_subgroups, s.fp32, s.log_level, s.max_batch) == (
        "auto", True, False, "WARNING", 8)


def test_every_ini_key_is_read(tmp_path):
    s = resolve_settings(_ini(tmp_path, FULL_INI), {}, {})
    assert s == Settings(
        vram_gb=6.0, ram_gb=0.5, prefetch_lookahead=5,
        device="vulkan", device_index=1, threads=4, workgroup_size=128, use_subgroups=False,
        fp32=True, shader_dir=str(tmp_path / "shaders"), log_level="INFO",
        log_file="/var/log/vkpack.log", verbose=False,
        model=str(tmp_path / "models/smol.vkpack"), context=2048, max_batch=2)


def test_precedence_of_all_four_layers(tmp_path):
    cfg = _ini(tmp_path, "[memory]\nvram_budget_gb = 6\nram_budget_gb = 12\n"
                         "prefetch_lookahead = 5\n")
    env = {"VKPACK_RAM_GB": "24", "VKPACK_PREFETCH_LOOKAHEAD": "7", "PATH": "/bin"}
    flags = {"prefetch_lookahead": "9", "vram_gb": None}  # None = flag not passed
    s = resolve_settings(cfg, env, flags)
    assert s.device == "auto"                  # default
    assert s.vram_gb == 6.0                    # file
    assert s.ram_gb == 24.0                    # env beats file
    assert s.prefetch_lookahead == 9           # flag beats env and file


def test_vkpack_config_env_names_the_file_and_flag_overrides_it(tmp_path):
    a = _ini(tmp_path, "[model]\nmax_batch = 3\n")
    b = tmp_path / "b.ini"
    b.write_text("[model]\nmax_batch = 4\n")
    assert resolve_settings(None, {"VKPACK_CONFIG": str(a)}, {}).max_batch == 3
    assert resolve_settings(b, {"VKPACK_CONFIG": str(a)}, {}).max_batch == 4


@pytest.mark.parametrize("text, gib", [
    ("4", 4.0), ("4.5", 4.5), ("512MiB", 0.5), ("4GiB", 4.0), ("4G", 4.0), ("2 gib", 2.0),
    ("4GB", 4e9 / 2**30), ("1TiB", 1024.0), ("unlimited", None), ("None", None),
])
def test_sizes(text, gib):
    assert parse_size_gib(text) == gib
    assert resolve_settings(None, {"VKPACK_VRAM_GB": text}, {}).vram_gb == gib


def test_typed_flags_and_empty_env():
    s = resolve_settings(None, {"VKPACK_DEVICE": "", "VKPACK_CACHE": "/tmp/c"},
                         {"vram_gb": 2.5, "fp32": True, "use_subgroups": False, "threads": 2})
    assert (s.vram_gb, s.fp32, s.use_subgroups, s.threads, s.device) == (2.5, True, False, 2, "auto")
    assert s.vram_bytes == int(2.5 * 2**30) and s.ram_bytes is None


def test_argparse_round_trip(tmp_path):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    cfg = _ini(tmp_path, "[performance]\nfp32 = true\nuse_subgroups = false\n")
    args = parser.parse_args(["--config", str(cfg), "--vram-gb", "512MiB", "--no-fp32",
                              "-v", "--device", "CPU", "--log-level", "debug"])
    s = settings_from_args(args, env={"VKPACK_VRAM_GB": "8"})
    assert (s.vram_gb, s.fp32, s.use_subgroups, s.verbose, s.device, s.log_level) == (
        0.5, False, False, True, "cpu", "DEBUG")
    assert s.effective_log_level == "DEBUG"
    # Nothing passed: every flag is None, so config and env stay in charge.
    bare = parser.parse_args([])
    assert all(getattr(bare, k.field, None) is None for k in KEYS) and bare.config is None
    assert settings_from_args(bare, env={}) == Settings()


def test_help_states_defaults():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    text = " ".join(parser.format_help().split())  # undo argparse's line wrapping
    for flag in ("--vram-gb", "--ram-gb", "--prefetch-lookahead", "--device", "--device-index",
                 "--threads", "--workgroup-size", "--no-subgroups", "--fp32", "--shader-dir", "--config",
                 "--verbose", "--log-level", "--log-file"):
        assert flag in text
    assert "(default: 3;" in text and "(default: unlimited)" in text
    assert "eviction" not in text  # removed: it had no effect


# ---- errors: each names its source and the bad value ----


def test_unknown_section_and_key(tmp_path):
    msg = _error(tmp_path, "[memroy]\nvram_budget_gb = 4\n")
    assert "vkpack.ini: unknown section [memroy]" in msg and "did you mean memory?" in msg
    msg = _error(tmp_path, "[memory]\nvram_gb = 4\n")
    assert "vkpack.ini:memory.vram_gb: unknown key" in msg and "vram_budget_gb" in msg
    assert "unknown section [DEFAULT]" in _error(tmp_path, "[DEFAULT]\nx = 1\n")


def test_bad_file(tmp_path):
    assert "config file not found" in _error(env={"VKPACK_CONFIG": str(tmp_path / "nope.ini")})
    assert "not a valid INI file" in _error(tmp_path, "vram_budget_gb = 4\n")


@pytest.mark.parametrize("ini, where, value, why", [
    ("[memory]\nvram_budget_gb = lots\n", "memory.vram_budget_gb", "'lots'", "expected a size"),
    ("[memory]\nram_budget_gb = -2\n", "memory.ram_budget_gb", "'-2'", "must not be negative"),
    ("[memory]\nvram_budget_gb = 0\n", "memory.vram_budget_gb", "'0'", "must be > 0"),
    ("[memory]\nprefetch_lookahead = 2.5\n", "memory.prefetch_lookahead", "'2.5'", "integer"),
    ("[performance]\ndevice = cuda\n", "performance.device", "'cuda'", "auto, cpu, numpy, vulkan"),
    ("[performance]\nfp32 = maybe\n", "performance.fp32", "'maybe'", "true/false"),
    ("[performance]\nworkgroup_size = 4096\n", "performance.workgroup_size", "'4096'", "<= 1024"),
    ("[logging]\nlevel = loud\n", "logging.level", "'loud'", "DEBUG, INFO"),
])
def test_bad_ini_values(tmp_path, ini, where, value, why):
    msg = _error(tmp_path, ini)
    assert f"vkpack.ini:{where}: bad value {value}" in msg and why in msg


def test_bad_env():
    msg = _error(env={"VKPACK_VRAM": "4"})
    assert msg.startswith("VKPACK_VRAM: unknown vkpack environment variable")
    assert "did you mean VKPACK_VRAM_GB?" in msg
    assert _error(env={"VKPACK_DEVICE": "gpu"}).startswith("VKPACK_DEVICE: bad value 'gpu'")
    # Not ours: other prefixes are ignored.
    assert resolve_settings(None, {"VK_ICD_FILENAMES": "x", "VKPACKX": "y"}, {}) == Settings()


def test_bad_flags():
    assert _error(flags={"vram_gb": "4XB"}).startswith("--vram-gb: bad value '4XB'")
    assert _error(flags={"eviction_aggression": "0.5"}).startswith("unknown setting 'eviction_aggression' in flags")
    assert _error(flags={"device": "tpu"}).startswith("--device: bad value 'tpu'")
    assert _error(flags={"vram": "4"}).startswith("unknown setting 'vram' in flags")


def test_flag_error_via_argparse():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    with pytest.raises(ConfigError, match=r"^--threads: bad value '0': expected an integer >= 1$"):
        settings_from_args(parser.parse_args(["--threads", "0"]), env={})


# ---- removed settings: old configs keep working, with one warning line each ----


def test_removed_eviction_aggression_is_ignored_with_a_warning(tmp_path, caplog):
    cfg = _ini(tmp_path, "[memory]\nvram_budget_gb = 2\neviction_aggression = 0.25\n")
    with caplog.at_level("WARNING", logger="vkpack.runtime.cli.config"):
        s = resolve_settings(cfg, {"VKPACK_EVICTION_AGGRESSION": "0.9"}, {})
    assert s == Settings(vram_gb=2.0) and not hasattr(s, "eviction_aggression")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\n" not in m and "ignored" in m for m in lines)
    assert lines[0].startswith(f"{cfg}:memory.eviction_aggression: ignored")
    assert lines[1].startswith("VKPACK_EVICTION_AGGRESSION: ignored")
    # Any value is accepted (it is not parsed); an empty env variable is unset, so no warning.
    caplog.clear()
    with caplog.at_level("WARNING", logger="vkpack.runtime.cli.config"):
        assert resolve_settings(_ini(tmp_path, "[memory]\neviction_aggression = lots\n"),
                                {"VKPACK_EVICTION_AGGRESSION": ""}, {}) == Settings()
    assert len(caplog.records) == 1


def test_removed_flags_are_gone():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--eviction-aggression", "0.5"])
    assert "eviction_aggression" not in Settings().engine_kwargs()
