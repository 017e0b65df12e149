"""CUDA kernels compiled at build time: the library's CUDA source -> one fatbin for every requested arch.

TVM 0.27 built without a CUDA driver (as on the build machines) stores the kernels as CUDA C *source* in the
library, to be compiled when it is loaded (NVRTC, or nvcc). This module compiles that source here, with nvcc,
into a fatbin holding SASS for each arch (and PTX for the newest, so newer cards can JIT it), so that a kernel
that does not compile fails the build, not the user's GPU. The fatbin is written beside the library; the
runtime hands it to TVM's CUDA loader (see ``mlc_magicdec.runtime.cuda_kernels``), so neither NVRTC nor nvcc
is needed where the artifact runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm
from tvm.target import Target

from ..errors import UserError, one_line
from ..schedules.gpu_attention import CUDA_STATIC_SHARED

CUDA_SOURCE_FORMAT = "cuda"  # the kind of the library's imported module that holds the kernels' source


class CudaCompileError(UserError, RuntimeError):
    """nvcc is missing or rejected the generated kernels; the message is one line."""


def cuda_source(library: tvm.runtime.Module) -> str:
    """The CUDA C source of the kernels imported by a built library (raises if it has none)."""
    sources = [m.inspect_source() for m in _import_tree(library) if m.kind == CUDA_SOURCE_FORMAT]
    if len(sources) != 1 or not sources[0]:
        raise CudaCompileError(f"the built library holds {len(sources)} CUDA modules, expected one")
    return sources[0]


def _import_tree(module: tvm.runtime.Module) -> list[tvm.runtime.Module]:
    """Every module imported by ``module``, directly or not."""
    found = []
    for child in module.imports:
        found += [child, *_import_tree(child)]
    return found


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    """nvcc ``-gencode`` flags: SASS for every arch, plus PTX of the newest one for future cards."""
    numbers = sorted({a.removeprefix("sm_") for a in archs}, key=lambda a: int(a.rstrip("af")))
    flags = []
    for number in numbers:
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    flags += ["-gencode", f"arch=compute_{numbers[-1]},code=compute_{numbers[-1]}"]
    return flags


def compile_fatbin(source: str, archs: tuple[str, ...], target: Target) -> bytes:
    """Compile ``source`` with nvcc into a fatbin for ``archs``; raises CudaCompileError (one line)."""
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise CudaCompileError(
            "--target cuda compiles its kernels with nvcc, which is not on PATH; install the CUDA toolkit "
            "or add its bin folder (e.g. /usr/local/cuda/bin) to PATH"
        )
    try:
        with target:
            flags = gencode_flags(archs)
            binary = nvcc.compile_cuda(source, target_format="fatbin", arch=flags, compiler="nvcc")
        return bytes(binary)
    except RuntimeError as e:
        raise CudaCompileError(f"nvcc rejected the generated CUDA kernels: {_first_error(str(e))}") from None


def _first_error(message: str) -> str:
    """The first ``error`` line of nvcc's output (the message also carries the whole source)."""
    output = message.split("Compilation error:", 1)[-1]
    for line in output.splitlines():
        if "error" in line.lower():
            return one_line(line)
    return one_line(output)


# ------------------------------------------------------------------------------------------------------
# Static resources: what ptxas allots each kernel, checked without a GPU

_KERNEL = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def resource_usage(source: str, archs: tuple[str, ...]) -> dict[str, dict[str, dict[str, int]]]:
    """``{arch: {kernel: {registers, shared_bytes, stack_bytes, spill_stores, spill_loads}}}`` as ptxas
    reports them (``nvcc -cubin -Xptxas -v``) for each arch; raises CudaCompileError (one line)."""
    usage = {}
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "kernels.cu"
        cu.write_text(source)
        for arch in archs:
            cmd = [
                "nvcc",
                "-cubin",
                f"-arch={arch}",
                "-Xptxas",
                "-v",
                "-o",
                str(Path(tmp) / "k.cubin"),
                str(cu),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise CudaCompileError(f"ptxas rejected the kernels for {arch}: {_first_error(done.stderr)}")
            usage[arch] = parse_ptxas(done.stderr)
    return usage


def parse_ptxas(report: str) -> dict[str, dict[str, int]]:
    """Per kernel, the registers, shared memory, stack and spills of a ``ptxas -v`` report."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        if m := _KERNEL.search(line):
            current = kernels.setdefault(m.group(1), {})
        elif current is not None and (m := _SPILLS.search(line)):
            current.update(
                stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
        elif current is not None and (m := _USED.search(line)):
            current.update(registers=int(m.group(1)), shared_bytes=int(m.group(2) or 0))
    return kernels


def check_resources(usage: dict[str, dict[str, dict[str, int]]]) -> None:
    """Fail the build (one line) if a kernel spills registers or uses more shared memory than its arch."""
    for arch, kernels in usage.items():
        for name, k in kernels.items():
            if k.get("spill_stores") or k.get("spill_loads"):
                raise CudaCompileError(
                    f"kernel {name} spills registers on {arch} ({k['spill_stores']} bytes stored, "
                    f"{k['spill_loads']} loaded); reschedule it to use fewer registers"
                )
            if k.get("shared_bytes", 0) > CUDA_STATIC_SHARED:
                raise CudaCompileError(
                    f"kernel {name} uses {k['shared_bytes']} bytes of shared memory on {arch}, over the "
                    f"{CUDA_STATIC_SHARED}-byte limit of static shared memory (all TVM's kernels use); "
                    "reschedule it with smaller tiles"
                )
