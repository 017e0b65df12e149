"""How a process loads TVM: whole (compiler and runtime), or its runtime alone for a process that only runs
compiled artifacts."""

from __future__ import annotations

import os
import sys

RUNTIME_ONLY_ENV = "TVM_USE_RUNTIME_LIB"  # TVM's switch: "1" makes `import tvm` load libtvm_runtime alone
COMPILER_LIBRARY = "libtvm_compiler.so"


def runtime_only() -> None:
    """Have ``import tvm`` load TVM's runtime library without its compiler (``libtvm_compiler.so``, about
    110 MB resident): for a process that runs artifacts and compiles nothing (``serve``, ``bench memory``).
    Child processes inherit it. No effect if tvm is already imported."""
    if "tvm" not in sys.modules:
        os.environ.setdefault(RUNTIME_ONLY_ENV, "1")
