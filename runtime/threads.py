"""CPU thread count for TVM's thread pool.

TVM assumes x86 CPUs have hyper-threading and uses half the logical CPUs by default, which halves
throughput on machines (and containers) without it. The runtime sets the count explicitly instead.
"""

from __future__ import annotations

import os

import tvm

from ..errors import UserError

THREADS_ENV = "TVM_NUM_THREADS"
_AFFINITY_DEFAULT = 0  # TVM's ThreadGroup::AffinityMode kBig = 1, kLittle = -1, default 0


class ThreadsError(UserError, ValueError):
    """A thread count that cannot be used; the message is one line."""


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads (default: ``$TVM_NUM_THREADS`` or every available CPU); returns it."""
    if threads is None:
        env = os.environ.get(THREADS_ENV)
        try:
            threads = int(env) if env else available_cpus()
        except ValueError:
            raise ThreadsError(f"${THREADS_ENV} must be a whole number of threads, got {env!r}") from None
    if threads < 1:
        raise ThreadsError(f"threads must be at least 1, got {threads}")
    os.environ[THREADS_ENV] = str(threads)  # read when TVM's pool starts
    tvm.get_global_func("runtime.config_threadpool")(_AFFINITY_DEFAULT, threads)  # if it already has
    return threads
