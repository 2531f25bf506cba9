"""Vulkan compute backend. The only package that imports `vulkan` (through `_lib`).

Importing it never fails; call `available()` first and fall back to the CPU backend when it says no:

    from vkpack.runtime import vk as gpu
    ok, why = gpu.available()
    if ok:
        dev = gpu.Device(); ops = gpu.Ops(dev)
"""

from __future__ import annotations

from ._lib import available, handle_counts
from .device import Device, DeviceInfo
from .errors import DeviceOutOfMemory, VulkanError, VulkanUnavailable
from .kernels import BufferSlice, Kernel, Recorder, dispatch_once, get_kernel, submit_all
from .memory import Arena, Buffer, MemoryBlock
from .ops import WEIGHT_FORMATS, Ops, Weight

__all__ = [
    "available", "handle_counts", "Device", "DeviceInfo", "VulkanError", "VulkanUnavailable",
    "DeviceOutOfMemory", "Buffer", "BufferSlice", "MemoryBlock", "Arena", "Kernel", "Recorder",
    "dispatch_once", "get_kernel", "submit_all", "Ops", "Weight", "WEIGHT_FORMATS",
]
