"""Per-target schedules: kernel generators for the KV pool and schedule rules for the Relax graph."""

from __future__ import annotations

from tvm.target import Target

from ..constants import GPU_TARGETS
from ..errors import TargetError
from . import cpu_attention, gpu_attention
from .cpu_isa import vector_unit


def attention_kernels(target: Target) -> cpu_attention.CpuKernels | gpu_attention.GpuKernels:
    """The ``kv_append``, ``paged_attention`` and ``attention_scores`` kernel generators for ``target``."""
    kind = target.kind.name
    if kind == "llvm":
        return cpu_attention.CpuKernels(vector_unit(target))
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
