"""The one module that imports the `vulkan` package; every other vk module goes through it.

Why a wrapper: the `vulkan` package raises a Python exception for every non-SUCCESS result
(even VK_TIMEOUT / VK_NOT_READY), and its exceptions carry no context. `call()` turns them into
`VulkanError` naming the function and the context, and returns the `TIMEOUT` / `NOT_READY`
sentinels for the two "not yet" results. Hot paths (recording, submitting) use the raw cffi
`lib.*` functions through `check()`, which is 3-4x cheaper than the wrappers (docs/VULKAN.md §5).

Importing this module never fails: when the loader or the package is missing, `vk`, `ffi` and
`lib` are None and `available()` says why.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from .errors import DeviceOutOfMemory, VulkanError, VulkanUnavailable

try:  # the package dlopens libvulkan.so.1 at import and raises OSError when it is missing
    import vulkan as vk
    from vulkan._vulkan import ffi, lib

    _IMPORT_ERROR = ""
except Exception as e:  # any failure means "no Vulkan here"
    vk = None  # type: ignore[assignment]
    ffi = None  # type: ignore[assignment]
    lib = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"cannot import the `vulkan` package: {type(e).__name__}: {e}"


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


TIMEOUT = _Sentinel("TIMEOUT")
NOT_READY = _Sentinel("NOT_READY")

UINT64_MAX = 0xFFFFFFFFFFFFFFFF  # VK_WHOLE_SIZE is -1 in the package (docs/VULKAN.md §4)
API_1_2 = (1 << 22) | (2 << 12)  # VK_MAKE_VERSION(1, 2, 0); no VK_API_VERSION_1_2 (docs/VULKAN.md §4)
API_1_3 = (1 << 22) | (3 << 12)

# Result codes the package maps wrongly (positive keys) or not at all, for raw-call checking.
_RESULT_NAMES = {
    -1: "VK_ERROR_OUT_OF_HOST_MEMORY", -2: "VK_ERROR_OUT_OF_DEVICE_MEMORY",
    -3: "VK_ERROR_INITIALIZATION_FAILED", -4: "VK_ERROR_DEVICE_LOST",
    -5: "VK_ERROR_MEMORY_MAP_FAILED", -7: "VK_ERROR_EXTENSION_NOT_PRESENT",
    -8: "VK_ERROR_FEATURE_NOT_PRESENT", -9: "VK_ERROR_INCOMPATIBLE_DRIVER",
    -10: "VK_ERROR_TOO_MANY_OBJECTS", -12: "VK_ERROR_FRAGMENTED_POOL", -13: "VK_ERROR_UNKNOWN",
    -1000069000: "VK_ERROR_OUT_OF_POOL_MEMORY", 1: "VK_NOT_READY", 2: "VK_TIMEOUT",
}
_OOM_NAMES = {"VkErrorOutOfDeviceMemory", "VkErrorOutOfHostMemory",
              "VK_ERROR_OUT_OF_DEVICE_MEMORY", "VK_ERROR_OUT_OF_HOST_MEMORY"}


def _raise(fname: str, code: str, context: str) -> None:
    where = f" ({context})" if context else ""
    cls = DeviceOutOfMemory if code in _OOM_NAMES else VulkanError
    raise cls(f"{fname} failed: {code}{where}", code=code)


def call(fn: Callable[..., Any], *args: Any, context: str = "") -> Any:
    """Call a `vulkan` package function; errors become `VulkanError` with `context`.

    Returns the function's result, or `TIMEOUT` / `NOT_READY` for those two results.
    Example: `call(vk.vkWaitForFences, dev, 1, [fence], True, 10**9)`.
    """
    try:
        return fn(*args)
    except vk.VkTimeout:
        return TIMEOUT
    except vk.VkNotReady:
        return NOT_READY
    except (vk.VkError, vk.VkException) as e:
        _raise(getattr(fn, "__name__", str(fn)), type(e).__name__, context)
    except (TypeError, OverflowError, AttributeError) as e:
        # argument conversion in the package (e.g. VK_WHOLE_SIZE = -1 in a uint64 field)
        raise VulkanError(f"{getattr(fn, '__name__', fn)}: bad argument ({e}){' (' + context + ')' if context else ''}") from e


def check(result: int, fname: str, context: str = "") -> Any:
    """Check the VkResult of a raw `lib.*` call; returns TIMEOUT/NOT_READY for those results."""
    if result == 0:
        return None
    if result == 2:
        return TIMEOUT
    if result == 1:
        return NOT_READY
    _raise(fname, _RESULT_NAMES.get(result, f"VkResult({result})"), context)
    return None


# ---- handle accounting for leak tests ----

_live: Counter[str] = Counter()
_live_lock = threading.Lock()


def track(kind: str, delta: int = 1) -> None:
    """Count a created (+1) or destroyed (-1) handle of `kind` ("buffer", "memory", "pipeline"...)."""
    with _live_lock:
        _live[kind] += delta


def handle_counts() -> dict[str, int]:
    """Live Vulkan handles created by vkpack, by kind (for leak tests)."""
    with _live_lock:
        return {k: v for k, v in _live.items() if v}


# ---- availability ----

_AVAILABLE: tuple[bool, str] | None = None


def create_instance(app_name: str = "vkpack") -> Any:
    """Create a VkInstance asking for Vulkan 1.3 (drivers clamp to what they support)."""
    if vk is None:
        raise VulkanUnavailable(_IMPORT_ERROR)
    app = vk.VkApplicationInfo(pApplicationName=app_name, applicationVersion=1, pEngineName="vkpack",
                               engineVersion=1, apiVersion=API_1_3)
    info = vk.VkInstanceCreateInfo(pApplicationInfo=app)
    inst = call(vk.vkCreateInstance, info, None, context="creating the Vulkan instance")
    track("instance")
    return inst


def destroy_instance(inst: Any) -> None:
    vk.vkDestroyInstance(inst, None)
    track("instance", -1)


def available() -> tuple[bool, str]:
    """Whether a usable Vulkan device exists: (True, "device name") or (False, reason).

    Usable = Vulkan >= 1.2 with a compute queue. Cached after the first call; never raises.
    """
    global _AVAILABLE
    if _AVAILABLE is not None:
        return _AVAILABLE
    if vk is None:
        _AVAILABLE = (False, _IMPORT_ERROR)
        return _AVAILABLE
    try:
        inst = create_instance("vkpack-probe")
    except VulkanError as e:
        _AVAILABLE = (False, f"no Vulkan driver: {e}")
        return _AVAILABLE
    try:
        pds = list(call(vk.vkEnumeratePhysicalDevices, inst, context="enumerating devices"))
        names = []
        for pd in pds:
            p = vk.vkGetPhysicalDeviceProperties(pd)
            fams = vk.vkGetPhysicalDeviceQueueFamilyProperties(pd)
            has_compute = any(f.queueFlags & vk.VK_QUEUE_COMPUTE_BIT for f in fams)
            if p.apiVersion >= API_1_2 and has_compute:
                names.append(str(p.deviceName))
        if names:
            _AVAILABLE = (True, ", ".join(names))
        elif pds:
            _AVAILABLE = (False, "Vulkan devices found, but none has Vulkan >= 1.2 and a compute queue")
        else:
            _AVAILABLE = (False, "the Vulkan loader found no device (is an ICD such as mesa-vulkan-drivers installed?)")
    except VulkanError as e:
        _AVAILABLE = (False, str(e))
    finally:
        destroy_instance(inst)
    return _AVAILABLE
