"""The memory roofline of decoding on this CPU: measured bandwidth and FLOP/s, and what they allow.

A decode step reads every weight once and each sequence's KV cache once, so the fastest a step can be is
``bytes(step) / bandwidth`` with ``bytes(step) = W + batch * KV(context)`` (MagicDec, arXiv:2408.11049).

- **Bandwidth** is a STREAM-like triad ``a = b + s * c`` over three arrays far larger than the caches,
  counting 3 array passes of bytes (two reads, one write) as STREAM does; a compiled, vectorized kernel runs
  it on TVM's thread pool with ``threads`` threads, the pool our kernels use.
- **Read bandwidth** (reported alongside): read-only passes over one such array, the access pattern of a
  decode step, which reads weights and KV and writes almost nothing.
- **FLOP/s** is an fp32 matmul of ``MATMUL_SIZE`` square matrices (torch's BLAS on ``threads`` threads when
  torch is installed, else numpy's).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Sequence

import numpy as np

from ..runtime.costmodel import MEASURED_CPU, Hardware, ModelSpec

TRIAD_BYTES = 256 << 20  # bytes per triad array (three of them: far larger than any CPU cache)
TRIAD_PASSES = 3  # a triad reads two arrays and writes one
TRIAD_REPEATS = 7
TRIAD_CHUNK = 1 << 14  # floats per parallel work item of the triad and the read pass
LANES = 16  # fp32 lanes of one AVX-512 register (partial sums of the read pass)
MATMUL_SIZE = 2048
MATMUL_REPEATS = 5
SCALAR = np.float32(3.0)
GB = 1e9


@dataclasses.dataclass
class Machine:
    """Measured bandwidth (best and median triad, bytes/s) and fp32 matmul FLOP/s of this machine."""

    bandwidth_best: float
    bandwidth_median: float
    matmul_flops: float
    threads: int
    read_bandwidth: float = 0.0  # median of read-only passes (a decode step only reads), bytes/s


def _triad_kernel(n: int):
    """``a = b + SCALAR * c`` over ``n`` floats: parallel over chunks, vectorized within (TVM, llvm)."""
    import tvm
    from tvm.script import tirx as T

    from ..compile.targets import host_llvm

    chunks = n // TRIAD_CHUNK

    @T.prim_func(s_tir=True)
    def triad(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32"), c: T.Buffer((n,), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for o in T.parallel(chunks):
            for i in T.vectorized(TRIAD_CHUNK):
                a[o * TRIAD_CHUNK + i] = b[o * TRIAD_CHUNK + i] + SCALAR * c[o * TRIAD_CHUNK + i]

    return tvm.compile(tvm.IRModule({"main": triad}), target=host_llvm())["main"]


def _read_kernel(n: int):
    """Per-chunk, per-lane sums of ``b`` (``n`` floats): a read-only stream, like a decode step's."""
    import tvm
    from tvm.script import tirx as T

    from ..compile.targets import host_llvm

    chunks = n // TRIAD_CHUNK

    @T.prim_func(s_tir=True)
    def read(b: T.Buffer((n,), "float32"), sums: T.Buffer((chunks, LANES), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for o in T.parallel(chunks):
            for lane in T.vectorized(LANES):
                sums[o, lane] = T.float32(0)
            for i in T.serial(TRIAD_CHUNK // LANES):
                for lane in T.vectorized(LANES):
                    sums[o, lane] = sums[o, lane] + b[o * TRIAD_CHUNK + i * LANES + lane]

    return tvm.compile(tvm.IRModule({"main": read}), target=host_llvm())["main"]


def _timed_rates(kernel, args, bytes_moved: int, repeats: int) -> list[float]:
    """Bytes/s of each of ``repeats`` calls of ``kernel(*args)``, after a warm-up call (faults pages in)."""
    kernel(*args)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernel(*args)
        rates.append(bytes_moved / (time.perf_counter() - t0))
    return rates


def _array_floats(threads: int, array_bytes: int) -> int:
    """Set TVM's pool to ``threads`` threads; return the floats (whole chunks) of an ``array_bytes`` array."""
    from ..runtime.threads import configure_threads

    configure_threads(threads)
    return array_bytes // np.dtype(np.float32).itemsize // TRIAD_CHUNK * TRIAD_CHUNK


def read_bandwidth(threads: int, array_bytes: int = TRIAD_BYTES, repeats: int = TRIAD_REPEATS) -> list[float]:
    """Bytes/s of each of ``repeats`` read-only passes over an array far larger than the caches."""
    import tvm

    n = _array_floats(threads, array_bytes)
    b = tvm.runtime.tensor(np.ones(n, np.float32))
    sums = tvm.runtime.empty((n // TRIAD_CHUNK, LANES), "float32")
    rates = _timed_rates(_read_kernel(n), (b, sums), n * np.dtype(np.float32).itemsize, repeats)
    if not np.allclose(sums.numpy().sum(), n):
        raise AssertionError("the read pass computed a wrong sum")
    return rates


def triad_bandwidth(
    threads: int, array_bytes: int = TRIAD_BYTES, repeats: int = TRIAD_REPEATS
) -> list[float]:
    """Bytes/s of each of ``repeats`` triads ``a = b + s * c`` (after a warm-up that faults pages in), run by
    a compiled kernel on TVM's thread pool with ``threads`` threads."""
    import tvm

    n = _array_floats(threads, array_bytes)
    a = tvm.runtime.tensor(np.zeros(n, np.float32))
    b = tvm.runtime.tensor(np.ones(n, np.float32))
    c = tvm.runtime.tensor(np.full(n, 2.0, np.float32))
    moved = TRIAD_PASSES * n * np.dtype(np.float32).itemsize
    rates = _timed_rates(_triad_kernel(n), (a, b, c), moved, repeats)
    if not np.allclose(a.numpy()[:: n // 16], 1.0 + float(SCALAR) * 2.0):
        raise AssertionError("the triad computed a wrong result")
    return rates


def matmul_flops(threads: int, size: int = MATMUL_SIZE, repeats: int = MATMUL_REPEATS) -> float:
    """Best fp32 FLOP/s of ``size``-square matmuls: torch (MKL/oneDNN) on ``threads`` threads if installed,
    else numpy's BLAS (with its own thread count)."""
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size), dtype=np.float32)
    y = rng.standard_normal((size, size), dtype=np.float32)
    if torch is not None:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    try:
        x @ y
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
    finally:
        if torch is not None:
            torch.set_num_threads(saved)
    return 2 * size**3 / min(times)


def measure(threads: int) -> Machine:
    rates = triad_bandwidth(threads)
    reads = read_bandwidth(threads)
    flops = matmul_flops(threads)
    return Machine(max(rates), statistics.median(rates), flops, threads, statistics.median(reads))


def weight_bytes(spec: ModelSpec) -> int:
    """Bytes of the weights a decode step reads (the cost model's ``W``: every linear layer, the norms and
    the lm_head; one embedding row per token is negligible and not counted)."""
    return spec.weight_bytes


def kv_bytes(spec: ModelSpec, context: int) -> int:
    """Bytes of one sequence's KV cache at ``context`` tokens: ``2 * layers * kv_heads * head_dim * L``."""
    return spec.kv_bytes_per_token * context


def step_bytes(spec: ModelSpec, batch: int, context: int) -> int:
    return weight_bytes(spec) + batch * kv_bytes(spec, context)


def roofline_rows(
    spec: ModelSpec, batches: Sequence[int], contexts: Sequence[int], bandwidth: float
) -> list[dict]:
    """For each (batch, context): bytes a step reads and the tokens/s the bandwidth allows."""
    rows = []
    for batch in batches:
        for context in contexts:
            w, kv = weight_bytes(spec), batch * kv_bytes(spec, context)
            rows.append(
                {
                    "batch": batch,
                    "context": context,
                    "weight_bytes": w,
                    "kv_bytes": kv,
                    "step_bytes": w + kv,
                    "max_tok_s": batch * bandwidth / (w + kv),
                }
            )
    return rows


def bandwidth_fraction(spec: ModelSpec, batch: int, context: int, step_s: float, bandwidth: float) -> float:
    """Achieved bytes/s of a decode step taking ``step_s`` seconds, as a fraction of ``bandwidth``."""
    return step_bytes(spec, batch, context) / step_s / bandwidth


def this_cpu(threads: int | None = None) -> Hardware:
    """This machine's CPU, measured now: triad bandwidth (median) and fp32 matmul FLOP/s, and its physical
    memory. (Only ``plan --hardware cpu`` measures; the engine never calls this.)"""
    from ..runtime.threads import available_cpus

    machine = measure(threads or available_cpus())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(MEASURED_CPU, machine.bandwidth_median, machine.matmul_flops, memory=float(memory))
