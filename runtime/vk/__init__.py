"""Vulkan compute backend. The only package that imports `vulkan` (through `_lib`).

Importing it never fails; call `available()` first and fall back to the CPU backend when it says no
(`Device()` may still raise `VulkanUnavailable`, e.g. for a device without 16-bit storage):

    from vkpack.runtime import vk as gpu
    ok, why = gpu.available()
    dev = gpu.Device(); ops = gpu.Ops(dev)
    block = dev.alloc_block(1 << 30)                  # budgeted VkDeviceMemory (kind "device")
    buf = dev.buffer(block, offset, nbytes)           # a pack's range, from the engine's SubAllocator
    dev.upload(buf, pack_bytes)                       # in place when mapped (not VRAM), else staged DMA
    dev.upload_file(buf, fd, file_offset, nbytes)     # the same, read with os.preadv from a file
    w = gpu.Weight(buf, tensor_offset, "Q4_K", rows, cols)
    rec = gpu.Recorder(dev)                           # record a step once ...
    ops.linear(rec, w, x, y, T)                       # ... (ops.embed/rms_norm/rope/kv_store/attention/...)
    rec.finish(); rec.run(); rec.run()                # ... replay it per token
    dev.peak_allocated_bytes()                        # device-local bytes really allocated, at most
"""

from __future__ import annotations

from ._lib import available, handle_counts
from .device import Device, DeviceInfo
from .errors import DeviceOutOfMemory, UnsupportedWeightType, VulkanError, VulkanUnavailable
from .kernels import BufferSlice, Kernel, dispatch_once, get_kernel
from .memory import Buffer, MemoryBlock
from .ops import WEIGHT_FORMATS, Ops, Weight, unreadable_types
from .recorder import Recorder, submit_all

__all__ = [
    "WEIGHT_FORMATS", "Buffer", "BufferSlice", "Device", "DeviceInfo", "DeviceOutOfMemory", "Kernel",
    "MemoryBlock", "Ops", "Recorder", "UnsupportedWeightType", "VulkanError", "VulkanUnavailable", "Weight",
    "available", "dispatch_once", "get_kernel", "handle_counts", "submit_all", "unreadable_types",
]
