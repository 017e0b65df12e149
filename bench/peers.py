"""Plain decoding, ours against Hugging Face ``transformers`` (torch, CPU, fp32): same prompts, same threads.

For each (batch, context): prefill tokens/s (the batch's prompts, once per repeat) and decode tokens/s
(``new_tokens`` greedy steps after the prefill), medians over ``repeats``, in one run: each system does a
warm-up and its repeats before the other starts, since idle thread pools spin for a while after a run.
``transformers`` is a benchmark-only dependency (the ``test`` extra).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from ..runtime.engine import Engine


def ours(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds per step) for one run of our plain decoding."""
    with engine.prefill(prompts, max_new_tokens=new_tokens) as batch:
        res = engine.decode(batch, stop_at_eos=False)
    s = res[0].stats
    return s.prefill_seconds, s.decode_seconds / s.decode_steps


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

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds per step); prompts are left-padded to one length if ragged."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(ids, attention_mask=mask, use_cache=True)
            t1 = time.perf_counter()
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens - 1):
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = self.model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / max(new_tokens - 1, 1)


def compare(
    engine: Engine,
    prompts_by_cell: dict[tuple[int, int], list[list[int]]],
    new_tokens: int,
    repeats: int,
    progress=print,
) -> list[dict]:
    """Median prefill and decode throughput of ours and ``transformers`` for each (batch, context) cell."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin against ours
    peer = TransformersPeer(engine.artifact.config["source"], engine.threads)
    systems = {
        "ours": lambda p: ours(engine, p, new_tokens),
        "transformers": lambda p: peer.run(p, new_tokens),
    }
    rows = []
    for (batch, context), prompts in prompts_by_cell.items():
        runs: dict[str, list[tuple[float, float]]] = {}
        for name, run in systems.items():  # one system at a time: thread pools idle-spin after a run
            progress(f"batch {batch}, context {context}: {name}, warm-up + {repeats} repeats")
            run(prompts[:1])
            runs[name] = [run(prompts) for _ in range(repeats)]
        for name, values in runs.items():
            prefill = statistics.median(v[0] for v in values)
            step = statistics.median(v[1] for v in values)
            rows.append(
                {
                    "system": name,
                    "batch": batch,
                    "context": context,
                    "prefill_tok_s": batch * context / prefill,
                    "decode_tok_s": batch / step,
                    "decode_ms_per_step": step * 1e3,
                    "runs": values,
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
