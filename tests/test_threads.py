"""Thread count: ``--threads`` and ``$TVM_NUM_THREADS`` reach TVM's pool; bad values are one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlc_magicdec.cli import main
from mlc_magicdec.runtime.threads import THREADS_ENV, ThreadsError, configure_threads

PROBE = """
import tvm
from mlc_magicdec.runtime.threads import configure_threads
configure_threads({arg})
print(tvm.get_global_func("runtime.NumThreads")())
"""


def _pool_size(arg: str, env: str | None) -> int:
    """TVM's worker count in a new process after ``configure_threads(arg)`` with ``$TVM_NUM_THREADS=env``."""
    environ = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    if env is not None:
        environ[THREADS_ENV] = env
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(arg=arg)], env=environ, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_threads_argument_and_environment_reach_the_pool():
    assert _pool_size("None", "1") == 1  # the environment is the default
    assert _pool_size("2", "1") == 2  # an explicit count wins over the environment
    assert _pool_size("1", None) == 1
    assert _pool_size("None", None) == len(os.sched_getaffinity(0))  # all available CPUs


def test_bad_thread_counts_are_user_errors(monkeypatch):
    with pytest.raises(ThreadsError, match="at least 1"):
        configure_threads(0)
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ThreadsError, match="whole number"):
        configure_threads()


def test_cli_reports_bad_threads_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["bench", "roofline", str(tmp_path), "--threads", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: threads must be at least 1, got 0"]
