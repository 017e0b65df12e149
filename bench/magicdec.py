"""The MagicDec benchmark: the paper's quantities over a grid of batch sizes and context lengths.

Two kinds of measurement, both in one run:

- **Step costs** at every (batch, context): ``T_AR`` (one plain decode step), ``T_D`` (one draft step
  through the compressed view) and ``T_V(gamma)`` (one verification of ``gamma + 1`` tokens a sequence),
  each the median of ``repeats`` timed calls, measured side by side on the same zero-filled pool
  (``runtime/steptiming.py``).
- **Acceptance** at every context: real speculative decoding of Austen prompts (greedy), giving the mean
  accepted length per round (bonus token included) and the acceptance rate for each draft, budget and gamma.
  Each sequence accepts independently of its batch, so this does not depend on the batch size.

Then, as in the paper, ``T_SD = (gamma * T_D + T_V(gamma)) / accepted_length`` and
``speedup = T_AR / T_SD``, at the best gamma for each cell. An end-to-end check runs plain and speculative
``decode`` on the same prefilled prompts and reports the measured speedup next to the predicted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from ..runtime.engine import Engine
from ..runtime.steptiming import step_costs

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
            costs = step_costs(
                engine.target, batch, context, cfg.gammas, cfg.drafts, cfg.budgets, cfg.repeats
            )
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
