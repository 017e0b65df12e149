"""CPU (llvm) schedule rules and the Relax pipeline that applies them.

Rules are small dlight ``ScheduleRule``s, tried in order on every fused TIR function:

- ``Matmul``: ``C[m, n] = sum_k A[m, k] * W[k, n]`` with ``W`` stored ``[in, out]`` (``n`` contiguous),
  ``m`` the (usually symbolic) number of tokens, ``k`` and ``n`` static, plus any elementwise epilogue
  (bias, residual add). One loop nest serves decode (``m`` = 1..16, bound by streaming ``W`` from
  memory) and prefill (``m`` in the hundreds, bound by FMA throughput)::

      A_pad[m_pad, k] = A zero-padded to a multiple of ROWS rows      (so no row predicate inside)
      parallel for nc in N / n_chunk:                                 (column chunks, one per task)
        for mb in m_pad / M_BLOCK:                                    (row blocks, a tail predicate)
          C_pad[mb, nc] = 0
          for ko in K / K_BLOCK:                                      (k block: W rows ko*K_BLOCK..)
            for mo in M_BLOCK / ROWS:                                 (all row tiles reuse the block)
              for nt in n_chunk / cols:                               (register tile, left to right)
                unrolled K_BLOCK x ROWS x cols FMAs into ROWS x cols/lanes accumulators
        C[:m, nc] = epilogue(C_pad[:m, nc])

  ``W`` is read once per ``M_BLOCK`` rows (so once for decode), ``K_BLOCK`` rows at a time, each
  row as one contiguous run of ``n_chunk`` floats, so the hardware prefetcher streams it. The
  ``K_BLOCK x n_chunk`` block of ``W`` (dequantized there once, for a quantized weight) stays in L1
  while every row tile of the row block passes over it, which makes the same nest compute-bound for
  large ``m``; the ``M_BLOCK x n_chunk`` block of ``C_pad`` updated every ``K_BLOCK`` steps stays in L2.

  One token (``m = 1``: batch-1 decode and draft) takes a nest of its own, chosen at run time, which
  would otherwise compute ROWS - 1 zero rows::

      parallel for nc in N / n_chunk:
        for nt in n_chunk / cols:
          acc[cols] = 0                                               (a local array: registers)
          for ko, ki: acc += A[0, k] * dequantize(W[k, nt])           (W unpacked in registers)
          C[0, nt] = epilogue(acc)

  Every output sums its ``K`` products in the same order (k ascending, from zero) in both nests, so a
  token computes the same bits alone as in a batch: speculative verification reproduces plain decoding.
  (TVM gives every buffer access one alias class, so LLVM keeps only ``acc``, a local array, in
  registers; the row-tiled nest loads and stores its ``C_pad`` tile around each FMA.)

  Tile constants: ``lanes`` fp32 lanes per vector register, from the target (``cpu_isa``: 16 on
  AVX-512, 8 on AVX2, 4 on NEON); ``ROWS`` rows per register tile (and the padding granularity of ``m``:
  a larger value wastes work at ``m = 1``); ``cols`` = ``lanes x`` one of ``TILE_VECTORS`` output columns
  per register tile, with ``ROWS * cols / lanes`` within the target's accumulator budget (20 of AVX-512's
  32 registers, 10 of AVX2's 16), leaving room for ``W`` vectors and broadcasts of ``A``);
  ``K_BLOCK`` k-steps per accumulator load/store; ``M_BLOCK`` rows per pass over ``W``;
  ``MAX_CHUNK`` the widest column chunk of one parallel task (its ``K_BLOCK x MAX_CHUNK`` block of
  ``W`` is 16 KB, a third of L1) and ``MIN_CHUNK`` the narrowest preferred one; ``n_chunk`` is picked
  per ``N`` so that the chunks split evenly (``MIN_BALANCE``) over the target's cores. The rule
  declines (returns ``None``) when ``N`` is not a multiple of ``lanes``, ``K`` or ``N`` is symbolic,
  the output is not fp32, or the weight is not ``[k, n]`` with ``n`` innermost, leaving those to
  TVM's default rules.
- ``Elementwise``: injective functions, parallel over rows and vectorized along the last axis.
- TVM's own ``dlight.cpu`` GEMV and reduction rules for the rest (RMSNorm, softmax-like reductions).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .cpu_isa import VectorUnit, vector_unit
from .fusion import DEQUANTIZE, fuse_dequantize_matmul

ROWS = 4  # output rows per register tile; m is zero-padded to a multiple of it
TILE_VECTORS = (4, 5, 3, 2, 1)  # vectors per register-tile row (cols = vectors * lanes), by preference
K_BLOCK = 8  # k-steps between accumulator loads/stores; W rows streamed side by side
MAX_CHUNK = 512  # widest column chunk of one parallel task (K_BLOCK x MAX_CHUNK fp32 = 16 KB)
MIN_CHUNK = 256  # narrower chunks break W rows into short runs, which streams W worse (decode)
M_BLOCK = 128  # rows per pass over W; its C_pad block M_BLOCK x MAX_CHUNK fp32 (256 KB) stays in L2
MIN_BALANCE = 0.85  # accept a chunking only if the busiest core idles at most 15% of the time


def _num_cores(target: Target) -> int:
    cores = target.attrs.get("num-cores") if target is not None else None
    return int(cores) if cores else (os.cpu_count() or 1)


def _column_blocking(n: int, cores: int, unit: VectorUnit) -> tuple[int, int] | None:
    """Pick ``(cols, n_chunk)`` for ``N = n``, or ``None`` if ``n`` is not a multiple of the lanes.

    A chunk is a whole number of register tiles and at most ``MAX_CHUNK`` columns; ``c`` chunks on
    ``cores`` cores are balanced ``c / (ceil(c / cores) * cores)``. Take the first register-tile
    width in ``TILE_VECTORS`` order with a balanced chunk of at least ``MIN_CHUNK`` columns (its
    widest one), else the widest balanced chunk of any width, else the best-balanced one.
    """
    options = []  # (cols, chunk, balance), in TILE_VECTORS order, widest chunk first
    for vectors in (v for v in TILE_VECTORS if ROWS * v <= unit.tile_accumulators):
        cols = vectors * unit.lanes
        if n % cols:
            continue
        tiles = n // cols
        for per_chunk in range(min(tiles, MAX_CHUNK // cols), 0, -1):
            if tiles % per_chunk == 0:
                chunks = tiles // per_chunk
                options.append((cols, cols * per_chunk, chunks / (-(-chunks // cores) * cores)))
    balanced = [o for o in options if o[2] >= MIN_BALANCE]
    for cols, chunk, _ in balanced:
        if chunk >= MIN_CHUNK:
            return cols, chunk
    if balanced:
        return max(balanced, key=lambda o: o[1])[:2]
    return max(options, key=lambda o: o[2])[:2] if options else None


def _weight_is_k_by_n(block: tirx.Stmt, k_var: tirx.Var, n_var: tirx.Var) -> bool:
    """Whether some read is ``W[k, n]`` (n innermost) and another is ``A[m, k]`` (k innermost)."""
    lasts = [[r.min for r in region.region[-2:]] for region in block.reads if len(region.region) >= 2]
    reads_w = any(a.same_as(k_var) and b.same_as(n_var) for a, b in lasts)
    reads_a = any(b.same_as(k_var) and not a.same_as(n_var) for a, b in lasts)
    return reads_w and reads_a


class Matmul(ScheduleRule):
    """k-blocked, register-tiled matmul against an ``[in, out]`` weight (see module docstring)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or (plan := _plan(func, target)) is None:
            return None
        rows = plan.rows
        try:
            if isinstance(rows, int):  # a static number of rows
                return (_single_row if rows == 1 else _tiled)(plan)
            single = _single_row(_plan(func, target)).mod["main"]  # a schedule of its own
            tiled = _tiled(plan).mod["main"]
        except RuntimeError:  # ScheduleError and TVM's internal errors
            return None
        # one token (batch-1 decode and draft) takes its own nest; both sum over k in the same order
        body = tirx.IfThenElse(rows == 1, single.body, tiled.body)
        root = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body))
        return s_tir.Schedule(tiled.with_body(root))


