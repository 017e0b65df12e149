"""``gamma="auto"``/``budget="auto"`` against every fixed (gamma, budget), end to end.

For each (batch, context) the prompts are prefilled once. Then plain decoding, speculative decoding at
every fixed (gamma, budget) of the grid and the automatic mode decode the same batch (greedy, the same
number of new tokens), each ``repeats`` times, interleaved so that a change of load hits all settings alike.
A cell reports decode tokens/s (median of the repeats), the best fixed setting found by exhaustive search,
and the ratios auto/best-fixed and auto/plain. Every speculative output is checked against plain decoding.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence

from rich.table import Table

from ..constants import DEFAULT_DRAFT
from ..runtime.autospec import AUTO
from ..runtime.engine import Engine
from .magicdec import prompts_for
from .report import decode_rate

PLAIN = "plain"


@dataclasses.dataclass
class AutoBenchConfig:
    batches: Sequence[int]
    contexts: Sequence[int]
    gammas: Sequence[int]
    budgets: Sequence[int]
    draft: str = DEFAULT_DRAFT
    new_tokens: int = 64
    repeats: int = 3


def _settings(cfg: AutoBenchConfig) -> dict[str, dict]:
    """Every setting of a cell, by name: decode() arguments."""
    out: dict[str, dict] = {PLAIN: {}}
    for g in cfg.gammas:
        for k in cfg.budgets:
            out[f"g{g}/k{k}"] = {"speculate": True, "draft": cfg.draft, "gamma": g, "budget": k}
    out[AUTO] = {"speculate": True, "draft": cfg.draft, "gamma": AUTO, "budget": AUTO}
    return out


def run_cell(engine: Engine, prompts: list[list[int]], cfg: AutoBenchConfig) -> dict:
    """Tokens/s of every setting on one prefilled batch, and what the automatic mode chose."""
    settings = _settings(cfg)
    times: dict[str, list[float]] = {name: [] for name in settings}
    choices: dict[str, int] = {}
    with engine.prefill(prompts, max_new_tokens=cfg.new_tokens) as batch:
        reference = None
        for _ in range(cfg.repeats):
            for name, args in settings.items():
                results = engine.decode(batch, stop_at_eos=False, **args)
                tokens = [r.token_ids for r in results]
                if reference is None:
                    reference = tokens
                elif tokens != reference:
                    raise AssertionError(f"{name} changed the greedy output")
                stats = results[0].stats
                times[name].append(decode_rate(results))
                if name == AUTO:
                    for _, g, k in stats.auto_choices:
                        key = PLAIN if g == 0 else f"g{g}/k{k}"
                        choices[key] = choices.get(key, 0) + 1
    tok_s = {name: statistics.median(v) for name, v in times.items()}
    fixed = {n: v for n, v in tok_s.items() if n not in (PLAIN, AUTO)}
    best = max(fixed, key=fixed.get)
    return {
        "tok_s": tok_s,
        "best_fixed": best,
        "auto_vs_best": tok_s[AUTO] / fixed[best],
        "auto_vs_plain": tok_s[AUTO] / tok_s[PLAIN],
        "best_vs_plain": fixed[best] / tok_s[PLAIN],
        "auto_choices": choices,
    }


def run(
    engine: Engine, texts: list[str], cfg: AutoBenchConfig, progress: Callable[[str], None] = print
) -> dict:
    """The whole grid; a JSON-ready dict."""
    cells = []
    for context in cfg.contexts:
        for batch in cfg.batches:
            progress(f"auto vs fixed at batch {batch}, context {context}")
            prompts = prompts_for(engine, texts, context - cfg.new_tokens, batch)
            cells.append({"batch": batch, "context": context, **run_cell(engine, prompts, cfg)})
    return {"config": dataclasses.asdict(cfg), "cells": cells}


def table(results: dict) -> Table:
    """One row per cell: plain, best fixed, auto (tokens/s), the ratios and auto's most used setting."""
    t = Table(title="gamma/budget = auto against the best fixed setting (decode tokens/s, medians)")
    for col in (
        "batch",
        "context",
        "plain",
        "best fixed",
        "setting",
        "auto",
        "auto/best",
        "auto/plain",
        "auto chose",
    ):
        t.add_column(col, justify="right")
    for c in results["cells"]:
        s = c["tok_s"]
        total = sum(c["auto_choices"].values())
        chose = ", ".join(
            f"{k} {n / total:.0%}" for k, n in sorted(c["auto_choices"].items(), key=lambda kv: -kv[1])[:2]
        )
        t.add_row(
            str(c["batch"]),
            str(c["context"]),
            f"{s[PLAIN]:.1f}",
            f"{s[c['best_fixed']]:.1f}",
            c["best_fixed"],
            f"{s[AUTO]:.1f}",
            f"{c['auto_vs_best']:.2f}",
            f"{c['auto_vs_plain']:.2f}",
            chose,
        )
    return t
