"""The GPU matmul schedules, run on PoCL against numpy (float32): a linear layer ``x @ W.T`` with
``W[out, in]`` through the GPU pipeline's fusion and scheduling passes under the CUDA target. Decode and draft
are GEMVs (``LowBatchGEMV``, ``GEMV_BUCKET`` rows a weight read), verify a small-M GEMM of batch x (gamma + 1)
rows, and prefill's copy of the kernel the shared-memory ``TiledMatmul``."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tvm
from pocl_kernels import POCL, build, needs_pocl, tensor
from tvm import relax, tirx
from tvm.s_tir import dlight as dl

from mlc_magicdec.schedules import gpu

IN_OUT = [(256, 384), (200, 72)]  # a hidden size and a projection; sizes that tile neither way
ROWS = {
    "gemv": [1, 2, 3, 4],  # decode and draft: batch rows
    "verify": [5, 8, 13, 33],  # batch x (gamma + 1) rows
    "prefill": [70, 200],
}
KERNEL = "NT_matmul"  # the fused x @ W.T
PREFILL_KERNEL = f"{KERNEL}_{gpu.PREFILL}"
ATOL, RTOL = 1e-4, 1e-5


def linear_module(in_features: int, out_features: int) -> tvm.IRModule:
    """A Relax ``prefill(x[n, in], w[out, in]) = x @ w.T`` (the model's linears on GPU targets)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tirx.Var("n", "int64"), in_features), "float32"))
    w = relax.Var("w", relax.TensorType((out_features, in_features), "float32"))
    with bb.function(gpu.PREFILL, [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(y)
    return bb.get()


@functools.cache
def scheduled(in_features: int, out_features: int) -> tvm.IRModule:
    """The linear's kernels as ``schedules.gpu.pipeline`` fuses and schedules them for CUDA: ``NT_matmul``
    (dlight's rules) and prefill's copy ``NT_matmul_prefill`` (``TiledMatmul``)."""
    passes = [
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        gpu.specialize_prefill(POCL.target),
        dl.ApplyDefaultSchedule(*gpu.rules()),
    ]
    with POCL.target:
        return tvm.transform.Sequential(passes)(linear_module(in_features, out_features))


@functools.cache
def kernel(in_features: int, out_features: int, name: str):
    return build(scheduled(in_features, out_features)[name])


@pytest.mark.parametrize("in_features, out_features", IN_OUT)
def test_every_block_is_bound_to_threads(in_features, out_features):
    mod = scheduled(in_features, out_features)
    assert {gv.name_hint for gv in mod.functions} == {gpu.PREFILL, KERNEL, PREFILL_KERNEL}
    assert gpu.unbound_kernels(mod) == []


@needs_pocl
@pytest.mark.parametrize("in_features, out_features", IN_OUT)
@pytest.mark.parametrize(
    "name, rows",
    [(KERNEL, n) for n in ROWS["gemv"] + ROWS["verify"]] + [(PREFILL_KERNEL, n) for n in ROWS["prefill"]],
)
def test_linear_matches_numpy(in_features, out_features, name, rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    y = tensor(np.full((rows, out_features), np.nan, np.float32))
    kernel(in_features, out_features, name)(tensor(x), tensor(w), y)
    expect = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(y.numpy(), expect, atol=ATOL * np.sqrt(in_features), rtol=RTOL)
