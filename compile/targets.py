"""Target presets: ``--target llvm|cuda|metal|vulkan|pocl`` to a TVM target and the device the runtime uses.

``pocl`` is a test target: the CUDA library's kernels, scheduled for ``DEFAULT_CUDA_ARCH`` as
``--target cuda`` schedules them, generated as OpenCL C and run on the CPU by PoCL (``compile.opencl``).
"""

from __future__ import annotations

import dataclasses
import os
import re

import tvm
from tvm.target import Target

from ..constants import CPU_DEVICE, GPU_TARGETS
from ..errors import TargetError
from ..schedules.gpu_attention import CUDA_STATIC_SHARED

POCL = "pocl"
TARGETS = ("llvm", *GPU_TARGETS, POCL)
GPU_DTYPE = "float16"  # weights and KV on GPU targets unless --dtype says otherwise
DEFAULT_CUDA_ARCH = "sm_89"  # RTX 4090 (Ada), when no GPU is here to detect
MIN_CUDA_ARCH = 75  # the oldest arch nvcc 13 still builds
_ARCH_PATTERN = re.compile(r"(?:sm_)?(\d{2,3})([af]?)")
# Apple GPUs: 32 KB of threadgroup memory, 32-wide SIMD groups (MLC-LLM's preset); host code for arm64 macOS.
METAL_ATTRS = {
    "kind": "metal",
    "max_threads_per_block": 256,
    "max_shared_memory_per_block": 32768,
    "thread_warp_size": 32,
}
METAL_HOST = {"kind": "llvm", "mtriple": "arm64-apple-darwin"}
# MLC-LLM's Vulkan preset: fp16 arithmetic, 8/16-bit storage buffers, no warp-level assumptions.
VULKAN_ATTRS = {
    "kind": "vulkan",
    "max_threads_per_block": 256,
    "max_shared_memory_per_block": 32768,
    "thread_warp_size": 1,
    "supports_float16": True,
    "supports_int16": True,
    "supports_int8": True,
    "supports_8bit_buffer": True,
    "supports_16bit_buffer": True,
    "supports_storage_buffer_storage_class": True,
}
VULKAN_MISSING = (
    "--target vulkan needs a TVM built with USE_VULKAN=ON (SPIR-V codegen), which the PyPI apache-tvm "
    "wheel lacks; install such a build (e.g. MLC-LLM's TVM wheels) or use --target cuda, metal or llvm"
)


def linears_out_in(target: Target) -> bool:
    """Whether float linear weights are stored ``[out, in]`` for ``target``: on GPUs, as MLC-LLM does, so that
    dlight's low-batch GEMV reduces along each weight row (its inner-reduction path, complete for float and
    quantized weights); on CPUs ``[in, out]``, which the CPU matmul reads without a transpose."""
    return target.kind.name in GPU_TARGETS


@dataclasses.dataclass(frozen=True)
class TargetPreset:
    """A resolved target: the TVM target, the runtime device string and the default dtype."""

    kind: str
    target: Target
    device: str  # "cpu", "cuda:0", "metal:0", "vulkan:0"
    default_dtype: str
    archs: tuple[str, ...] = ()  # CUDA: every arch of the fatbin ("sm_89", ...)
    codegen: Target | None = None  # the target code is generated for, when not the schedules' (pocl)

    @property
    def schedules(self) -> str:
        """The target kind whose schedules the kernels get (``cuda`` for ``pocl``)."""
        return self.target.kind.name

    @property
    def linears_out_in(self) -> bool:
        """Whether float linear weights are stored ``[out, in]`` here (see ``linears_out_in``)."""
        return linears_out_in(self.target)

    def describe(self) -> dict:
        info = {"kind": self.kind, "target": str(self.target), "device": self.device}
        if self.codegen is not None:
            info["codegen"] = str(self.codegen)
        if self.archs:
            info["archs"] = list(self.archs)
        return info


def host_llvm(cpu: str | None = None) -> Target:
    """An llvm target for this machine's CPU (like ``-mcpu=native``), or for ``cpu`` if given."""
    from tvm.target import codegen

    triple = codegen.llvm_get_system_triple().replace("-conda-", "-unknown-")
    mcpu = cpu or codegen.llvm_get_system_cpu()
    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise TargetError(f"LLVM does not know CPU {mcpu!r}; pass --cpu with a name such as x86-64-v3")
    return Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu, "num-cores": os.cpu_count() or 1})


