"""Build one TIR kernel as ``--target pocl`` builds the library's: scheduled for CUDA (by the caller, or it
arrives scheduled), generated as OpenCL C, and launched on the CPU by PoCL through ``runtime.opencl``.

Tests that run kernels on PoCL carry ``needs_pocl``: where PoCL cannot compile kernels they are skipped with
the reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import tvm
from tvm import tirx

from mlc_magicdec.compile import opencl as compile_opencl
from mlc_magicdec.compile.targets import resolve
from mlc_magicdec.runtime import opencl

POCL = resolve("pocl")  # .target: the CUDA target the kernels are scheduled for; .codegen: OpenCL
DEVICE = tvm.opencl(0)
POCL_MISSING = opencl.available()
needs_pocl = pytest.mark.skipif(POCL_MISSING is not None, reason=f"PoCL cannot run here: {POCL_MISSING}")
BARRIER = "barrier(CLK_LOCAL_MEM_FENCE);"  # a work-group barrier in the generated OpenCL C

_builds = itertools.count()  # launchers are global functions keyed by kernel name: each build gets a prefix


def build(func: tirx.PrimFunc, edit: Callable[[str], str] | None = None) -> Callable:
    """``func`` (already scheduled) compiled for PoCL; ``edit``, if given, rewrites its OpenCL C first."""
    name = str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else "main"
    symbol = f"pocl{next(_builds)}_{name}"
    mod = compile_opencl.without_targets(tvm.IRModule({symbol: func.with_attr("global_symbol", symbol)}))
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        with compile_opencl.recording_kernels() as table:
            executable = tvm.compile(mod, target=POCL.codegen)
    compile_opencl.drop_opencl_modules(executable.mod)
    if edit is not None:
        table["programs"] = [edit(source) for source in table["programs"]]
    opencl.register_table(table)
    return executable[symbol]


def tensor(array: np.ndarray) -> tvm.runtime.Tensor:
    """``array`` on the PoCL device (host memory)."""
    opencl.register_device()
    return tvm.runtime.tensor(array, DEVICE)
