"""Which backend runs an archive: Vulkan where a real device works, numpy otherwise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..pack_format.errors import VkpackError
from ..pack_format.reader import Archive
from .backend import Backend

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "vulkan")


def make_backend(device: str, archive: Archive, threads: int | None = None, device_index: int | None = None,
                 kernel_options: dict[str, Any] | None = None, shader_dir: str | Path | None = None) -> Backend:
    """The Vulkan backend where a device works (`auto` falls back to numpy with one warning, and keeps
    to numpy on a CPU Vulkan driver such as lavapipe, which is slower than numpy).

    `threads` concerns the numpy backend's products; `kernel_options` (workgroup_size, subgroups,
    fp32) and `shader_dir` only concern Vulkan."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: choose auto, cpu or vulkan")
    if device in ("auto", "vulkan"):
        from . import vk

        ok, why = vk.available()
        if ok:
            try:
                from .vk import spirv
                from .vk.backend import VulkanBackend

                spirv.set_shader_dir(shader_dir)
                backend = VulkanBackend(archive, device_index, **(kernel_options or {}))
                if device == "vulkan" or backend.dev.info.type != "cpu":
                    return backend
                name = backend.dev.info.name
                backend.close()
                log.info("only a CPU Vulkan device (%s); using the numpy backend", name)
                why = ""
            except vk.VulkanError as e:
                why = str(e)
        if device == "vulkan":
            raise VkpackError(f"--device vulkan: no usable Vulkan device ({why})")
        if why:
            log.warning("Vulkan unavailable (%s); running on the CPU (numpy) backend", why)
    from .cpu.backend import CpuBackend

    return CpuBackend(archive, threads)
