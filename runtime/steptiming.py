"""Timing single model steps: a plain decode step, a draft step through a compressed view, a verification.

The steps run on a pool whose KV is zeros: these kernels do the same work whatever the values, and it lets a
batch of 16 x 8k be timed without prefilling 128k tokens. The MagicDec benchmark, the kernel profile and the
cost model's calibration all time steps this way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from .runner import ModelRunner
from .views import CompressedView, DraftSettings, pack_views, smooth, snapkv_view

# SnapKV keeps runs of neighbouring positions (high scores cluster, and the selection smooths them): runs of
# 6-15 positions on average on Austen prompts at budgets 128-2048. Heavy-tailed (Pareto) scores smoothed over
# this many positions give runs of 9-11 through the same selection, so a synthetic draft step reads the KV
# about as locally as a real one (uniformly scattered positions made it up to 25% slower).
SYNTHETIC_SCORE_SPAN = 9


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_view(settings: DraftSettings, context: int, layers: int, heads: int, rng) -> CompressedView:
    """A view with the settings' shape: sinks for StreamingLLM; for SnapKV, the real selection of random
    scores with the texture of attention (see ``SYNTHETIC_SCORE_SPAN``)."""
    if settings.kind == "streamingllm":
        static = np.broadcast_to(
            np.arange(settings.sink, dtype=np.int32), (layers, heads, settings.sink)
        ).copy()
        return CompressedView(static, settings.budget - settings.sink, settings.sink)
    scores = smooth(rng.pareto(1.0, size=(layers, heads, context)), SYNTHETIC_SCORE_SPAN)
    return snapkv_view(settings, context, scores, layers, heads)


def synthetic_draft_args(
    runner: ModelRunner, settings: DraftSettings, context: int, batch: int, rng
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The draft function's view arguments (positions, lengths, window starts) for ``batch`` synthetic
    views of ``settings`` at ``context``."""
    model = runner.cfg
    views = [
        synthetic_view(settings, context, model.num_layers, model.num_kv_heads, rng) for _ in range(batch)
    ]
    static_pos, static_len = pack_views(views)
    return static_pos, static_len, np.array([v.window_start(context) for v in views], np.int32)


def step_costs(
    runner: ModelRunner,
    batch: int,
    context: int,
    gammas: Sequence[int],
    drafts: Sequence[str],
    budgets: Sequence[int],
    repeats: int,
) -> dict:
    """``T_AR``, ``T_D`` per (draft, budget) and ``T_V`` per gamma at one (batch, context), in seconds,
    each the median of ``repeats`` calls.

    The runner's pool is overwritten with zeros (``ModelRunner.synthetic_batch``).
    """
    model = runner.cfg
    gmax = max(gammas)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, size=batch * (gmax + 1))
    rows = np.arange(batch)
    positions = np.full(batch, context)
    with runner.synthetic_batch(batch, context, slack=gmax + 1) as ids:
        out = {
            "T_AR": median_time(
                lambda: runner.greedy_step("decode", tokens[:batch], rows, positions, ids), repeats
            ),
            "T_D": {},
            "T_V": {},
        }
        for kind in drafts:
            for budget in budgets:
                views = synthetic_draft_args(runner, DraftSettings(kind, budget), context, batch, rng)
                out["T_D"][f"{kind}/{budget}"] = median_time(
                    lambda: runner.greedy_step("draft", tokens[:batch], rows, positions, ids, *views), repeats
                )
        for g in gammas:
            seq_rows = np.repeat(rows, g + 1)
            pos = (context + np.tile(np.arange(g + 1), batch)).astype(np.int64)
            out["T_V"][g] = median_time(
                lambda: runner.greedy_step("verify", tokens[: batch * (g + 1)], seq_rows, pos, ids), repeats
            )
        return out
