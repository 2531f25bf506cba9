"""`Device`: instance, physical device choice, logical device, queues, pools, pipeline cache.

Buffers and memory live in `memory.py` (mixed into `Device`), kernels and command recording in
`kernels.py`. Nothing outside `runtime/vk/` sees a Vk handle.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _lib
from ._lib import API_1_2, API_1_3, call, track
from .errors import VulkanError, VulkanUnavailable
from .memory import MemoryMixin

_TYPE_NAMES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
_TYPE_RANK = {"discrete": 0, "integrated": 1, "virtual": 2, "cpu": 3, "other": 4}


@dataclass(frozen=True)
class MemoryHeap:
    index: int
    size: int
    device_local: bool


@dataclass(frozen=True)
class MemoryType:
    index: int
    heap: int
    device_local: bool
    host_visible: bool
    host_coherent: bool
    host_cached: bool


@dataclass(frozen=True)
class DeviceInfo:
    """Plain-Python copy of what the engine needs to know about the device (no Vk structs kept)."""

    index: int
    name: str
    type: str                      # "discrete" | "integrated" | "virtual" | "cpu" | "other"
    api_version: tuple[int, int, int]
    driver_version: int
    vendor_id: int
    device_id: int
    max_storage_buffer_range: int  # bytes one storage-buffer binding may span
    max_memory_allocation_size: int
    min_storage_buffer_offset_alignment: int
    max_push_constants_size: int
    max_workgroup_size: tuple[int, int, int]
    max_workgroup_invocations: int
    max_workgroup_count: tuple[int, int, int]
    max_shared_memory: int
    subgroup_size: int
    subgroup_arithmetic: bool      # subgroupAdd/Max usable in compute shaders
    timestamp_period_ns: float
    heaps: tuple[MemoryHeap, ...]
    memory_types: tuple[MemoryType, ...]
    extensions: frozenset[str] = field(repr=False)
    has_memory_budget: bool = False
    unified_memory: bool = False   # a DEVICE_LOCAL|HOST_VISIBLE|COHERENT type on the main heap
    pipeline_cache_uuid: str = ""
    # VK_NV_cooperative_matrix: (M, N, K, A, B, C, D type, scope) per supported shape, as the driver lists
    # them (VkComponentTypeNV: 0 = f16, 1 = f32; scope 3 = subgroup); empty without the extension
    coopmat_shapes: tuple[tuple[int, int, int, int, int, int, int, int], ...] = ()

    @property
    def main_heap(self) -> MemoryHeap:
        """The largest device-local heap (VRAM on a discrete GPU)."""
        local = [h for h in self.heaps if h.device_local] or list(self.heaps)
        return max(local, key=lambda h: h.size)


COOPMAT_EXT = "VK_NV_cooperative_matrix"
COOPMAT_F16_16 = (16, 16, 16, 0, 0, 1, 1, 3)   # 16x16x16, f16 A/B, f32 C/D, subgroup scope


def _version(v: int) -> tuple[int, int, int]:
    return (v >> 22, (v >> 12) & 0x3FF, v & 0xFFF)


def _coopmat_shapes(vk: Any, instance: Any, pd: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes vkGetPhysicalDeviceCooperativeMatrixPropertiesNV lists, copied into ints."""
    try:
        fn = vk.vkGetInstanceProcAddr(instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesNV")
        props = fn(pd)
        return tuple((int(p.MSize), int(p.NSize), int(p.KSize), int(p.AType), int(p.BType), int(p.CType),
                      int(p.DType), int(p.scope)) for p in props)
    except Exception:  # a driver without the function simply has no shapes
        return ()


def _read_info(vk: Any, index: int, pd: Any, instance: Any = None) -> DeviceInfo:
    # Values are copied into Python ints right away: nested views die with their owner (docs/VULKAN.md §2).
    p11 = vk.VkPhysicalDeviceVulkan11Properties()
    p2 = vk.VkPhysicalDeviceProperties2(pNext=p11)
    vk.vkGetPhysicalDeviceProperties2(pd, p2)
    props, lim = p2.properties, p2.properties.limits
    mem = vk.vkGetPhysicalDeviceMemoryProperties(pd)
    heaps = tuple(MemoryHeap(i, int(mem.memoryHeaps[i].size),
                             bool(mem.memoryHeaps[i].flags & vk.VK_MEMORY_HEAP_DEVICE_LOCAL_BIT))
                  for i in range(mem.memoryHeapCount))
    types = []
    for i in range(mem.memoryTypeCount):
        f = mem.memoryTypes[i].propertyFlags
        types.append(MemoryType(i, int(mem.memoryTypes[i].heapIndex),
                                bool(f & vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT),
                                bool(f & vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT),
                                bool(f & vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT),
                                bool(f & vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT)))
    exts = frozenset(str(e.extensionName) for e in vk.vkEnumerateDeviceExtensionProperties(pd, None))
    local = [h for h in heaps if h.device_local] or list(heaps)
    main = max(local, key=lambda h: h.size)
    unified = any(t.heap == main.index and t.device_local and t.host_visible and t.host_coherent
                  for t in types)
    ops = int(p11.subgroupSupportedOperations)
    arith = bool(ops & vk.VK_SUBGROUP_FEATURE_ARITHMETIC_BIT) and bool(
        int(p11.subgroupSupportedStages) & vk.VK_SHADER_STAGE_COMPUTE_BIT)
    info = DeviceInfo(
        index=index, name=vk.ffi.string(props.deviceName).decode(errors="replace"), type=_TYPE_NAMES.get(int(props.deviceType), "other"),
        api_version=_version(int(props.apiVersion)), driver_version=int(props.driverVersion),
        vendor_id=int(props.vendorID), device_id=int(props.deviceID),
        max_storage_buffer_range=int(lim.maxStorageBufferRange),
        max_memory_allocation_size=int(p11.maxMemoryAllocationSize),
        min_storage_buffer_offset_alignment=int(lim.minStorageBufferOffsetAlignment),
        max_push_constants_size=int(lim.maxPushConstantsSize),
        max_workgroup_size=tuple(int(lim.maxComputeWorkGroupSize[i]) for i in range(3)),  # type: ignore[arg-type]
        max_workgroup_invocations=int(lim.maxComputeWorkGroupInvocations),
        max_workgroup_count=tuple(int(lim.maxComputeWorkGroupCount[i]) for i in range(3)),  # type: ignore[arg-type]
        max_shared_memory=int(lim.maxComputeSharedMemorySize),
        subgroup_size=int(p11.subgroupSize), subgroup_arithmetic=arith,
        timestamp_period_ns=float(lim.timestampPeriod),
        heaps=heaps, memory_types=tuple(types), extensions=exts,
        has_memory_budget="VK_EXT_memory_budget" in exts, unified_memory=unified,
        pipeline_cache_uuid=bytes(props.pipelineCacheUUID[i] for i in range(16)).hex(),
        coopmat_shapes=_coopmat_shapes(vk, instance, pd) if COOPMAT_EXT in exts and instance is not None else (),
    )
    del p2, p11
    return info


def _cache_dir() -> Path:
    from ..native.loader import cache_root  # the one cache folder, $VKPACK_CACHE (README)

    return cache_root()


class Device(MemoryMixin):
    """One Vulkan device with a compute queue (and a transfer queue where there is a separate one).

    Args:
        index: physical device index as enumerated; None picks discrete > integrated > virtual > cpu.
        pipeline_cache: keep compiled pipelines in `$VKPACK_CACHE` (default ~/.cache/vkpack).
    Example:
        with Device() as dev:
            buf = dev.alloc(1024); dev.upload(buf, b"\\0" * 1024); data = dev.download(buf)
    """

    def __init__(self, index: int | None = None, *, pipeline_cache: bool = True):
        ok, why = _lib.available()
        if not ok:
            raise VulkanUnavailable(why)
        vk = _lib.vk
        self._closed = False
        self._instance = _lib.create_instance()
        try:
            self._open(vk, index, pipeline_cache)
        except BaseException:
            self.close()
            raise

    # ---- setup ----

    def _open(self, vk: Any, index: int | None, pipeline_cache: bool) -> None:
        pds = list(call(vk.vkEnumeratePhysicalDevices, self._instance, context="enumerating devices"))
        infos = [_read_info(vk, i, pd, self._instance) for i, pd in enumerate(pds)]
        usable = [i for i in infos if (i.api_version[0], i.api_version[1]) >= (1, 2)]
        if index is not None:
            if not 0 <= index < len(infos):
                raise VulkanError(f"device index {index} out of range: {len(infos)} device(s) found")
            chosen = infos[index]
            if chosen not in usable:
                raise VulkanError(f"device {index} ({chosen.name}) has Vulkan {chosen.api_version}, need >= 1.2")
        else:
            if not usable:
                raise VulkanUnavailable("no device with Vulkan >= 1.2")
            chosen = min(usable, key=lambda i: (_TYPE_RANK[i.type], i.index))
        self.info = chosen
        self._pd = pds[chosen.index]
        self._pick_queues(vk)
        self._create_device(vk)
        self._pools: dict[int, Any] = {}
        for fam in {self.compute_family, self.transfer_family}:
            pool = call(vk.vkCreateCommandPool, self._dev, vk.VkCommandPoolCreateInfo(
                flags=vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT, queueFamilyIndex=fam), None,
                context="creating a command pool")
            track("command_pool")
            self._pools[fam] = pool
        self._cache_path: Path | None = None
        self._pipeline_cache = self._create_pipeline_cache(vk, pipeline_cache)
        self._kernels: dict[Any, Any] = {}      # (name, spec) -> Kernel, owned by the device
        self._objects: dict[int, Any] = {}      # live buffers/blocks/recorders, destroyed by close()
        self._init_memory()

    def _pick_queues(self, vk: Any) -> None:
        fams = vk.vkGetPhysicalDeviceQueueFamilyProperties(self._pd)
        flags = [(int(f.queueFlags), int(f.queueCount)) for f in fams]
        C, G, T = vk.VK_QUEUE_COMPUTE_BIT, vk.VK_QUEUE_GRAPHICS_BIT, vk.VK_QUEUE_TRANSFER_BIT
        compute = [i for i, (f, _) in enumerate(flags) if f & C]
        # a compute-only family first (async compute), else any compute family
        self.compute_family = next((i for i in compute if not flags[i][0] & G), compute[0])
        dedicated = [i for i, (f, _) in enumerate(flags) if f & T and not f & (C | G)]
        if dedicated:
            self.transfer_family, self.transfer_queue_kind = dedicated[0], "dedicated-family"
            self._transfer_index = 0
        elif flags[self.compute_family][1] >= 2:
            self.transfer_family, self.transfer_queue_kind = self.compute_family, "second-queue"
            self._transfer_index = 1
        else:
            self.transfer_family, self.transfer_queue_kind = self.compute_family, "shared"
            self._transfer_index = 0

    def _create_device(self, vk: Any) -> None:
        want_coop = COOPMAT_EXT in self.info.extensions and os.environ.get("VKPACK_NO_COOPMAT", "0") in ("", "0")
        fcm = vk.VkPhysicalDeviceCooperativeMatrixFeaturesNV() if want_coop else None
        f11 = vk.VkPhysicalDeviceVulkan11Features(pNext=fcm)
        f12 = vk.VkPhysicalDeviceVulkan12Features(pNext=f11)
        f2 = vk.VkPhysicalDeviceFeatures2(pNext=f12)
        vk.vkGetPhysicalDeviceFeatures2(self._pd, f2)
        if not f11.storageBuffer16BitAccess:
            raise VulkanUnavailable(f"{self.info.name}: storageBuffer16BitAccess is required for quantized weights")
        self.features = {"storageBuffer16BitAccess": True,
                         "storageBuffer8BitAccess": bool(f12.storageBuffer8BitAccess),
                         "shaderInt8": bool(f12.shaderInt8), "shaderFloat16": bool(f12.shaderFloat16),
                         "timelineSemaphore": bool(f12.timelineSemaphore),
                         "shaderInt16": bool(f2.features.shaderInt16),
                         # moe_matvec.comp indexes an array of buffers by a workgroup-uniform value
                         "shaderStorageBufferArrayDynamicIndexing":
                             bool(f2.features.shaderStorageBufferArrayDynamicIndexing)}
        # tensor-core matmuls (matmul_coop.comp): the NV extension, its feature, f16 arithmetic and the
        # Vulkan memory model (glslang emits it for cooperative-matrix shaders)
        self.features["cooperativeMatrix"] = bool(
            fcm is not None and fcm.cooperativeMatrix and f12.vulkanMemoryModel and f12.shaderFloat16)
        self.features["vulkanMemoryModel"] = self.features["cooperativeMatrix"]
        # Enable exactly what we use; keep every chained struct bound until vkCreateDevice returns (docs/VULKAN.md §3).
        ecm = vk.VkPhysicalDeviceCooperativeMatrixFeaturesNV(cooperativeMatrix=True) \
            if self.features["cooperativeMatrix"] else None
        e11 = vk.VkPhysicalDeviceVulkan11Features(pNext=ecm, storageBuffer16BitAccess=True)
        e12 = vk.VkPhysicalDeviceVulkan12Features(
            pNext=e11, timelineSemaphore=self.features["timelineSemaphore"],
            storageBuffer8BitAccess=self.features["storageBuffer8BitAccess"],
            shaderInt8=self.features["shaderInt8"], shaderFloat16=self.features["shaderFloat16"],
            vulkanMemoryModel=self.features["vulkanMemoryModel"])
        base = vk.VkPhysicalDeviceFeatures(shaderInt16=self.features["shaderInt16"],
                                           shaderStorageBufferArrayDynamicIndexing=self.features[
                                               "shaderStorageBufferArrayDynamicIndexing"])
        e2 = vk.VkPhysicalDeviceFeatures2(pNext=e12, features=base)
        prio = [1.0, 1.0]
        if self.transfer_family == self.compute_family:
            n = 2 if self.transfer_queue_kind == "second-queue" else 1
            qinfos = [vk.VkDeviceQueueCreateInfo(queueFamilyIndex=self.compute_family, pQueuePriorities=prio[:n])]
        else:
            qinfos = [vk.VkDeviceQueueCreateInfo(queueFamilyIndex=self.compute_family, pQueuePriorities=prio[:1]),
                      vk.VkDeviceQueueCreateInfo(queueFamilyIndex=self.transfer_family, pQueuePriorities=prio[:1])]
        exts = [e for e in ("VK_EXT_memory_budget",) if e in self.info.extensions]
        if self.features["cooperativeMatrix"]:
            exts.append(COOPMAT_EXT)
        info = vk.VkDeviceCreateInfo(pNext=e2, pQueueCreateInfos=qinfos, ppEnabledExtensionNames=exts or None)
        self._dev = call(vk.vkCreateDevice, self._pd, info, None, context=f"creating device {self.info.name}")
        track("device")
        del info, e2, e12, e11, ecm, base, f2, f12, f11, fcm
        self.compute_queue = vk.vkGetDeviceQueue(self._dev, self.compute_family, 0)
        self.transfer_queue = vk.vkGetDeviceQueue(self._dev, self.transfer_family, self._transfer_index)
        # A VkQueue must be externally synchronized: one lock per distinct queue.
        self._compute_lock = threading.Lock()
        self._transfer_lock = self._compute_lock if self.transfer_queue_kind == "shared" else threading.Lock()

    def _create_pipeline_cache(self, vk: Any, enabled: bool) -> Any:
        data = b""
        if enabled and os.environ.get("VKPACK_PIPELINE_CACHE", "1") != "0":
            i = self.info
            self._cache_path = _cache_dir() / (
                f"pipelines-{i.vendor_id:04x}-{i.device_id:04x}-{i.driver_version:x}-{i.pipeline_cache_uuid}.bin")
            try:
                data = self._cache_path.read_bytes()
            except OSError:
                data = b""
        ci = vk.VkPipelineCacheCreateInfo(initialDataSize=len(data), pInitialData=_lib.ffi.from_buffer(data) if data else None)
        try:
            cache = call(vk.vkCreatePipelineCache, self._dev, ci, None, context="creating the pipeline cache")
        except VulkanError:  # a corrupt file must not stop us: start empty
            ci = vk.VkPipelineCacheCreateInfo()
            cache = call(vk.vkCreatePipelineCache, self._dev, ci, None, context="creating the pipeline cache")
        track("pipeline_cache")
        return cache

    def save_pipeline_cache(self) -> None:
        """Write the pipeline cache to disk (atomic rename); errors are ignored (a cache is optional)."""
        if self._cache_path is None or self._closed:
            return
        ffi, lib = _lib.ffi, _lib.lib
        n = ffi.new("size_t*")
        if lib.vkGetPipelineCacheData(self._dev, self._pipeline_cache, n, ffi.NULL) != 0 or n[0] == 0:
            return
        buf = ffi.new("char[]", n[0])
        if lib.vkGetPipelineCacheData(self._dev, self._pipeline_cache, n, buf) != 0:
            return
        try:
            self._cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(ffi.buffer(buf, n[0])[:])
            os.replace(tmp, self._cache_path)
        except OSError:
            pass

    # ---- queries ----

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def coopmat_f16(self) -> bool:
        """True when 16x16x16 f16 x f16 -> f32 subgroup cooperative matrices are enabled and listed."""
        return bool(self.features.get("cooperativeMatrix")) and COOPMAT_F16_16 in self.info.coopmat_shapes

    def memory_budget(self) -> list[tuple[int, int, int]] | None:
        """[(heap index, budget bytes, usage bytes)] from VK_EXT_memory_budget, or None without it
        (`heap_usage` samples it after each allocation)."""
        if not self.info.has_memory_budget:
            return None
        vk = _lib.vk
        b = vk.VkPhysicalDeviceMemoryBudgetPropertiesEXT()
        m2 = vk.VkPhysicalDeviceMemoryProperties2(pNext=b)
        vk.vkGetPhysicalDeviceMemoryProperties2(self._pd, m2)
        out = [(h.index, int(b.heapBudget[h.index]), int(b.heapUsage[h.index])) for h in self.info.heaps]
        del m2, b
        return out

    def wait_idle(self) -> None:
        with self._compute_lock, self._transfer_lock if self._transfer_lock is not self._compute_lock else _NullLock():
            call(_lib.vk.vkDeviceWaitIdle, self._dev, context="waiting for the device")

    # ---- teardown ----

    def close(self) -> None:
        """Destroy everything created through this device, save the pipeline cache, release the device."""
        if self._closed:
            return
        vk = _lib.vk
        dev = getattr(self, "_dev", None)
        if dev is not None:
            try:
                vk.vkDeviceWaitIdle(dev)
            except Exception:  # noqa: S110 - a lost device must still be torn down
                pass
            for obj in list(getattr(self, "_objects", {}).values()):
                obj.destroy()
            for k in list(getattr(self, "_kernels", {}).values()):
                k.destroy()
            if getattr(self, "_recycler", None) is not None:
                self._recycler.destroy()
            self._close_memory()
            if getattr(self, "_pipeline_cache", None) is not None:
                self.save_pipeline_cache()
                vk.vkDestroyPipelineCache(dev, self._pipeline_cache, None)
                track("pipeline_cache", -1)
            for pool in getattr(self, "_pools", {}).values():
                vk.vkDestroyCommandPool(dev, pool, None)
                track("command_pool", -1)
            vk.vkDestroyDevice(dev, None)
            track("device", -1)
        _lib.destroy_instance(self._instance)
        self._closed = True

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        i = self.info
        return f"Device({i.name!r}, {i.type}, Vulkan {'.'.join(map(str, i.api_version))})"


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


__all__ = ["API_1_2", "API_1_3", "COOPMAT_F16_16", "Device", "DeviceInfo", "MemoryHeap", "MemoryType"]
