"""The MagicDec benchmark: the paper's quantities over a grid of batch sizes and context lengths.

Two kinds of measurement, both in one run:

- **Step costs** at every (batch, context): ``T_AR`` (one plain decode step), ``T_D`` (one draft step
  through the compressed view) and ``T_V(gamma)`` (one verification of ``gamma + 1`` tokens a sequence),
  each the median of ``repeats`` timed calls, measured side by side on the same pool. The KV content is
  zeros: these kernels do the
  same work whatever the values, and it lets a batch of 16 x 8k run without prefilling 128k tokens.
- **Acceptance** at every context: real speculative decoding of Austen prompts (greedy), giving the mean
  accepted length per round (bonus token included) and the acceptance rate for each draft, budget and gamma.
  Each sequence accepts independently of its batch, so this does not depend on the batch size.

Then, as in the paper, ``T_SD = (gamma * T_D + T_V(gamma)) / accepted_length`` and
``speedup = T_AR / T_SD``, at
the best gamma for each cell. An end-to-end check runs plain and speculative ``decode`` on the same prefilled
prompts and reports the measured speedup next to the predicted one.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..compile.attention import PAGE_SIZE
from ..runtime.engine import Engine, ModelRunner
from ..runtime.views import CompressedView, DraftSettings, pack_views

SYNTHETIC_SEQ_BASE = 1 << 30  # sequence ids for synthetic timing sequences (never clash with real ones)
ACCEPTANCE_PROMPTS = 2  # prompts per context for the acceptance runs


@dataclasses.dataclass
class BenchConfig:
    batches: Sequence[int]
    contexts: Sequence[int]
    gammas: Sequence[int]
    drafts: Sequence[str]
    budgets: Sequence[int]
    new_tokens: int = 128
    repeats: int = 3


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
    """A view with the settings' shape: sinks for StreamingLLM, scattered positions for SnapKV."""
    if settings.kind == "streamingllm":
        static = np.broadcast_to(
            np.arange(settings.sink, dtype=np.int32), (layers, heads, settings.sink)
        ).copy()
        return CompressedView(static, settings.budget - settings.sink, settings.sink)
    candidates = context - settings.window
    keep = min(settings.budget - settings.window, candidates)
    static = np.sort(
        np.stack(
            [
                np.stack([rng.choice(candidates, keep, replace=False) for _ in range(heads)])
                for _ in range(layers)
            ]
        ),
        axis=-1,
    ).astype(np.int32)
    return CompressedView(static, settings.window, candidates)


