"""Kernels: a SPIR-V variant + specialization constants -> descriptor-set layout, pipeline layout,
compute pipeline (through the device's persistent VkPipelineCache). Recording is in `recorder.py`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from . import _lib
from ._lib import call, track
from .errors import VulkanError
from .memory import Buffer
from .spirv import load_spirv

SpecValue = Union[int, float, bool]  # noqa: UP007 - a runtime alias, must work on Python 3.10


@dataclass(frozen=True)
class BufferSlice:
    """Bytes [offset, offset+size) of a Buffer, as bound to one descriptor."""

    buffer: Buffer
    offset: int
    size: int


def as_slice(b: Buffer | BufferSlice) -> BufferSlice:
    return b if isinstance(b, BufferSlice) else BufferSlice(b, 0, b.size)


def _pack_spec(spec: dict[int, SpecValue]) -> tuple[list[Any], bytes]:
    vk = _lib.vk
    entries, data = [], b""
    for i, (cid, val) in enumerate(sorted(spec.items())):
        if isinstance(val, (bool, int)):
            data += struct.pack("<I", int(val))
        elif isinstance(val, float):
            data += struct.pack("<f", val)
        else:
            raise VulkanError(f"specialization constant {cid}: {val!r} is not int/float/bool")
        entries.append(vk.VkSpecializationMapEntry(constantID=cid, offset=4 * i, size=4))
    return entries, data


class Kernel:
    """One compute pipeline: SPIR-V variant `name` + specialization constants.

    Args:
        n_bindings: storage buffer descriptors, bound in order: binding 0, 1, ... (set 0), an array binding
            (`arrays`) taking as many as its length (a dispatch's buffers are flattened the same way).
        push_size: bytes of push constants (0 for none).
        writes: binding indices the shader writes (for barrier placement).
        spec: {constant_id: value}; constant 0 is the workgroup size by convention.
        arrays: {binding: length} for bindings that are arrays of buffers (moe_matvec.comp's weights).
    """

    def __init__(self, dev: Any, name: str, n_bindings: int, push_size: int, writes: Sequence[int],
                 spec: dict[int, SpecValue] | None = None, arrays: dict[int, int] | None = None):
        vk, ffi = _lib.vk, _lib.ffi
        self.device, self.name, self.n_bindings, self.push_size = dev, name, n_bindings, push_size
        self.writes = frozenset(writes)
        self.spec = dict(spec or {})
        if push_size > dev.info.max_push_constants_size:
            raise VulkanError(f"{name}: {push_size} bytes of push constants > device limit "
                              f"{dev.info.max_push_constants_size}")
        self._dsl = self._layout = self._pipeline = None
        code = load_spirv(name)
        stage_bit = vk.VK_SHADER_STAGE_COMPUTE_BIT
        try:
            counts, left = [], n_bindings   # descriptors per binding: 1, or an array's length
            while left > 0:
                counts.append((arrays or {}).get(len(counts), 1))
                left -= counts[-1]
            if left:
                raise VulkanError(f"{name}: {n_bindings} descriptors do not end at a binding ({arrays})")
            binds = [vk.VkDescriptorSetLayoutBinding(binding=i, descriptorType=vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                                     descriptorCount=n, stageFlags=stage_bit)
                     for i, n in enumerate(counts)]
            self._dsl = call(vk.vkCreateDescriptorSetLayout, dev._dev,
                             vk.VkDescriptorSetLayoutCreateInfo(pBindings=binds), None, context=name)
            track("descriptor_set_layout")
            ranges = [vk.VkPushConstantRange(stageFlags=stage_bit, offset=0, size=push_size)] if push_size else None
            self._layout = call(vk.vkCreatePipelineLayout, dev._dev, vk.VkPipelineLayoutCreateInfo(
                pSetLayouts=[self._dsl], pPushConstantRanges=ranges), None, context=name)
            track("pipeline_layout")
            module = call(vk.vkCreateShaderModule, dev._dev,
                          vk.VkShaderModuleCreateInfo(codeSize=len(code), pCode=code), None, context=name)
            try:
                entries, data = _pack_spec(self.spec)
                data_buf = ffi.new("char[]", data) if data else None
                # inner structs bound to names until the create call returns (docs/VULKAN.md §3)
                spec_info = vk.VkSpecializationInfo(pMapEntries=entries, dataSize=len(data), pData=data_buf) \
                    if entries else None
                stage = vk.VkPipelineShaderStageCreateInfo(stage=stage_bit, module=module, pName="main",
                                                           pSpecializationInfo=spec_info)
                ci = vk.VkComputePipelineCreateInfo(stage=stage, layout=self._layout)
                self._pipeline = call(vk.vkCreateComputePipelines, dev._dev, dev._pipeline_cache, 1, [ci], None,
                                      context=f"{name} spec={self.spec}")[0]
                track("pipeline")
                del ci, stage, spec_info, data_buf, entries
            finally:
                vk.vkDestroyShaderModule(dev._dev, module, None)
        except BaseException:
            self.destroy()
            raise
        self._dsl_arr = ffi.new("VkDescriptorSetLayout[1]", [self._dsl])

    def destroy(self) -> None:
        vk, dev = _lib.vk, self.device
        if self._pipeline is not None:
            vk.vkDestroyPipeline(dev._dev, self._pipeline, None)
            track("pipeline", -1)
            self._pipeline = None
        if self._layout is not None:
            vk.vkDestroyPipelineLayout(dev._dev, self._layout, None)
            track("pipeline_layout", -1)
            self._layout = None
        if self._dsl is not None:
            vk.vkDestroyDescriptorSetLayout(dev._dev, self._dsl, None)
            track("descriptor_set_layout", -1)
            self._dsl = None
        for key, k in list(dev._kernels.items()):
            if k is self:
                del dev._kernels[key]

    def __repr__(self) -> str:
        return f"Kernel({self.name}, spec={self.spec})"


def get_kernel(dev: Any, name: str, n_bindings: int, push_size: int, writes: Sequence[int],
               spec: dict[int, SpecValue] | None = None, arrays: dict[int, int] | None = None) -> Kernel:
    """A cached Kernel per (name, spec) on `dev`; destroyed by `dev.close()`."""
    key = (name, tuple(sorted((spec or {}).items())))
    k = dev._kernels.get(key)
    if k is None:
        k = dev._kernels[key] = Kernel(dev, name, n_bindings, push_size, writes, spec, arrays)
    return k


def dispatch_once(dev: Any, kernel: Kernel, buffers: Sequence[Buffer | BufferSlice],
                  groups: tuple[int, int, int], push: bytes = b"") -> None:
    """Record, run and free a single dispatch (for tests): `dispatch_once(dev, k, [a, b], (n, 1, 1))`."""
    from .recorder import Recorder

    rec = Recorder(dev, label=f"once:{kernel.name}")
    try:
        rec.dispatch(kernel, buffers, groups, push)
        rec.run()
    finally:
        rec.destroy()
