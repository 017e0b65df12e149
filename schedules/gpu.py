"""GPU (CUDA, Metal, Vulkan) schedule rules, the Relax pipeline that applies them, and the binding check.

Rules are TVM dlight ``ScheduleRule``s, tried in order on every fused TIR function:

- ``TiledMatmul`` (prefill only): the matmuls that ``prefill`` calls, with hundreds to thousands of token
  rows, are cloned for it (``specialize_prefill``) and scheduled as shared-memory tiled GEMMs: dlight's
  generic ``gpu.Matmul`` schedule without its tensor-core path, which segfaults in ``Tensorize`` for sm_89
  and Metal in TVM 0.27 (and without vector loads off CUDA, which Metal's storage rewrite rejects).
- ``LowBatchGEMV``: every other matmul. Float weights are stored ``[out, in]`` on GPUs
  (``compile.targets.linears_out_in``), as MLC-LLM stores them, so dlight takes its *inner*-reduction path:
  each output's dot product is split across a block's threads, which read its weight row in coalesced runs,
  and merged across them. (Its outer-reduction path, for ``[in, out]`` weights, schedules only part of a
  float matmul and leaves the rest as host code; ``check_bindings`` catches that.) The symbolic token count
  ``n`` is padded to a bucket of ``GEMV_BUCKET`` rows that share every weight read, so one kernel serves
  decode and draft (``n`` = batch, a GEMV) and verify (``n`` = batch x (gamma+1), a small-M GEMM reading
  the weights ``n / GEMV_BUCKET`` times).
- ``Reduction``, ``GeneralReduction``: RMSNorm and row reductions, one block per row (dlight's ``RMSNorm``
  rule fails on a 2-D norm with a symbolic row count in TVM 0.27).
- ``Transpose``, then ``Fallback``: everything else (RoPE, SiLU, embedding gather, casts) is elementwise and
  gets bound to blocks and threads.

The attention kernels (``gpu_attention``) arrive already scheduled. TVM 0.27 silently compiles a block
that no rule scheduled as *host* code, so ``check_bindings`` runs right after scheduling and the build
driver fails (``raise_for_unbound``), naming every kernel with a block outside thread bindings.
"""

from __future__ import annotations

import hashlib
import re

import tvm
from tvm import relax, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from ..errors import UserError
from .fusion import fuse_dequantize_matmul

LAUNCH_MARKERS = ("T.launch_thread(", "T.env_thread(")
BLOCK = re.compile(r'with T\.sblock\("([^"]*)"')
UNBOUND_ATTR = "mlc_magicdec.unbound_kernels"
GEMV_BUCKET = 4  # rows of the token axis that share each weight read
PREFILL = "prefill"  # the entry point whose matmuls get TiledMatmul
GENERIC_GEMM_TARGET = Target({"kind": "cuda", "arch": "sm_60"})  # selects dlight's untensorized GEMM
# PoCL names each kernel's cache folder after the kernel, and a file name holds at most 255 bytes
MAX_KERNEL_NAME = 96
NAME_HASH = 8  # hex digits of the hash that tells shortened names apart
CUDA_VECTOR = 2  # elements per vector load of the GEMM's shared-memory copies on CUDA (off CUDA: 1)


class UnboundKernelError(UserError, RuntimeError):
    """A device kernel that no schedule rule bound to GPU threads (it would silently run as host code)."""


class TiledMatmul(dl.gpu.Matmul):
    """dlight's shared-memory tiled GEMM for a symbolic row count, never tensorized (see module docstring)."""

    def __init__(self, vector_size: int):
        self.vector_size = vector_size

    def get_configs(self, target: Target) -> dl.gpu.Matmul.Config:
        config = super().get_configs(target)
        config.vector_size = self.vector_size
        return config

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        try:  # a CUDA target before tensor cores selects the generic schedule, with CUDA's tile sizes
            return super().apply(func, GENERIC_GEMM_TARGET, tunable)
        except (RuntimeError, ValueError):  # TVM's errors are RuntimeErrors
            return None


def tiled_matmul(target: Target) -> TiledMatmul:
    return TiledMatmul(CUDA_VECTOR if target.kind.name == "cuda" else 1)


@relax.expr_functor.mutator
class _Redirect(relax.PyExprMutator):
    """Point ``call_tir``s at replacement kernels (``mapping``: old kernel name -> new GlobalVar)."""

    def __init__(self, mod: tvm.ir.IRModule):
        super().__init__(mod)
        self.mapping: dict[str, tvm.ir.GlobalVar] = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        callee = call.args[0] if call.args else None
        if isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint in self.mapping:
            args = [self.mapping[callee.name_hint], *call.args[1:]]
            return relax.Call(call.op, args, call.attrs, call.ty_args)
        return call


