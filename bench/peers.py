"""Plain decoding, ours against Hugging Face ``transformers`` (torch, CPU, fp32): same prompts, same threads.

For each (batch, context): prefill tokens/s and decode tokens/s (``new_tokens`` greedy steps), medians over
``repeats``, in one run; each system finishes its measurements before the other starts, since idle thread
pools spin for a while after a run.
``transformers`` is a benchmark-only dependency (the ``test`` extra).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

from ..runtime.engine import Engine


def ours(
    engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int
) -> tuple[float, list[float]]:
    """Our plain decoding: prefill seconds, and seconds per decode step for each of ``repeats`` decodes."""
    with engine.prefill(prompts, max_new_tokens=new_tokens) as batch:
        steps = []
        for _ in range(repeats):
            s = engine.decode(batch, stop_at_eos=False)[0].stats
            steps.append(s.decode_seconds / s.decode_steps)
    return batch.prefill_seconds, steps


class TransformersPeer:
    """The same model in ``transformers`` (loaded from the artifact's source GGUF or HF folder)."""

    def __init__(self, source: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        path = Path(source)
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model, self.torch = model.eval(), torch

    def run(self, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, list[float]]:
        """Prefill seconds, and seconds per greedy decode step for each of ``repeats`` decodes of the same
        prefill (the cache is copied before each); ragged prompts are left-padded."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask0 = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        steps = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(ids, attention_mask=mask0, use_cache=True)
            prefill = time.perf_counter() - t0
            for _ in range(repeats):
                cache, nxt, mask = copy.deepcopy(out.past_key_values), out.logits[:, -1:].argmax(-1), mask0
                t1 = time.perf_counter()
                for _ in range(new_tokens - 1):
                    mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                    step = self.model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                    cache, nxt = step.past_key_values, step.logits[:, -1:].argmax(-1)
                steps.append((time.perf_counter() - t1) / max(new_tokens - 1, 1))
        return prefill, steps


def compare(
    engine: Engine,
    prompts_by_cell: dict[tuple[int, int], list[list[int]]],
    new_tokens: int,
    repeats: int,
    progress=print,
) -> list[dict]:
    """Median prefill and decode throughput of ours and ``transformers`` for each (batch, context) cell.

    Prefill tokens/s is the median of ``repeats`` prefills of the cell's first prompt (batch 1); decode
    tokens/s is the median of ``repeats`` decodes of the whole batch after one prefill.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin against ours
    peer = TransformersPeer(engine.artifact.config["source"], engine.threads)
    systems = {
        "ours": lambda p, n: ours(engine, p, new_tokens, n),
        "transformers": lambda p, n: peer.run(p, new_tokens, n),
    }
    rows = []
    for (batch, context), prompts in prompts_by_cell.items():
        for name, run in systems.items():  # one system at a time: thread pools idle-spin after a run
            progress(f"batch {batch}, context {context}: {name}")
            prefills = [run(prompts[:1], 1)[0] for _ in range(repeats)]
            _, steps = run(prompts, repeats)
            step = statistics.median(steps)
            rows.append(
                {
                    "system": name,
                    "batch": batch,
                    "context": context,
                    "prefill_tok_s": context / statistics.median(prefills),
                    "decode_tok_s": batch / step,
                    "decode_ms_per_step": step * 1e3,
                    "prefill_seconds": prefills,
                    "step_seconds": steps,
                }
            )
    return rows


def ratios(rows: list[dict]) -> dict[tuple[int, int], float]:
    """Our decode tokens/s divided by ``transformers``', per cell."""
    by = {(r["system"], r["batch"], r["context"]): r for r in rows}
    return {
        (b, c): by["ours", b, c]["decode_tok_s"] / by["transformers", b, c]["decode_tok_s"]
        for (s, b, c) in by
        if s == "ours"
    }
