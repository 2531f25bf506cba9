"""Errors raised by the Vulkan backend; all derive from `VkpackError` so the CLI prints one line."""

from __future__ import annotations

from vkpack.pack_format.errors import VkpackError


class VulkanError(VkpackError):
    """A Vulkan call returned an error code, or the backend was used in a way it cannot serve.

    `code` is the name of the `vulkan` package exception (e.g. "VkErrorOutOfDeviceMemory") when
    the error came from the driver, else "".
    """

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


class VulkanUnavailable(VulkanError):
    """No usable Vulkan loader, driver or device; the engine falls back to the CPU backend."""


class DeviceOutOfMemory(VulkanError):
    """The driver refused an allocation (VK_ERROR_OUT_OF_DEVICE_MEMORY / OUT_OF_HOST_MEMORY)."""


class UnsupportedWeightType(VkpackError):
    """The archive stores weights in a type no shader reads (not a device problem: `--device auto`
    runs such an archive on the CPU instead)."""