def called_kernels(mod: tvm.ir.IRModule, entry: str) -> list[tvm.ir.GlobalVar]:
    """The TIR functions that the Relax function ``entry`` calls (``call_tir`` and friends)."""
    called: dict[str, tvm.ir.GlobalVar] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.args and isinstance(expr.args[0], tvm.ir.GlobalVar):
            if isinstance(mod[expr.args[0]], tirx.PrimFunc):
                called[expr.args[0].name_hint] = expr.args[0]

    relax.analysis.post_order_visit(mod[entry].body, visit)
    return [called[name] for name in sorted(called)]


def specialize_prefill(target: Target) -> tvm.transform.Pass:
    """Give ``prefill`` its own copies of the matmul kernels, scheduled by ``TiledMatmul`` (named
    ``<kernel>_prefill``); the other entry points keep the originals, scheduled for few rows."""

    @tvm.transform.module_pass(opt_level=0, name="SpecializePrefillMatmuls")
    def _specialize(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        if PREFILL not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        rule, redirect = tiled_matmul(target), _Redirect(mod)
        for gv in called_kernels(mod, PREFILL):
            func = mod[gv]
            if func.attrs and func.attrs.get("tirx.is_scheduled"):
                continue
            sch = rule.apply(func, target, False)
            if sch is not None:
                scheduled = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                redirect.mapping[gv.name_hint] = redirect.builder_.add_func(
                    scheduled, f"{gv.name_hint}_{PREFILL}"
                )
        entry = mod.get_global_var(PREFILL)
        redirect.builder_.update_func(entry, redirect.visit_expr(mod[entry]))
        return redirect.builder_.get()

    return _specialize


def prefixed_name(prefix: str, name: str) -> str:
    """``<prefix><name>``, with a long fused name (a concatenation of 30 layers' scores fuses 30
    ``expand_dims``) cut to ``MAX_KERNEL_NAME`` characters and told apart by a hash of the whole name."""
    full = prefix + name
    if len(full) <= MAX_KERNEL_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:NAME_HASH]
    return f"{full[: MAX_KERNEL_NAME - NAME_HASH - 1]}_{digest}"