def resolve(
    kind: str, *, cpu: str | None = None, arch: str | list[str] | tuple[str, ...] | None = None
) -> TargetPreset:
    """The preset for ``kind``; raises TargetError (one line) for kinds this build cannot produce.

    ``arch`` (CUDA only): one compute capability or a list (``"80,89"``, ``["sm_80", "89"]``) for a
    multi-arch fatbin. Without it, the arch of this machine's GPU 0, or ``DEFAULT_CUDA_ARCH``.
    """
    if arch is not None and kind != "cuda":
        raise TargetError(f"--arch applies to --target cuda only, not to --target {kind}")
    if kind == "llvm":
        return TargetPreset("llvm", host_llvm(cpu), CPU_DEVICE, "float32")
    if cpu is not None and kind in (*GPU_TARGETS, POCL):
        raise TargetError(f"--cpu applies to --target llvm only, not to --target {kind}")
    if kind == "cuda":
        archs = parse_archs(arch) if arch is not None else (detect_cuda_arch() or DEFAULT_CUDA_ARCH,)
        # Codegen targets the oldest arch, so that every kernel is valid on each card of the fatbin.
        oldest = min(archs, key=_arch_number)
        return TargetPreset("cuda", cuda_target(oldest), "cuda:0", GPU_DTYPE, archs)
    if kind == "metal":
        return TargetPreset("metal", Target(METAL_ATTRS, host=METAL_HOST), "metal:0", GPU_DTYPE)
    if kind == "vulkan":
        if tvm.get_global_func("target.build.vulkan", allow_missing=True) is None:
            raise TargetError(VULKAN_MISSING)
        return TargetPreset("vulkan", Target(VULKAN_ATTRS, host=_gpu_host()), "vulkan:0", GPU_DTYPE)
    if kind == POCL:
        from .opencl import codegen_target

        target = cuda_target(DEFAULT_CUDA_ARCH)
        return TargetPreset(POCL, target, "opencl:0", "float32", codegen=codegen_target(target.host))
    raise TargetError(f"unknown target {kind!r}; choose one of: {', '.join(TARGETS)}")


def cuda_target(arch: str) -> Target:
    """The CUDA target for ``arch``, with the static shared memory every CUDA kernel of TVM's may use."""
    attrs = {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": CUDA_STATIC_SHARED}
    return Target(attrs, host=_gpu_host())


def _arch_number(arch: str) -> int:
    return int(re.sub(r"\D", "", arch))


def parse_archs(arch: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"80,89"`` / ``["sm_80", "89"]`` to ``("sm_80", "sm_89")``; raises TargetError on a bad entry."""
    items = arch.split(",") if isinstance(arch, str) else list(arch)
    archs = []
    for item in (str(i).strip() for i in items):
        match = _ARCH_PATTERN.fullmatch(item)
        if not match or int(match.group(1)) < MIN_CUDA_ARCH:
            raise TargetError(
                f"--arch {item!r} is not a CUDA compute capability this nvcc builds; "
                f"give numbers such as 80,86,89,90 (sm_{MIN_CUDA_ARCH} or newer)"
            )
        name = f"sm_{match.group(1)}{match.group(2)}"
        if name not in archs:
            archs.append(name)
    if not archs:
        raise TargetError("--arch is empty; give compute capabilities such as 89 or 80,86,89,90")
    return tuple(archs)


def detect_cuda_arch() -> str | None:
    """``sm_XY`` of this machine's CUDA GPU 0, or None without a GPU (or without a CUDA driver)."""
    try:
        dev = tvm.runtime.cuda(0)
        if not dev.exist:
            return None
        return "sm_" + dev.compute_version.replace(".", "")
    except Exception:  # noqa: BLE001 - no driver or no CUDA runtime: no GPU to detect
        return None


def _gpu_host() -> dict:
    """The host target of a GPU library: this machine's triple, a generic CPU (the user's may differ)."""
    from tvm.target import codegen

    return {"kind": "llvm", "mtriple": codegen.llvm_get_system_triple().replace("-conda-", "-unknown-")}
