"""Engine settings: defaults < INI config file < VKPACK_* environment < CLI flags.

Every setting, its INI key, env var and flag (the table `KEYS` below is the source of truth):

    setting              [section] key            env var                      flag
    vram_gb              [memory] vram_budget_gb  VKPACK_VRAM_GB               --vram-gb
    ram_gb               [memory] ram_budget_gb   VKPACK_RAM_GB                --ram-gb
    prefetch_lookahead   [memory] prefetch_lookahead  VKPACK_PREFETCH_LOOKAHEAD  --prefetch-lookahead
    device               [performance] device     VKPACK_DEVICE                --device
    device_index         [performance] device_index   VKPACK_DEVICE_INDEX      --device-index
    threads              [performance] threads    VKPACK_THREADS               --threads
    workgroup_size       [performance] workgroup_size VKPACK_WORKGROUP_SIZE    --workgroup-size
    use_subgroups        [performance] use_subgroups  VKPACK_USE_SUBGROUPS     --subgroups/--no-subgroups
    fp32                 [performance] fp32       VKPACK_FP32                  --fp32/--no-fp32
    shader_dir           [performance] shader_dir VKPACK_SHADER_DIR            --shader-dir
    log_level            [logging] level          VKPACK_LOG_LEVEL             --log-level
    log_file             [logging] file           VKPACK_LOG_FILE              --log-file
    verbose              [logging] verbose        VKPACK_VERBOSE               --verbose/-v
    model                [model] path             VKPACK_MODEL                 (positional, set by the CLI)
    context              [model] context          VKPACK_CONTEXT               --context (serve only)
    max_batch            [model] max_batch        VKPACK_MAX_BATCH             --max-batch (serve only)

`VKPACK_CONFIG` names the config file when `--config` is not given. `VKPACK_CACHE` names
the one folder of every per-machine cache (the default model, the built CPU kernels, the hybrid's
measured rates, the Vulkan pipeline cache; default `~/.cache/vkpack`); `VKPACK_CACHE_DIR`, its old
name (never documented), is ignored with a one-line warning. Other `VKPACK_*` variables are errors
(a typo must not be silently ignored) unless listed in `OTHER_ENV_ALLOWED`. An empty env variable counts as unset. Removed settings (`REMOVED`:
`[memory] eviction_aggression`, `VKPACK_EVICTION_AGGRESSION`) are ignored with a one-line
warning, so that old configs keep working.

Budgets (vram_gb, ram_gb) are in GiB (2**30 bytes): a plain number means GiB, and sizes
with a unit are converted: `512MiB`, `4GiB`, `4G` (binary) or `4GB` (decimal, 10**9
bytes, so 4GB is 3.73 GiB). `unlimited` or `none` means no budget.

Relative paths in a config file (model.path, logging.file, performance.shader_dir) are
taken relative to the file's folder, so a config works from any working directory.
"""

from __future__ import annotations

import argparse
import configparser
import difflib
import logging
import math
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

from vkpack.pack_format.errors import VkpackError

log = logging.getLogger(__name__)


class ConfigError(VkpackError):
    """A setting from a config file, the environment or a flag is unknown or has a bad value."""


@dataclass(frozen=True)
class Settings:
    """Resolved engine settings; None means "no limit" or "let the engine choose"."""

    vram_gb: float | None = None        # GiB
    ram_gb: float | None = None         # GiB
    prefetch_lookahead: int = 3         # steps of the access graph fetched ahead
    device: str = "auto"                # auto | cpu | numpy | vulkan
    device_index: int | None = None
    threads: int | None = None
    workgroup_size: int | None = None
    use_subgroups: bool = True
    fp32: bool = False
    shader_dir: str | None = None
    log_level: str = "WARNING"
    log_file: str | None = None
    verbose: bool = False
    model: str | None = None
    max_batch: int = 8
    context: int | None = None

    @property
    def vram_bytes(self) -> int | None:
        return None if self.vram_gb is None else int(self.vram_gb * 2**30)

    @property
    def ram_bytes(self) -> int | None:
        return None if self.ram_gb is None else int(self.ram_gb * 2**30)

    @property
    def effective_log_level(self) -> str:
        """`--verbose` means DEBUG whatever log_level says."""
        return "DEBUG" if self.verbose else self.log_level

    def engine_kwargs(self) -> dict[str, Any]:
        """The settings `Engine(path, ...)` takes, by its argument names (`run` and `serve` alike)."""
        return {"vram_gb": self.vram_gb, "ram_gb": self.ram_gb, "device": self.device,
                "device_index": self.device_index, "prefetch_lookahead": self.prefetch_lookahead,
                "context": self.context, "threads": self.threads, "workgroup_size": self.workgroup_size,
                "subgroups": self.use_subgroups, "fp32": self.fp32, "shader_dir": self.shader_dir}


