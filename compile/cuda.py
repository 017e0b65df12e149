"""CUDA kernels compiled at build time: the library's CUDA source -> one fatbin for every requested arch.

TVM 0.27 built without a CUDA driver (as on the build machines) stores the kernels as CUDA C *source* in the
library, to be compiled when it is loaded (NVRTC, or nvcc). This module compiles that source here, with nvcc,
into a fatbin holding SASS for each arch (and PTX for the newest, so newer cards can JIT it), so that a kernel
that does not compile fails the build, not the user's GPU. The fatbin then replaces the source inside the
library (``pack_imports_with_fatbin``): the library's CUDA module is TVM's own CUDA module in fatbin format,
which any TVM CUDA runtime loads (a C++ host, ``tvm.runtime.load_module``, MLC tooling) with neither NVRTC
nor nvcc, and no CUDA source is left in it.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import tvm
import tvm_ffi
from tvm.target import Target

from ..errors import UserError, one_line
from ..schedules.gpu_attention import CUDA_STATIC_SHARED

CUDA_SOURCE_FORMAT = "cuda"  # the kind of the library's imported module that holds the kernels' source


class CudaCompileError(UserError, RuntimeError):
    """nvcc is missing or rejected the generated kernels; the message is one line."""


def cuda_source(library: tvm.runtime.Module) -> str:
    """The CUDA C source of the kernels imported by a built library (raises if it has none)."""
    sources = [m.inspect_source() for m in import_tree(library) if m.kind == CUDA_SOURCE_FORMAT]
    if len(sources) != 1 or not sources[0]:
        raise CudaCompileError(f"the built library holds {len(sources)} CUDA modules, expected one")
    return sources[0]


def import_tree(module: tvm.runtime.Module) -> list[tvm.runtime.Module]:
    """Every module imported by ``module``, directly or not (``module`` itself left out)."""
    found = []
    for child in module.imports:
        found += [child, *import_tree(child)]
    return found


# ------------------------------------------------------------------------------------------------------
# The fatbin inside the library
#
# ``export_library`` packs the library's imported modules into one blob
# (``runtime.ModulePackImportsToTensor``): a u64 size, the import tree (two u64 vectors), then per module
# its kind and, but for the host library ("_lib"), its bytes. A CUDA module's bytes are its format string,
# its function table and its data; TVM's CUDA loader reads them back in that order. Here the format becomes
# "fatbin" and the data the fatbin.

FATBIN_FORMAT = "fatbin"
HOST_LIBRARY = "_lib"
_U64 = struct.Struct("<Q")


def _read_u64(blob: bytes, at: int) -> tuple[int, int]:
    return _U64.unpack_from(blob, at)[0], at + _U64.size


def _read_bytes(blob: bytes, at: int) -> tuple[bytes, int]:
    n, at = _read_u64(blob, at)
    return blob[at : at + n], at + n


def _bytes_field(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data


def embed_fatbin(blob: bytes, source: str, fatbin: bytes) -> bytes:
    """The packed-imports ``blob`` with its CUDA module's ``source`` replaced by ``fatbin``."""
    size, at = _read_u64(blob, 0)
    if size != len(blob) - _U64.size:
        raise CudaCompileError("the library's packed modules are not in the layout this TVM writes")
    rows, at = _read_u64(blob, at)
    at += rows * _U64.size
    children, at = _read_u64(blob, at)
    at += children * _U64.size
    out, replaced = bytearray(blob[_U64.size : at]), 0
    for _ in range(rows - 1):
        kind, at = _read_bytes(blob, at)
        out += _bytes_field(kind)
        if kind == HOST_LIBRARY.encode():
            continue
        payload, at = _read_bytes(blob, at)
        if kind == CUDA_SOURCE_FORMAT.encode():
            fmt, body = _read_bytes(payload, 0)
            data = _bytes_field(source.encode())
            if not payload.endswith(data):
                raise CudaCompileError("the library's CUDA module does not hold the source that was compiled")
            function_table = payload[body : len(payload) - len(data)]
            payload = _bytes_field(FATBIN_FORMAT.encode()) + function_table + _bytes_field(fatbin)
            replaced += 1
        out += _bytes_field(payload)
    if replaced != 1:
        raise CudaCompileError(f"the library holds {replaced} CUDA modules, expected one")
    return _U64.pack(len(out)) + bytes(out)


def pack_imports_with_fatbin(source: str, fatbin: bytes):
    """An ``export_library(fpack_imports=...)`` hook: TVM's packed-imports C file, the fatbin embedded."""

    def pack(module, is_system_lib: bool, prefix: str, workspace: str) -> str:
        blob = bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module).numpy())
        blob = embed_fatbin(blob, source, fatbin)
        c_source = tvm_ffi.get_global_func("runtime.ModulePackImportsToC")(module, is_system_lib, prefix)
        head, _, rest = c_source.partition("] = {")
        tail = rest[rest.index("};") :]
        head = re.sub(r"\[\d+$", f"[{len(blob)}", head)
        rows = (",".join(f"0x{b:02x}" for b in blob[i : i + 32]) for i in range(0, len(blob), 32))
        path = Path(workspace) / f"{prefix}devc.c"
        path.write_text(head + "] = {\n" + ",\n".join(rows) + ",\n" + tail)
        return str(path)

    return pack


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
