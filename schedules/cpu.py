"""CPU (llvm) schedule rules and the Relax pipeline that applies them.

Rules are small dlight ``ScheduleRule``s, tried in order on every fused TIR function:

- ``Matmul``: ``C[m, n] = sum_k A[m, k] * W[k, n]`` with ``W`` stored ``[in, out]`` (``n`` contiguous), plus
  any elementwise epilogue (bias, residual add). Parallel over column tiles, a register tile of
  ``ROWS x COLS`` accumulators, vectorized along ``n``.
- TVM's own ``dlight.cpu`` GEMV and reduction rules for the rest (RMSNorm, softmax-like reductions).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

LANES = 16  # fp32 lanes in one AVX-512 register
COLS = 4 * LANES  # output columns per register tile
ROWS = 4  # output rows per register tile


class Matmul(ScheduleRule):
    """Register-tiled matmul against an ``[in, out]`` weight (see module docstring)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [b for b in infos if not b.is_injective()]
        if len(reductions) != 1 or infos[0] is not reductions[0]:
            return None
        main = reductions[0]
        if main.dom_kind() not in ("SSR", "SR") and not main.dom_kind().endswith("SSR"):
            return None
        n_extent = main.iters[-2].dom
        if not isinstance(n_extent, (int, tirx.IntImm)) or int(n_extent) % LANES != 0:
            return None
        block = main.block_rv
        # Accumulate in a local tile; elementwise epilogues fold into its write-back.
        acc = sch.cache_write(block, 0, "local")
        for epilogue in reversed(infos[1:]):
            try:
                sch.reverse_compute_inline(epilogue.block_rv)
            except s_tir.ScheduleError:
                return None
        *spatial, n, k = sch.get_loops(block)
        if not spatial:
            return None
        m = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        cols = COLS if int(n_extent) % COLS == 0 else LANES
        no, ni = sch.split(n, factors=[None, cols])
        mo, mi = sch.split(m, factors=[None, ROWS])
        sch.reorder(no, mo, k, mi, ni)
        sch.reverse_compute_at(acc, mo, preserve_unit_loops=True)
        nio, nii = sch.split(ni, factors=[None, LANES])
        sch.parallel(no)
        sch.unroll(mi)
        sch.unroll(nio)
        sch.vectorize(nii)
        sch.decompose_reduction(block, k)
        *_, acc_ni = sch.get_loops(acc)
        _, acc_lanes = sch.split(acc_ni, factors=[None, LANES])
        sch.vectorize(acc_lanes)
        return sch


def rules() -> list[ScheduleRule]:
    return [Matmul(), dl.cpu.GEMV(), dl.cpu.Reduction()]


def pipeline(target: Target) -> tvm.transform.Pass:
    """The Relax pipeline for llvm: TVM's CPU passes with our schedule rules after fusion."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(*rules())]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


