"""CPU thread count for TVM's thread pool.

TVM assumes x86 CPUs have hyper-threading and uses half the logical CPUs by default, which halves
throughput on machines (and containers) without it. The runtime sets the count explicitly instead.
"""

from __future__ import annotations

import os

import tvm

THREADS_ENV = "TVM_NUM_THREADS"
_AFFINITY_DEFAULT = 0  # TVM's ThreadGroup::AffinityMode kBig = 1, kLittle = -1, default 0


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads (default: ``$TVM_NUM_THREADS`` or every available CPU); returns it."""
    if threads is None:
        threads = int(os.environ.get(THREADS_ENV) or available_cpus())
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    os.environ[THREADS_ENV] = str(threads)  # read when TVM's pool starts
    tvm.get_global_func("runtime.config_threadpool")(_AFFINITY_DEFAULT, threads)  # if it already has
    return threads
