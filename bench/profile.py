"""Where a step's time goes, kernel by kernel: the VM's ``set_instrument`` times every call it makes.

Each profiled step (plain decode, verification of ``gamma + 1`` tokens a sequence, a draft step through the
compressed view) runs on a pool of the given batch and context, as in ``runtime.steptiming.step_costs``. The
instrument takes the wall time between the VM's before- and after-call hooks; kernels on CPU run
synchronously, so that is the kernel's time. Times are summed per kernel over one step and the median over
``repeats`` steps is reported.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict

import numpy as np
import tvm

from ..runtime.engine import Engine
from ..runtime.steptiming import synthetic_draft_args
from ..runtime.views import DraftSettings

NO_OP = 0  # VMInstrumentReturnKind: run the call as usual
STEPS = ("decode", "verify", "draft")


@dataclasses.dataclass
class KernelTime:
    name: str
    calls: int
    seconds: float  # median over repeats of the summed time of this kernel in one step


class _Recorder:
    """A VM instrument that sums wall time per called symbol."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._started: list[float] = []

    def __call__(self, _func, symbol: str, before_run: bool, _ret, *_args) -> int:
        if before_run:
            self._started.append(time.perf_counter())
        else:
            self.totals[symbol] += time.perf_counter() - self._started.pop()
            self.calls[symbol] += 1
        return NO_OP


def profile_step(engine: Engine, step: str, batch: int, context: int, gamma: int, budget: int, repeats: int):
    """Per-kernel times of one ``step`` (decode, verify or draft) at (batch, context); slowest first.

    Returns ``(kernels, step_seconds)`` where ``step_seconds`` is the median wall time of the profiled step.
    """
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose from {', '.join(STEPS)}")
    runner, model = engine.target, engine.config
    rows_per_seq = gamma + 1 if step == "verify" else 1
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, size=batch * rows_per_seq)
    seq_rows = np.repeat(np.arange(batch), rows_per_seq)
    positions = (context + np.tile(np.arange(rows_per_seq), batch)).astype(np.int64)
    extra = ()
    if step == "draft":
        extra = synthetic_draft_args(runner, DraftSettings("snapkv", budget), context, batch, rng)
    vm = engine.artifact.vm
    per_repeat: list[_Recorder] = []
    walls = []
    with runner.synthetic_batch(batch, context, slack=gamma + 1) as ids:
        runner.forward(step, tokens, seq_rows, positions, ids, *extra)  # warm-up
        for _ in range(repeats):
            rec = _Recorder()
            vm.set_instrument(tvm.runtime.convert(rec))
            t0 = time.perf_counter()
            runner.forward(step, tokens, seq_rows, positions, ids, *extra)
            walls.append(time.perf_counter() - t0)
            vm.set_instrument(tvm.runtime.convert(lambda *_a: NO_OP))
            per_repeat.append(rec)
    names = set().union(*(r.totals for r in per_repeat))
    kernels = [
        KernelTime(
            name,
            per_repeat[0].calls.get(name, 0),
            statistics.median(r.totals.get(name, 0.0) for r in per_repeat),
        )
        for name in names
    ]
    kernels.sort(key=lambda k: -k.seconds)
    return kernels, statistics.median(walls)


def is_kernel(name: str) -> bool:
    """Whether a VM call is a compiled kernel (not the VM's own builtins or the top-level function)."""
    return not name.startswith("vm.builtin.") and name not in ("embed", *STEPS)


def step_label(step: str, gamma: int, budget: int) -> str:
    """A profiled step's name in a table title: the gamma a verification checks, the budget a draft reads."""
    return {"decode": "decode", "verify": f"verify (gamma {gamma})", "draft": f"draft ({budget})"}[step]