def prefix_kernels(prefix: str) -> tvm.transform.Pass:
    """Rename every TIR kernel to ``prefixed_name(prefix, name)`` and point the Relax functions at the new
    names.

    A library whose kernels run through ``runtime.opencl`` finds them by name in one process-wide registry;
    a prefix unique to the artifact keeps two artifacts' same-named kernels apart.
    """

    @tvm.transform.module_pass(opt_level=0, name="PrefixKernels")
    def _prefix(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        redirect = _Redirect(mod)
        kernels = [gv for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
        for gv in kernels:
            name = prefixed_name(prefix, gv.name_hint)
            func = mod[gv].with_attr("global_symbol", name)  # unlike the original, so never deduplicated
            redirect.mapping[gv.name_hint] = redirect.builder_.add_func(func, name)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                redirect.builder_.update_func(gv, redirect.visit_expr(func))
        renamed = redirect.builder_.get()
        old = {gv.name_hint for gv in kernels}
        kept = {gv: f for gv, f in renamed.functions.items() if gv.name_hint not in old}
        return tvm.IRModule(kept, attrs=renamed.attrs)

    return _prefix


class UnrolledGEMV(dl.gpu.LowBatchGEMV):
    """dlight's ``LowBatchGEMV`` with its write-back loops unrolled.

    The write-back copies the merged sums out, one padded row and output per iteration of serial loops that
    sit between the block and thread bindings, indexing the thread's sums by the loop variables. Left
    rolled, nvcc's sm_89 code keeps those sums in local memory (a 16-byte spill in the Q4_1 GEMV);
    unrolled, every index is a constant and they stay in registers. The cross-thread merge's own loops
    stay rolled: TVM's ``LowerThreadAllreduce`` cannot lower an unrolled copy of one reduction.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        sch = super().apply(func, target, tunable)
        if sch is None:
            return None
        for block in _blocks(sch, sch.get_sblock("root")):
            if any(v.iter_type == tirx.IterVar.CommReduce for v in sch.get(block).iter_vars):
                continue
            for loop in _between_bindings(sch, sch.get_loops(block)):
                sch.unroll(loop)
        return sch


def _blocks(sch, parent) -> list:
    """Every block under ``parent``, depth first."""
    found = []
    for child in sch.get_child_blocks(parent):
        found += [child, *_blocks(sch, child)]
    return found


def _between_bindings(sch, loops: list) -> list:
    """The serial loops of constant extent that sit inside a ``blockIdx`` loop and outside every
    ``threadIdx`` loop of one loop nest."""
    tags = [
        sch.get(loop).thread_binding.thread_tag if sch.get(loop).thread_binding is not None else ""
        for loop in loops
    ]
    inner_block = max((i for i, tag in enumerate(tags) if tag.startswith("blockIdx")), default=None)
    first_thread = next((i for i, tag in enumerate(tags) if tag.startswith("threadIdx")), len(loops))
    if inner_block is None:
        return []
    return [
        loop
        for loop in loops[inner_block + 1 : first_thread]
        if sch.get(loop).kind == tirx.ForKind.SERIAL and isinstance(sch.get(loop).extent, tirx.IntImm)
    ]


def rules() -> list[ScheduleRule]:
    return [
        UnrolledGEMV(GEMV_BUCKET),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Transpose(),
        dl.gpu.Fallback(),
    ]


def unbound_blocks(func: tirx.PrimFunc) -> list[str]:
    """The blocks of ``func`` that no ``blockIdx``/``threadIdx`` loop encloses: they would run as host code.

    A rule can return a schedule that binds only part of a function (dlight's ``LowBatchGEMV`` does, for an
    outer reduction over float weights), so every block is checked, not just the function. TVM 0.27 exposes
    no TIR visitor to Python, so this reads the function's TVMScript, whose indentation is its nesting.
    """
    text = func.script()
    if any(marker in text for marker in LAUNCH_MARKERS):  # already lowered to launched threads
        return []
    unbound, scopes = [], []  # scopes: (indent, binds threads) of the statements enclosing this line
    for line in text.splitlines():
        body = line.lstrip()
        indent = len(line) - len(body)
        while scopes and scopes[-1][0] >= indent:
            scopes.pop()
        block = BLOCK.match(body)
        if block and block.group(1) != "root" and not any(binds for _, binds in scopes):
            unbound.append(block.group(1))
        scopes.append((indent, "T.thread_binding(" in body))
    return unbound


def unbound_kernels(mod: tvm.ir.IRModule) -> list[str]:
    """``kernel (blocks)`` for each TIR function of the module (all device kernels at this stage) with a
    block outside thread bindings."""
    found = []
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and (blocks := unbound_blocks(func)):
            found.append(f"{gv.name_hint} ({', '.join(dict.fromkeys(blocks))})")
    return sorted(found)


@tvm.transform.module_pass(opt_level=0, name="CheckThreadBindings")
def check_bindings(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Record, in the module attribute ``UNBOUND_ATTR``, the device kernels without thread bindings.

    The pass only records them (an exception raised inside a TVM pass loses its type); the build driver
    calls ``raise_for_unbound`` on the pipeline's result.
    """
    missing = unbound_kernels(mod)
    return mod.with_attr(UNBOUND_ATTR, missing) if missing else mod


def raise_for_unbound(mod: tvm.ir.IRModule) -> None:
    """Fail the build, naming every kernel that ``check_bindings`` found without thread bindings."""
    missing = list(mod.attrs[UNBOUND_ATTR]) if mod.attrs and UNBOUND_ATTR in mod.attrs else []
    if missing:
        raise UnboundKernelError(
            f"{len(missing)} GPU kernel(s) have blocks without thread bindings that would run as host code: "
            f"{', '.join(missing)}; add a schedule rule for them in schedules/gpu.py"
        )


def pipeline(target: Target, kernel_prefix: str = "") -> tvm.transform.Pass:
    """The Relax pipeline for GPU targets: TVM's CUDA passes with our rules and the binding check (and,
    with ``kernel_prefix``, the kernels renamed by ``prefix_kernels``)."""
    from tvm.relax.backend.cuda import pipeline as gpu

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                gpu.library_dispatch_passes(target)
                + [
                    relax.transform.FuseTransposeMatmul(),  # x @ W.T as one NT matmul ([out, in] weights)
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    fuse_dequantize_matmul(),
                    specialize_prefill(target),
                    dl.ApplyDefaultSchedule(*rules()),
                    check_bindings,
                    *([prefix_kernels(kernel_prefix)] if kernel_prefix else []),
                ]
                + gpu.dataflow_lower_passes(target)
                + gpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