class _Plan(NamedTuple):
    """A schedule of one matmul function, its blocks, and the tile sizes for it."""

    sch: s_tir.Schedule
    main: object  # the matmul's SBlockInfo
    weight: object | None  # a quantized weight's dequantize block
    epilogues: list
    rows: object  # m: an int or a symbolic expression
    cols: int
    n_chunk: int
    k_block: int
    lanes: int


def _plan(func: tirx.PrimFunc, target: Target) -> _Plan | None:
    """The plan of ``func``, or None if it is no such matmul (see the module docstring for when the rule
    declines)."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [i for i, b in enumerate(infos) if not b.is_injective()]
    if len(reductions) != 1 or reductions[0] > 1 or infos[reductions[0]].dom_kind() != "SSR":
        return None
    weight = infos[0] if reductions[0] == 1 else None  # a quantized weight's dequantize
    if weight is not None and not sch.get(weight.block_rv).name_hint.startswith(DEQUANTIZE):
        return None
    main = infos[reductions[0]]
    m_extent, n_extent, k_extent = main.dom()
    if not isinstance(n_extent, int) or not isinstance(k_extent, int):
        return None
    stmt = sch.get(main.block_rv)
    _, n_var, k_var = (iv.var for iv in stmt.iter_vars)
    if stmt.writes[0].source.dtype != "float32" or not _weight_is_k_by_n(stmt, k_var, n_var):
        return None
    unit = vector_unit(target)
    blocking = _column_blocking(n_extent, _num_cores(target), unit)
    if blocking is None:
        return None
    cols, n_chunk = blocking
    k_block = next(f for f in (K_BLOCK, 4, 2, 1) if k_extent % f == 0)
    epilogues = infos[reductions[0] + 1 :]
    return _Plan(sch, main, weight, epilogues, m_extent, cols, n_chunk, k_block, unit.lanes)


def _single_row(plan: _Plan) -> s_tir.Schedule:
    """One token: ``W`` (dequantized in registers) streams once into a ``cols``-wide accumulator tile held
    in a local array, which LLVM keeps in registers; the same k order as ``_tiled``, so the same bits."""
    sch, main, weight, epilogues, _, cols, n_chunk, k_block, lanes = plan
    block = main.block_rv
    if weight is not None:
        sch.compute_inline(weight.block_rv)
    acc = sch.cache_write(block, 0, "local")
    for epilogue in reversed(epilogues):  # into the accumulator's write-out
        sch.reverse_compute_inline(epilogue.block_rv)
    m, n, k = sch.get_loops(block)
    nc, nt, ni = sch.split(n, factors=[None, n_chunk // cols, cols])
    ko, ki = sch.split(k, factors=[None, k_block])
    sch.reorder(nc, m, nt, ko, ki, ni)
    sch.parallel(nc)
    ni_vec, ni_lane = sch.split(ni, factors=[None, lanes])
    sch.unroll(ki)
    sch.unroll(ni_vec)
    sch.vectorize(ni_lane)
    sch.reverse_compute_at(acc, nt, preserve_unit_loops=True)
    sch.decompose_reduction(block, ko)
    *_, c = sch.get_loops(acc)
    c_vec, c_lane = sch.split(c, factors=[None, lanes])
    sch.unroll(c_vec)
    sch.vectorize(c_lane)
    return sch


def _tiled(plan: _Plan) -> s_tir.Schedule:
    """Row tiles of ``ROWS`` tokens sharing each ``K_BLOCK x n_chunk`` block of ``W`` (module docstring)."""
    sch, main, weight, epilogues, m_extent, cols, n_chunk, k_block, lanes = plan
    block = main.block_rv
    # Row padding: A_pad (zero rows) feeds the kernel, C_pad -> C is the write-back.
    if isinstance(m_extent, int) and m_extent % ROWS == 0:
        a_pads = []
        write_back = sch.cache_write(block, 0, "global")
    else:
        sch.pad_einsum(block, [ROWS, 1, 1])
        a_pads = [p for p in sch.get_producers(block) if weight is None or not p.same_as(weight.block_rv)]
        (write_back,) = sch.get_consumers(block)
    # Elementwise epilogues fold into the write-back.
    for epilogue in reversed(epilogues):
        sch.reverse_compute_inline(epilogue.block_rv)

    m, n, k = sch.get_loops(block)
    mb, mo, mi = sch.split(m, factors=[None, M_BLOCK // ROWS, ROWS])
    nc, nt, ni = sch.split(n, factors=[None, n_chunk // cols, cols])
    ko, ki = sch.split(k, factors=[None, k_block])
    sch.reorder(nc, mb, ko, mo, nt, ki, mi, ni)
    sch.parallel(nc)
    ni_vec, ni_lane = sch.split(ni, factors=[None, lanes])
    sch.unroll(ki)
    sch.unroll(mi)
    sch.unroll(ni_vec)
    sch.vectorize(ni_lane)
    if weight is not None:  # dequantize the K_BLOCK x n_chunk tile of W once per row block, into L1
        sch.compute_at(weight.block_rv, ko, preserve_unit_loops=True)
        sch.set_scope(weight.block_rv, 0, "local")
    sch.decompose_reduction(block, ko)  # zero the C_pad block before ko
    sch.reverse_compute_at(write_back, nc, preserve_unit_loops=True)

    def vectorize_last(blk):
        *_, last = sch.get_loops(blk)
        _, lane = sch.split(last, factors=[None, lanes])
        sch.vectorize(lane)

    vectorize_last(write_back)
    for pad in a_pads:
        vectorize_last(pad)
    if weight is not None:  # one codes word per output feeds the tile's K_BLOCK rows: k innermost
        k_tile, *n_tile = sch.get_loops(weight.block_rv)[3:]  # under nc, mb, ko
        n_vec, n_lane = sch.split(sch.fuse(*n_tile), factors=[None, lanes])
        sch.reorder(n_vec, k_tile, n_lane)
        sch.unroll(k_tile)
        sch.vectorize(n_lane)
    return sch


class Elementwise(ScheduleRule):
    """Injective functions (activations, RoPE, splits): parallel over rows, vectorized along the last axis."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not all(info.is_injective() for info in infos):
            return None
        lanes = vector_unit(target).lanes
        remaining = []
        for info in infos:
            try:
                sch.compute_inline(info.block_rv)
            except s_tir.ScheduleError:
                remaining.append(info.block_rv)
        for block in remaining:
            loops = sch.get_loops(block)
            if not loops:
                continue
            *outer, last = loops
            extent = sch.get(last).extent
            if isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
                last_outer, lane = sch.split(last, factors=[None, lanes])
                sch.vectorize(lane)
                outer.append(last_outer)
            if outer:
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return sch


def rules() -> list[ScheduleRule]:
    return [Matmul(), Elementwise(), dl.cpu.GEMV(), dl.cpu.Reduction()]


def pipeline(target: Target) -> tvm.transform.Pass:
    """The Relax pipeline for llvm: TVM's CPU passes with our schedule rules after fusion."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + [fuse_dequantize_matmul(), dl.ApplyDefaultSchedule(*rules())]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
