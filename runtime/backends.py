"""Which backend runs an archive: Vulkan where a real GPU works; else the native CPU kernels; numpy as the fallback.

device: "auto" (the above: on a GPU, the hybrid backend, which is the Vulkan backend while the model
fits and computes some layers on the CPU when it does not, or the Vulkan backend alone for a mixture of
experts (the hybrid's CPU experts measured slower on the H100 host so far: docs/benchmarks.md); the CPU,
with one warning, when the archive stores weights in a type no shader reads), "vulkan" (a Vulkan device
alone, or an error), "hybrid" (Vulkan and the native CPU kernels, or an error; for a mixture of experts,
some missing experts computed on the CPU), "cpu" (the native CPU backend, or numpy with
one warning where the native kernels cannot be built or loaded), "numpy" (the numpy backend, the
numeric reference).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..pack_format.errors import VkpackError
from ..pack_format.reader import Archive
from .backend import Backend

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "numpy", "vulkan", "hybrid")


def make_backend(device: str, archive: Archive, threads: int | None = None, device_index: int | None = None,
                 kernel_options: dict[str, Any] | None = None, shader_dir: str | Path | None = None) -> Backend:
    """The backend for `device` (see the module docstring). `auto` keeps to the CPU on a CPU Vulkan
    driver such as lavapipe, which is slower than the CPU backends.

    `threads` concerns the CPU backends' products; `kernel_options` (workgroup_size, subgroups,
    fp32) and `shader_dir` only concern Vulkan."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: choose {', '.join(DEVICES)}")
    lacking = _ops_without_vulkan(archive) if device in ("auto", "vulkan", "hybrid") else []
    if lacking:  # decided from the archive alone
        if device != "auto":
            raise VkpackError(f"--device {device}: the Vulkan backend has no kernel for op {', '.join(lacking)} "
                              "(run it with --device cpu)")
        log.info("the archive's op(s) %s have no Vulkan kernel; running on the CPU", ", ".join(lacking))
        device = "cpu"
    if device in ("auto", "vulkan", "hybrid"):
        from . import vk
        from .vk.ops import unsupported_message

        missing = vk.unreadable_types(archive.tensors.values())
        if missing:  # decided from the archive alone, before any device opens
            if device != "auto":
                raise vk.UnsupportedWeightType(f"--device {device}: {unsupported_message(missing)}")
            if vk.available()[0]:  # without a Vulkan device there is nothing to miss: say nothing
                log.warning("the archive's weight type(s) %s have no Vulkan kernel; running on the CPU",
                            ", ".join(missing))
            ok, why = False, ""
        else:
            ok, why = vk.available()
        if ok:
            try:
                from .vk import spirv
                from .vk.backend import VulkanBackend

                spirv.set_shader_dir(shader_dir)
                backend = VulkanBackend(archive, device_index, **(kernel_options or {}))
                if device == "auto" and backend.dev.info.type != "cpu" and _has_moe(archive):
                    log.info("a mixture of experts: the Vulkan backend alone (--device hybrid adds CPU experts)")
                    return backend
                if device == "hybrid" or (device == "auto" and backend.dev.info.type != "cpu"):
                    return _with_cpu(backend, archive, threads, required=device == "hybrid")
                if device == "vulkan":
                    return backend
                name = backend.dev.info.name
                backend.close()
                log.info("only a CPU Vulkan device (%s); using a CPU backend", name)
                why = ""
            except vk.VulkanError as e:
                why = str(e)
                if device == "auto":  # a driver that lists a device it cannot open is worth a line
                    log.warning("the Vulkan device failed to open (%s); running on the CPU", why)
        if device in ("vulkan", "hybrid"):
            raise VkpackError(f"--device {device}: no usable Vulkan device ({why})")
        if why and not ok:
            # auto on a machine without a Vulkan driver (or the `vulkan` package): the CPU is the expected
            # choice there, not a problem worth a line on every run
            log.debug("Vulkan unavailable (%s); running on the CPU", why)
    if device != "numpy":
        from . import native

        ok, why = native.available()
        if ok:
            from .native.backend import NativeCpuBackend

            return NativeCpuBackend(archive, threads)
        # runtime/native/loader.py has warned once with the reason (or was switched off on purpose)
        log.info("native CPU kernels unavailable (%s); running on the numpy backend", why)
    from .cpu.backend import CpuBackend

    return CpuBackend(archive, threads)


def _ops_without_vulkan(archive: Archive) -> list[str]:
    """The graph's ops the Vulkan backend records no dispatch for (runtime/vk/graph_ops.py's `op_<name>`)."""
    from .vk.graph_ops import GraphOps

    return sorted({op["op"] for s in archive.graph["steps"] for op in s["ops"]
                   if not hasattr(GraphOps, "op_" + op["op"])})


def _has_moe(archive: Archive) -> bool:
    return any(op["op"] == "moe" for s in archive.graph["steps"] for op in s["ops"])


def _with_cpu(gpu: Backend, archive: Archive, threads: int | None, required: bool) -> Backend:
    """The hybrid backend over `gpu` and the native CPU kernels; `gpu` alone where those cannot load
    (an error when the hybrid was asked for by name)."""
    from . import native

    ok, why = native.available()
    if not ok:
        if required:
            gpu.close()
            raise VkpackError(f"--device hybrid: the native CPU kernels are unavailable ({why})")
        log.info("native CPU kernels unavailable (%s); the GPU computes every step", why)
        return gpu
    from .hybrid.backend import HybridBackend
    from .native.backend import NativeCpuBackend

    return HybridBackend(archive, gpu, NativeCpuBackend(archive, threads))
