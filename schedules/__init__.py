"""Per-target schedules: kernel generators for the KV pool and schedule rules for the Relax graph."""

from __future__ import annotations

import dataclasses
from types import ModuleType

from tvm.target import Target

from ..constants import GPU_TARGETS
from ..errors import TargetError
from . import cpu_attention, gpu_attention
from .cpu_isa import vector_unit


@dataclasses.dataclass(frozen=True)
class AttentionKernels:
    """The ``kv_append``, ``paged_attention`` and ``attention_scores`` generators of one kernel module
    (``cpu_attention`` or ``gpu_attention``), with the attention kernel sized for one target. ``dtype`` is
    that of queries, new keys and values and outputs; ``kv_dtype`` that of the pool."""

    module: ModuleType
    sizing: tuple[tuple[str, int], ...] = ()  # paged_attention's target-specific keyword arguments

    def kv_append(self, num_kv_heads: int, head_dim: int, page_size: int, dtype: str, kv_dtype: str):
        return self.module.kv_append(num_kv_heads, head_dim, page_size, dtype, kv_dtype)

    def paged_attention(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        dtype: str,
        kv_dtype: str,
        sparse: bool,
    ):
        shape = (num_heads, num_kv_heads, head_dim, page_size, dtype, kv_dtype, sparse)
        return self.module.paged_attention(*shape, **dict(self.sizing))

    def attention_scores(
        self, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: str, kv_dtype: str
    ):
        return self.module.attention_scores(num_heads, num_kv_heads, head_dim, page_size, dtype, kv_dtype)


def attention_kernels(target: Target) -> AttentionKernels:
    """The KV-pool kernel generators for ``target``: on CPUs sized for its vector unit, on GPUs for its
    shared memory per block."""
    kind = target.kind.name
    if kind == "llvm":
        accumulators = vector_unit(target).score_accumulators
        return AttentionKernels(cpu_attention, (("score_accumulators", accumulators),))
    if kind in GPU_TARGETS:
        return AttentionKernels(gpu_attention, (("shared_limit", gpu_attention.shared_limit(target)),))
    raise TargetError(f"no attention kernels for target {kind!r} in this release; use --target llvm")


def relax_pipeline(target: Target, kernel_prefix: str = ""):
    """The Relax compilation pipeline (fusion plus this project's schedule rules) for ``target``; GPU kernels
    are renamed with ``kernel_prefix`` if one is given."""
    kind = target.kind.name
    if kind == "llvm":
        from . import cpu

        return cpu.pipeline(target)
    if kind in GPU_TARGETS:
        from . import gpu

        return gpu.pipeline(target, kernel_prefix)
    raise TargetError(f"no schedules for target {kind!r} in this release; use --target llvm")
