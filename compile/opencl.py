"""``--target pocl``: the CUDA library's kernels, generated as OpenCL C, for running on PoCL (a CPU OpenCL).

The kernels are scheduled under the CUDA target, so they are the ones ``--target cuda`` ships (dlight picks
tiles by target kind), then generated as OpenCL C. The PyPI TVM has OpenCL code generation but no OpenCL
runtime, so the library cannot carry them as a loadable module: the build records each kernel (its OpenCL
program, parameter types and launch dimensions) in a kernel table beside the library and drops the OpenCL
module from it; ``runtime.opencl`` launches the kernels from that table through pyopencl. Float32 only: PoCL
has no fp16 here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import tvm
import tvm_ffi
from tvm.target import Target

from ..errors import UserError
from ..schedules.gpu_attention import CUDA_STATIC_SHARED
from .cuda import import_tree

KERNEL_TABLE_NAME = "opencl-kernels.json"
KERNEL_TABLE_FORMAT = 1
OPENCL_BUILD = "target.build.opencl"
OPENCL_MODULE = "opencl"  # the kind of the library's imported module that holds the OpenCL source
# The OpenCL code generator's limits: the CUDA schedules' blocks (up to 1024 threads, 48 KB of shared
# memory) must fit; warp size 1 lowers the cross-thread reductions to shared-memory trees.
CODEGEN_ATTRS = {
    "kind": "opencl",
    "max_threads_per_block": 1024,
    "max_shared_memory_per_block": CUDA_STATIC_SHARED,
    "thread_warp_size": 1,
}


class OpenCLBuildError(UserError, RuntimeError):
    """The OpenCL code generator is missing or the library's kernels did not come out as expected."""


def codegen_target(host: Target) -> Target:
    """The OpenCL target the scheduled kernels are generated for, with ``host``'s host code."""
    return Target(CODEGEN_ATTRS, host=host)


def without_targets(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with the CUDA ``target`` attribute dropped from every function, so the build assigns OpenCL."""
    functions = {
        gv: f.without_attr("target") if f.attrs and "target" in f.attrs else f
        for gv, f in mod.functions.items()
    }
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)


@contextlib.contextmanager
def recording_kernels() -> Iterator[dict]:
    """While open, every OpenCL build records its kernels into the yielded table (programs and kernels)."""
    build = tvm_ffi.get_global_func(OPENCL_BUILD, allow_missing=True)
    if build is None:
        raise OpenCLBuildError("this TVM has no OpenCL code generator; --target pocl needs one")
    table: dict = {"format": KERNEL_TABLE_FORMAT, "programs": [], "kernels": {}}

    def record(mod: tvm.IRModule, target: Target):
        module = build(mod, target)
        program = len(table["programs"])
        table["programs"].append(module.inspect_source())
        for gv, func in mod.functions.items():
            name = str(func.attrs["global_symbol"]) if "global_symbol" in func.attrs else gv.name_hint
            table["kernels"][name] = {
                "program": program,
                "params": [_param_type(p) for p in func.params],
                "launch": [str(tag) for tag in func.attrs["tirx.kernel_launch_params"]],
            }
        return module

    tvm_ffi.register_global_func(OPENCL_BUILD, record, override=True)
    try:
        yield table
    finally:
        tvm_ffi.register_global_func(OPENCL_BUILD, build, override=True)


def _param_type(var: tvm.tirx.Var) -> str:
    """``handle`` for a buffer pointer, else the scalar dtype."""
    return "handle" if isinstance(var.ty, tvm.ir.PointerType) else str(var.ty.dtype)


def drop_opencl_modules(library: tvm.runtime.Module) -> int:
    """Remove the OpenCL source modules from ``library``'s import tree; returns how many there were."""
    dropped = 0
    for parent in [library, *import_tree(library)]:
        children = list(parent.imports)
        keep = [m for m in children if m.kind != OPENCL_MODULE]
        if len(keep) != len(children):
            dropped += len(children) - len(keep)
            parent.clear_imports()
            for m in keep:
                parent.import_module(m)
    return dropped


def write_kernel_table(table: dict, folder: Path) -> str:
    """Write the kernel table into the artifact folder; returns its file name."""
    if not table["kernels"]:
        raise OpenCLBuildError("the OpenCL build produced no kernels")
    (folder / KERNEL_TABLE_NAME).write_text(json.dumps(table))
    return KERNEL_TABLE_NAME