def step_costs(runner: ModelRunner, batch: int, context: int, cfg: BenchConfig) -> dict:
    """``T_AR``, ``T_D`` per (draft, budget) and ``T_V`` per gamma at one (batch, context), in seconds.

    The runner's pool is overwritten with zeros: give it one that holds no sequence (the engine's own
    target before any prefill, or a fresh ``ModelRunner``).
    """
    model = runner.cfg
    gmax = max(cfg.gammas)
    ids = [SYNTHETIC_SEQ_BASE + i for i in range(batch)]
    pages = runner.ensure_pool(batch * -(-(context + gmax + 1) // PAGE_SIZE))
    runner.pool_tensor.copyfrom(np.zeros(runner.pool_tensor.shape, dtype=runner.artifact.dtype))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, size=batch * (gmax + 1))
    for s in ids:
        pages.add(s)
        pages.reserve(s, context + gmax + 1)
        pages.set_length(s, context)
    try:
        rows = np.arange(batch)
        positions = np.full(batch, context)
        out = {
            "T_AR": median_time(
                lambda: runner.forward("decode", tokens[:batch], rows, positions, ids), cfg.repeats
            ),
            "T_D": {},
            "T_V": {},
        }
        for kind in cfg.drafts:
            for budget in cfg.budgets:
                settings = DraftSettings(kind, budget)
                views = [
                    synthetic_view(settings, context, model.num_layers, model.num_kv_heads, rng) for _ in ids
                ]
                static_pos, static_len = pack_views(views)
                window_start = np.array([v.window_start(context) for v in views], np.int32)
                out["T_D"][f"{kind}/{budget}"] = median_time(
                    lambda: runner.forward(
                        "draft", tokens[:batch], rows, positions, ids, static_pos, static_len, window_start
                    ),
                    cfg.repeats,
                )
        for g in cfg.gammas:
            seq_rows = np.repeat(rows, g + 1)
            pos = (context + np.tile(np.arange(g + 1), batch)).astype(np.int64)
            out["T_V"][g] = median_time(
                lambda: runner.forward("verify", tokens[: batch * (g + 1)], seq_rows, pos, ids), cfg.repeats
            )
        return out
    finally:
        for s in ids:
            pages.remove(s)


def acceptance(engine: Engine, prompts: list[list[int]], cfg: BenchConfig) -> dict:
    """Mean accepted length and acceptance rate per (draft, budget, gamma), plus an end-to-end check."""
    out: dict = {"accepted_length": {}, "acceptance_rate": {}, "e2e": {}}
    with engine.prefill(prompts, max_new_tokens=cfg.new_tokens) as batch:
        plain = engine.decode(batch, stop_at_eos=False)
        plain_s = plain[0].stats.decode_seconds
        for kind in cfg.drafts:
            for budget in cfg.budgets:
                for g in cfg.gammas:
                    res = engine.decode(
                        batch, stop_at_eos=False, speculate=True, draft=kind, budget=budget, gamma=g
                    )
                    if any(a.token_ids != b.token_ids for a, b in zip(plain, res)):
                        raise AssertionError("speculative output differs from plain greedy decoding")
                    key = f"{kind}/{budget}/{g}"
                    lengths = [n for r in res for n in r.accepted_lengths]
                    out["accepted_length"][key] = float(np.mean(lengths))
                    out["acceptance_rate"][key] = res[0].stats.acceptance_rate
                    out["e2e"][key] = plain_s / res[0].stats.decode_seconds
    return out


def prompts_for(engine: Engine, texts: list[str], context: int, count: int) -> list[list[int]]:
    """``count`` prompts of exactly ``context`` tokens from different places in the texts."""
    ids = [engine.encode(t) for t in texts]
    out = []
    for i in range(count):
        source = ids[i % len(ids)]
        start = (len(source) // (count + 1)) * (i // len(ids) + 1) % max(len(source) - context, 1)
        chunk = source[start : start + context]
        if len(chunk) < context:
            raise ValueError(f"the prompt texts are too short for a {context}-token context")
        out.append(chunk)
    return out


def run(engine: Engine, texts: list[str], cfg: BenchConfig, progress: Callable[[str], None] = print) -> dict:
    """The whole grid; returns a JSON-ready dict with the raw measurements and the MagicDec table."""
    results: dict = {"config": dataclasses.asdict(cfg), "cells": [], "acceptance": {}}
    for context in cfg.contexts:
        progress(f"acceptance at context {context}")
        results["acceptance"][context] = acceptance(
            engine, prompts_for(engine, texts, context - cfg.new_tokens, ACCEPTANCE_PROMPTS), cfg
        )
        for batch in cfg.batches:
            progress(f"step costs at batch {batch}, context {context}")
            costs = step_costs(engine.target, batch, context, cfg)
            results["cells"].append(
                {
                    "batch": batch,
                    "context": context,
                    **costs,
                    **best_setting(costs, results["acceptance"][context], cfg),
                }
            )
    return results


def best_setting(costs: dict, acc: dict, cfg: BenchConfig) -> dict:
    """The (draft, budget, gamma) with the lowest ``T_SD`` and the paper's quantities for it."""
    best = None
    for kind in cfg.drafts:
        for budget in cfg.budgets:
            t_d = costs["T_D"][f"{kind}/{budget}"]
            for g in cfg.gammas:
                length = acc["accepted_length"][f"{kind}/{budget}/{g}"]
                t_sd = (g * t_d + costs["T_V"][g]) / length
                if best is None or t_sd < best["T_SD"]:
                    best = {
                        "draft": kind,
                        "budget": budget,
                        "gamma": g,
                        "T_D_best": t_d,
                        "T_V_best": costs["T_V"][g],
                        "accepted_length": length,
                        "T_SD": t_sd,
                        "speedup": costs["T_AR"] / t_sd,
                        "e2e_speedup_batch2": acc["e2e"][f"{kind}/{budget}/{g}"],
                    }
    return best
