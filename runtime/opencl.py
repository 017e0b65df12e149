"""Run a ``--target pocl`` artifact's kernels on PoCL, a CPU implementation of OpenCL, through pyopencl.

The PyPI TVM has no OpenCL runtime. Two registrations make an OpenCL library run anyway, with its host code
unchanged:

- ``device_api.opencl`` is the CPU's device API, so tensors on ``tvm.opencl(0)`` are host memory, which
  PoCL's CPU device shares;
- each kernel of the artifact's table (``compile.opencl``) is a global function. The host code looks a
  kernel up in the library's imports, finds none (the build dropped the OpenCL module) and falls back to
  global functions; it calls the launcher with the kernel's arguments and then its launch extents, and the
  launcher enqueues the kernel on PoCL and waits for it. Buffers go in as SVM pointers to host memory,
  which PoCL's CPU device dereferences directly.

Kernel names carry a prefix unique to the artifact (``schedules.gpu.prefix_kernels``), so artifacts of
different models do not share launchers.
"""

from __future__ import annotations

import ctypes
import functools
import json
from pathlib import Path

import numpy as np
import tvm_ffi

from ..errors import UserError, one_line

POCL_PLATFORM = "Portable Computing Language"
INSTALL = "pip install 'pyopencl[pocl]'"
PROBE_KERNEL = "__kernel void probe(__global float *x) { x[get_global_id(0)] = 1.0f; }"
_SCALARS = {
    "int32": np.int32,
    "int64": np.int64,
    "uint32": np.uint32,
    "uint8": np.uint8,
    "int8": np.int8,
    "bool": np.int8,
    "float32": np.float32,
    "float64": np.float64,
}
_AXES = "xyz"


class OpenCLUnavailable(UserError, RuntimeError):
    """pyopencl or its PoCL platform is missing here; the message is one line and says what to install."""


@functools.cache
def _queue():
    """The PoCL context's command queue (one per process)."""
    try:
        import pyopencl as cl
    except ImportError:
        raise OpenCLUnavailable(
            f"this artifact runs its kernels on PoCL through pyopencl: {INSTALL}"
        ) from None
    try:
        platforms = [p for p in cl.get_platforms() if p.name == POCL_PLATFORM]
    except cl.Error:
        platforms = []
    if not platforms:
        raise OpenCLUnavailable(f"no PoCL OpenCL platform here; this artifact needs one: {INSTALL}")
    context = cl.Context(platforms[0].get_devices())
    try:  # PoCL compiles kernels with its own LLVM, which may not know this CPU
        cl.Program(context, PROBE_KERNEL).build()
    except cl.Error as e:
        reason = next((line for line in str(e).splitlines() if "error" in line.lower()), str(e))
        raise OpenCLUnavailable(f"PoCL cannot compile kernels on this machine ({one_line(reason)})") from None
    return cl.CommandQueue(context)


def available() -> str | None:
    """None if PoCL can run kernels here, else the one-line reason it cannot."""
    try:
        _queue()
    except OpenCLUnavailable as e:
        return str(e)
    return None


class Kernel:
    """One kernel of a table: its program's source, parameter types and launch tags."""

    def __init__(self, name: str, source: str, params: list[str], launch: list[str]):
        self.name, self.source, self.params, self.launch = name, source, params, launch

    @functools.cached_property
    def _kernel(self):
        import pyopencl as cl

        return cl.Kernel(_program(self.source), self.name)

    def __call__(self, *args) -> None:
        import pyopencl as cl

        kernel, n = self._kernel, len(self.params)
        for i, (kind, value) in enumerate(zip(self.params, args[:n])):
            kernel.set_arg(i, _pointer(value) if kind == "handle" else _SCALARS[kind](value))
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, extent in zip(self.launch, args[n:]):
            scope, _, axis = tag.partition(".")
            (grid if scope == "blockIdx" else block)[_AXES.index(axis)] = int(extent)
        queue = _queue()
        cl.enqueue_nd_range_kernel(queue, kernel, tuple(g * b for g, b in zip(grid, block)), tuple(block))
        queue.finish()


@functools.cache
def _program(source: str):
    import pyopencl as cl

    return cl.Program(_queue().context, source).build()


def _pointer(value):
    """An SVM argument for a raw host address (a one-byte view of it; PoCL reads through the address)."""
    import pyopencl as cl

    address = value.value if isinstance(value, ctypes.c_void_p) else int(value or 0)
    return cl.SVM(np.ctypeslib.as_array((ctypes.c_ubyte * 1).from_address(address)))


def register(table_path: Path) -> None:
    """Make the kernels of ``table_path`` runnable: the OpenCL device API and one launcher per kernel."""
    register_table(json.loads(Path(table_path).read_text()))


def register_table(table: dict) -> None:
    """``register`` for a kernel table in memory (as ``compile.opencl.recording_kernels`` yields it)."""
    _queue()
    register_device()
    for name, k in table["kernels"].items():
        kernel = Kernel(name, table["programs"][k["program"]], k["params"], k["launch"])
        tvm_ffi.register_global_func(name, kernel, override=True)


def register_device() -> None:
    """Make ``tvm.opencl(0)`` the CPU's device: its tensors are host memory, which PoCL's CPU device reads."""
    tvm_ffi.register_global_func(
        "device_api.opencl", tvm_ffi.get_global_func("device_api.cpu"), override=True
    )
