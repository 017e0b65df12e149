"""How a process loads TVM: whole (compiler, runtime and device backends), or its runtime alone for a process
that only runs CPU artifacts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

from .constants import CPU_DEVICE
from .manifest import Manifest, ManifestError

RUNTIME_ONLY_ENV = "TVM_USE_RUNTIME_LIB"  # TVM's switch: "1" makes `import tvm` load libtvm_runtime alone
COMPILER_LIBRARY = "libtvm_compiler.so"


def runs_on_cpu(artifact: Path) -> bool:
    """Whether ``artifact`` runs on the CPU's own kernels (an llvm artifact; PoCL's run through OpenCL)."""
    try:
        manifest = Manifest.load(artifact)
    except ManifestError:
        return False  # loading it later says what is wrong
    return manifest.device == CPU_DEVICE and manifest.kernel_table is None


def runtime_only(artifacts: Iterable[Path]) -> None:
    """Have ``import tvm`` load TVM's runtime library without its compiler (``libtvm_compiler.so``, about
    110 MB resident) when every one of ``artifacts`` runs on the CPU: for a process that runs artifacts and
    compiles nothing (``serve``, ``bench memory``). TVM's runtime-only mode loads no device backend (the
    CUDA runtime is one), so GPU artifacts keep the whole of TVM. Child processes inherit the choice; it has
    no effect once tvm is imported."""
    if "tvm" not in sys.modules and all(runs_on_cpu(Path(a)) for a in artifacts):
        os.environ.setdefault(RUNTIME_ONLY_ENV, "1")
