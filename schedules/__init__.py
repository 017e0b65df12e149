"""Per-target schedules: kernel generators for the KV pool and schedule rules for the Relax graph."""

from __future__ import annotations

from types import ModuleType

from tvm.target import Target

from ..constants import GPU_TARGETS
from ..errors import TargetError
from . import gpu_attention


def attention_kernels(target: Target) -> ModuleType | gpu_attention.GpuKernels:
    """The ``kv_append``, ``paged_attention`` and ``attention_scores`` kernel generators for ``target``."""
    kind = target.kind.name
    if kind == "llvm":
        from . import cpu_attention

        return cpu_attention
    if kind in GPU_TARGETS:
        return gpu_attention.for_target(target)
    raise TargetError(f"no attention kernels for target {kind!r} in this release; use --target llvm")


def relax_pipeline(target: Target):
    """The Relax compilation pipeline (fusion plus this project's schedule rules) for ``target``."""
    kind = target.kind.name
    if kind == "llvm":
        from . import cpu

        return cpu.pipeline(target)
    if kind in GPU_TARGETS:
        from . import gpu

        return gpu.pipeline(target)
    raise TargetError(f"no schedules for target {kind!r} in this release; use --target llvm")
