"""Fusing the dequantize of a quantized weight into the matmul that reads it.

Relax's ``FuseOps`` does not fuse an injective producer into a matmul, so a quantized linear would
write its whole float weight to memory and read it back. ``FuseDequantizeMatmul`` groups each
``dequantize`` call with the (already epilogue-fused) matmul that consumes it, and ``FuseTIR`` makes the
pair one kernel; the matmul schedules then dequantize tiles of the weight as they stream it.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl.pattern import GlobalVarPattern, TuplePattern, is_op, wildcard

DEQUANTIZE = "dequantize"  # the name of the model's dequantize kernels (compile.quantization)
_MATMULS = ("matmul", "fused_matmul", "NT_matmul", "fused_NT_matmul")  # [in, out] or [out, in] W
_WEIGHT_TENSORS = (2, 3)  # codes, scale[, min]
_EPILOGUE_INPUTS = (0, 1, 2)  # bias, residual


def _callee(ctx: relax.transform.PatternCheckContext, key: str) -> str:
    call = ctx.annotated_expr[key]
    return call.args[0].name_hint if isinstance(call, relax.Call) else ""


def _check(ctx: relax.transform.PatternCheckContext) -> bool:
    return _callee(ctx, "weight").startswith(DEQUANTIZE) and _callee(ctx, "matmul").startswith(_MATMULS)


def _pattern(weight_tensors: int, epilogue_inputs: int):
    weight = is_op("relax.call_tir")(
        GlobalVarPattern(), TuplePattern([wildcard() for _ in range(weight_tensors)]), add_constraint=False
    )
    matmul = is_op("relax.call_tir")(
        GlobalVarPattern(),
        TuplePattern([wildcard(), weight] + [wildcard() for _ in range(epilogue_inputs)]),
        add_constraint=False,
    )
    return ("dequantize_matmul", matmul, {"weight": weight, "matmul": matmul}, _check)


def fuse_dequantize_matmul() -> tvm.transform.Pass:
    """Group each ``dequantize`` with the matmul reading it, then fuse each group into one TIR kernel."""
    patterns = [_pattern(w, e) for w in _WEIGHT_TENSORS for e in _EPILOGUE_INPUTS]
    return tvm.transform.Sequential(
        [relax.transform.FuseOpsByPattern([p]) for p in patterns] + [relax.transform.FuseTIR()],
        name="FuseDequantizeMatmul",
    )
