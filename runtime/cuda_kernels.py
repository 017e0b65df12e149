"""Serve an artifact's prebuilt fatbin to TVM's CUDA loader, so that loading needs neither NVRTC nor nvcc.

A CUDA library built by TVM 0.27 without a driver carries its kernels as CUDA source, and TVM's CUDA runtime
compiles that source when the library is loaded, through the global function ``tvm_callback_cuda_compile``.
``compile`` already compiled the same source into the artifact's fatbin (see ``mlc_magicdec.compile.cuda``);
this module overrides the callback so that it returns that fatbin for the source it was built from (matched
by sha256), and defers to TVM's own compiler for any other source.
"""

from __future__ import annotations

import hashlib

import tvm_ffi

CALLBACK = "tvm_callback_cuda_compile"

_fatbins: dict[str, bytes] = {}  # sha256 of a library's CUDA source -> its fatbin
_tvm_compile = None  # the callback TVM registered (nvrtc / nvcc), for sources with no prebuilt fatbin


def _compile(code: str) -> bytes:
    fatbin = _fatbins.get(hashlib.sha256(code.encode()).hexdigest())
    if fatbin is not None:
        return fatbin
    if _tvm_compile is None:
        raise RuntimeError("no prebuilt fatbin for this CUDA source and no CUDA compiler registered")
    return _tvm_compile(code)


def serve_fatbin(source_sha256: str, fatbin: bytes) -> None:
    """Make TVM's CUDA loader use ``fatbin`` for the CUDA source whose sha256 is ``source_sha256``."""
    global _tvm_compile
    if not _fatbins:
        try:
            import tvm.support.nvcc  # noqa: F401 - registers TVM's own callback, kept as the fallback
        except ImportError:
            pass
        _tvm_compile = tvm_ffi.get_global_func(CALLBACK, allow_missing=True)
        tvm_ffi.register_global_func(CALLBACK, _compile, override=True)
    _fatbins[source_sha256] = fatbin