DEFAULTS = Settings()

# ---- value parsers: take a string, return the typed value or raise _Bad(reason) ----


class _Bad(Exception):
    """Internal: a parser's reason; the resolver adds the source and raises ConfigError."""


_SIZE_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)$")
_UNITS = {
    "": 2**30, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}


def parse_size_gib(text: str) -> float | None:
    """'4' -> 4.0, '512MiB' -> 0.5, '4GB' -> 3.725..., 'unlimited' -> None (all in GiB)."""
    s = text.strip()
    if s.lower() in ("unlimited", "none"):
        return None
    if s.startswith("-"):
        raise _Bad("a budget must not be negative")
    m = _SIZE_RE.match(s)
    if not m or m.group(2).lower() not in _UNITS:
        raise _Bad("expected a size such as 4, 4.5, 512MiB, 4GiB, 4GB or 'unlimited'")
    gib = float(m.group(1)) * _UNITS[m.group(2).lower()] / 2**30
    if not math.isfinite(gib) or gib <= 0:
        raise _Bad("a budget must be > 0 (use 'unlimited' for no limit)")
    return gib


def _int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text.strip(), 10)
        except ValueError:
            raise _Bad("expected an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise _Bad(f"expected an integer >= {lo}" + (f" and <= {hi}" if hi else ""))
        return v
    return parse


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(text: str) -> bool:
    s = text.strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise _Bad("expected true/false, yes/no, on/off or 1/0")


def _choice(*options: str, upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        s = text.strip().upper() if upper else text.strip().lower()
        if s not in options:
            raise _Bad(f"expected one of {', '.join(options)}")
        return s
    return parse


def _path(text: str) -> str:
    s = text.strip()
    if not s:
        raise _Bad("expected a path")
    return os.path.expanduser(s)


# ---- the table: one row per setting ----


@dataclass(frozen=True)
class Key:
    """Where one setting can come from, and how its text is parsed."""

    field: str
    section: str
    ini_key: str
    env: str
    parse: Callable[[str], Any]
    flag: str | None
    help: str
    is_path: bool = False
    metavar: str = "N"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

KEYS: tuple[Key, ...] = (
    Key("vram_gb", "memory", "vram_budget_gb", "VKPACK_VRAM_GB", parse_size_gib, "--vram-gb",
        "VRAM budget in GiB, or a size like 512MiB, 4GiB, 4GB (default: unlimited)",
        metavar="SIZE"),
    Key("ram_gb", "memory", "ram_budget_gb", "VKPACK_RAM_GB", parse_size_gib, "--ram-gb",
        "host RAM budget for cached packs (on a discrete GPU: streamed packs in pinned memory), same units "
        "as --vram-gb (default: unlimited; pinned: the model or half the available memory); 0: no cache",
        metavar="SIZE"),
    Key("prefetch_lookahead", "memory", "prefetch_lookahead", "VKPACK_PREFETCH_LOOKAHEAD",
        _int_at_least(0), "--prefetch-lookahead",
        "graph steps to prefetch ahead (default: 3; the Vulkan backend raises a nonzero value to twice its "
        "loading threads)"),
    Key("device", "performance", "device", "VKPACK_DEVICE", _choice("auto", "cpu", "numpy", "vulkan", "hybrid"),
        "--device", "compute device: auto (a GPU through Vulkan with the CPU computing what does not fit, "
        "else the CPU), cpu (native kernels), numpy (the reference backend), vulkan (the GPU alone), hybrid "
        "(the GPU and the CPU, or an error) (default: auto)", metavar="{auto,cpu,numpy,vulkan,hybrid}"),
    Key("device_index", "performance", "device_index", "VKPACK_DEVICE_INDEX", _int_at_least(0),
        "--device-index", "which Vulkan physical device to use (default: picked automatically)"),
    Key("threads", "performance", "threads", "VKPACK_THREADS", _int_at_least(1), "--threads",
        "CPU threads (default: number of cores)"),
    Key("workgroup_size", "performance", "workgroup_size", "VKPACK_WORKGROUP_SIZE",
        _int_at_least(1, 1024), "--workgroup-size",
        "compute shader workgroup size (default: chosen per device)"),
    Key("use_subgroups", "performance", "use_subgroups", "VKPACK_USE_SUBGROUPS", _bool,
        "--subgroups", "use subgroup operations when the device has them (default: on)"),
    Key("fp32", "performance", "fp32", "VKPACK_FP32", _bool, "--fp32",
        "compute in FP32 instead of FP16 (default: off)"),
    Key("shader_dir", "performance", "shader_dir", "VKPACK_SHADER_DIR", _path, "--shader-dir",
        "load SPIR-V shaders from this folder (default: the packaged shaders)", is_path=True,
        metavar="DIR"),
    Key("log_level", "logging", "level", "VKPACK_LOG_LEVEL", _choice(*LOG_LEVELS, upper=True),
        "--log-level", "log level (default: WARNING)", metavar="{" + ",".join(LOG_LEVELS) + "}"),
    Key("log_file", "logging", "file", "VKPACK_LOG_FILE", _path, "--log-file",
        "also write the log to this file (default: stderr only)", is_path=True,
        metavar="FILE"),
    Key("verbose", "logging", "verbose", "VKPACK_VERBOSE", _bool, "--verbose",
        "log at DEBUG level (default: off)"),
    Key("model", "model", "path", "VKPACK_MODEL", _path, None, "model archive", is_path=True,
        metavar="PATH"),
    Key("context", "model", "context", "VKPACK_CONTEXT", _int_at_least(1), None,
        "context length in tokens (default: the model's)"),
    Key("max_batch", "model", "max_batch", "VKPACK_MAX_BATCH", _int_at_least(1), None,
        "most sequences decoded together (default: 8)"),
)

BY_FIELD = {k.field: k for k in KEYS}
BY_ENV = {k.env: k for k in KEYS}
SECTIONS: dict[str, dict[str, Key]] = {}
for _k in KEYS:
    SECTIONS.setdefault(_k.section, {})[_k.ini_key] = _k
del _k

# Settings that no longer exist: (section, INI key, env var, why). Old configs and environments
# that set one keep working; each gets a one-line warning instead of an unknown-key error.
REMOVED: tuple[tuple[str, str, str, str], ...] = (
    ("memory", "eviction_aggression", "VKPACK_EVICTION_AGGRESSION", "it had no effect"),
)
REMOVED_INI = {(sec, key): why for sec, key, _, why in REMOVED}
REMOVED_ENV = {env: why for _, _, env, why in REMOVED}
# Old names of variables that are not settings: ignored with a warning naming the new one.
RENAMED_ENV = {"VKPACK_CACHE_DIR": "VKPACK_CACHE"}

CONFIG_ENV = "VKPACK_CONFIG"
# VKPACK_* variables that are not engine settings but belong to vkpack (model/test cache).
# VKPACK_CACHE: runtime/native/loader.cache_root (every cache); VKPACK_NATIVE: the native kernels' switch.
OTHER_ENV_ALLOWED = frozenset({"VKPACK_CACHE", "VKPACK_NATIVE"})

assert {f.name for f in fields(Settings)} == set(BY_FIELD), "KEYS and Settings out of sync"


def _flag_name(key: Key) -> str:
    return key.flag or "--" + key.field.replace("_", "-")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _parse(key: Key, text: str, source: str) -> Any:
    try:
        return key.parse(text)
    except _Bad as e:
        raise ConfigError(f"{source}: bad value {text!r}: {e}") from None


# ---- the three layers ----


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse an INI file into {field: value}; unknown sections or keys are errors."""
    path = Path(path)
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        with open(path, encoding="utf-8") as f:
            cp.read_file(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: not a valid INI file: {str(e).splitlines()[0]}") from None
    if cp.defaults():
        raise ConfigError(f"{path}: unknown section [DEFAULT]; known: {', '.join(SECTIONS)}")
    out: dict[str, Any] = {}
    for section in cp.sections():
        known = SECTIONS.get(section)
        if known is None:
            raise ConfigError(f"{path}: unknown section [{section}]; known: "
                              f"{', '.join(SECTIONS)}{_suggest(section, SECTIONS)}")
        for name, text in cp.items(section):
            source = f"{path}:{section}.{name}"
            if (section, name) in REMOVED_INI:
                log.warning("%s: ignored: this setting was removed (%s); delete it", source,
                            REMOVED_INI[(section, name)])
                continue
            key = known.get(name)
            if key is None:
                raise ConfigError(f"{source}: unknown key; known in [{section}]: "
                                  f"{', '.join(known)}{_suggest(name, known)}")
            value = _parse(key, text, source)
            if key.is_path and not os.path.isabs(value):
                value = str(path.parent / value)
            out[key.field] = value
    return out


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Pick VKPACK_* settings out of `env`; unknown VKPACK_* names are errors."""
    out: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith("VKPACK_") or name == CONFIG_ENV or name in OTHER_ENV_ALLOWED:
            continue
        if name in RENAMED_ENV:
            if text.strip():
                log.warning("%s: ignored: renamed %s; set that instead", name, RENAMED_ENV[name])
            continue
        if name in REMOVED_ENV:
            if text.strip():
                log.warning("%s: ignored: this setting was removed (%s); unset it", name, REMOVED_ENV[name])
            continue
        key = BY_ENV.get(name)
        if key is None:
            raise ConfigError(f"{name}: unknown vkpack environment variable"
                              f"{_suggest(name, [*BY_ENV, CONFIG_ENV, *OTHER_ENV_ALLOWED])}")
        if text.strip():
            out[key.field] = _parse(key, text, name)
    return out


def read_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Validate flag values keyed by Settings field; None means "not passed"."""
    out: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None:
            continue
        key = BY_FIELD.get(name)
        if key is None:
            raise ConfigError(f"unknown setting {name!r} in flags{_suggest(name, BY_FIELD)}")
        # Flags arrive as str from argparse, or typed from Python callers: parse both.
        out[name] = _parse(key, value if isinstance(value, str) else str(value), _flag_name(key))
    return out


def resolve_settings(config_file: str | Path | None, env: Mapping[str, str],
                     flags: Mapping[str, Any]) -> Settings:
    """Merge the four layers into a Settings.

    Args:
        config_file: INI path; when None, `env["VKPACK_CONFIG"]` is used if set.
        env: environment mapping (pass `os.environ`, or a dict in tests).
        flags: {Settings field: value} for what the user passed; None = not passed.

    Example:
        >>> resolve_settings(None, {"VKPACK_VRAM_GB": "4"}, {"vram_gb": "512MiB"}).vram_gb
        0.5
    """
    values: dict[str, Any] = {}
    if config_file is None and env.get(CONFIG_ENV, "").strip():
        config_file = env[CONFIG_ENV].strip()
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update(read_env(env))
    values.update(read_flags(flags))
    return replace(DEFAULTS, **values)


# ---- argparse glue ----


def add_settings_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the engine flags (all defaulting to None, i.e. "not passed") in one help group."""
    g = parser.add_argument_group(
        "engine settings",
        "precedence: defaults < --config file < VKPACK_* environment < these flags")
    g.add_argument("--config", metavar="FILE", default=None,
                   help=f"INI settings file (default: ${CONFIG_ENV}, else none)")
    for key in KEYS:
        if key.flag is None:
            continue
        extra = f"; env {key.env}, config [{key.section}] {key.ini_key}"
        if key.field == "verbose":
            g.add_argument("-v", "--verbose", action="store_const", const=True, default=None,
                           help=key.help + extra)
        elif key.parse is _bool:
            g.add_argument(key.flag, dest=key.field, action=argparse.BooleanOptionalAction,
                           default=None, help=key.help + extra)
        else:
            g.add_argument(key.flag, dest=key.field, default=None,
                           metavar=key.metavar, help=key.help + extra)
    return g


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve Settings from parsed args: any attribute named like a Settings field is a flag."""
    flags = {f: getattr(args, f) for f in BY_FIELD if getattr(args, f, None) is not None}
    return resolve_settings(getattr(args, "config", None),
                            os.environ if env is None else env, flags)
