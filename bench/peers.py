"""Decoding throughput side by side: ours (plain and MagicDec) against what a CPU user would otherwise run.

Systems, each with the same prompts, greedy, the same thread count, measured one after the other in one run
(idle thread pools spin for a while after a run, so no two run at once):

- **ours, plain**: ``decode`` over the prefilled batch;
- **ours, MagicDec**: self-speculative decoding (``draft``/``budget``/``gamma``) on the same prefill;
- **transformers** on torch CPU, fp32 (the ``test`` extra);
- **llama.cpp** through ``llama-cpp-python`` (the ``peers`` extra, skipped when missing), as shipped: the
  artifact's GGUF with its own weights (e.g. Q4_1) and llama.cpp's default F16 KV cache, plain and, at
  batch 1, with prompt-lookup speculative decoding, each with flash attention off and on
  (``llama_variants`` adds converted copies, e.g. ``("f32", "f32")``).

A cell is a (batch, context): the prompts are ``context - new_tokens`` tokens, so the last of ``new_tokens``
decoded tokens sits at ``context``. Each system prefills once (timed, reported as prefill tokens/s of one
sequence) and then decodes ``new_tokens`` ``repeats`` times from that prefill (``slow_repeats`` times for the
slowest peers, if set); decode tokens/s is the median and each row records its repeats.
Peers other than ours prefill the first prompt and copy its KV to every sequence of the batch (a step costs
the same whatever the KV values), which keeps a batch-8 x 8k prefill from dominating the run.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..runtime.engine import Engine
from . import gguf_convert, llamacpp, roofline

OURS_PLAIN = "ours, plain"
OURS_MAGICDEC = "ours, MagicDec"
TRANSFORMERS = "transformers (torch fp32)"
SHIPPED = "shipped"  # a llama.cpp variant's weights: the GGUF's own type
LLAMA_DEFAULT_KV = "f16"  # llama.cpp's default KV cache type
# issue #16's targets, each against llama.cpp as shipped (plain: its best flash-attention mode; MagicDec:
# its best mode, prompt lookup included) or transformers; (batch, least context) -> the least ratio
PLAIN_VS_LLAMA = {(1, 0): 1.0, (8, 4096): 2.0}
MAGICDEC_VS_LLAMA = {(1, 8192): 1.3, (8, 8192): 2.5}
PREFILL_VS_LLAMA = 1.5  # prefill tokens/s at batch 1
PREFILL_VS_TRANSFORMERS = 1.0
BANDWIDTH_TARGETS = {(1, 1024): 0.70}  # (batch, context): share of the read-bandwidth roofline, plain


def _target(table: dict[tuple[int, int], float], batch: int, context: int) -> float | None:
    """The entry of ``table`` for ``batch`` with the largest least context that ``context`` reaches."""
    keys = [k for k in table if batch == k[0] and context >= k[1]]
    return table[max(keys)] if keys else None


@dataclasses.dataclass
class PeerSettings:
    new_tokens: int
    repeats: int
    draft: str
    budget: int | str  # tokens, or "auto": the cost model picks, per round
    gamma: int | str
    # llama.cpp runs (weights, KV cache); the first is the one prompt lookup also runs
    llama_variants: tuple[tuple[str, str], ...] = ((SHIPPED, LLAMA_DEFAULT_KV),)
    flash_attn: tuple[bool, ...] = (False, True)
    slow_repeats: int | None = None  # repeats for transformers and llama.cpp with flash attention on (the
    # slowest peers on CPU); None: ``repeats``

    def __post_init__(self) -> None:
        if self.new_tokens < 2:
            raise UserError("--new-tokens must be at least 2 for a decode timing")
        if min(self.repeats, self.slow_repeats or 1) < 1:
            raise UserError("--repeats and --peer-repeats must be at least 1")

    def repeats_for(self, system: str) -> int:
        slow = system == TRANSFORMERS or "flash attn on" in system
        return self.slow_repeats if slow and self.slow_repeats is not None else self.repeats


@dataclasses.dataclass
class Measurement:
    """One system in one cell: prefill seconds (one sequence) and decode seconds of each repeat."""

    system: str
    prefill_seconds: float
    prefill_tokens: int
    decode_seconds: list[float]
    decoded_tokens: int  # tokens generated in one repeat, all sequences together

    def row(self, batch: int, context: int) -> dict:
        decode = statistics.median(self.decode_seconds)
        return {
            "system": self.system,
            "batch": batch,
            "context": context,
            "prefill_tok_s": self.prefill_tokens / self.prefill_seconds,
            "decode_tok_s": self.decoded_tokens / decode,
            "decode_seconds": self.decode_seconds,
            "prefill_seconds": self.prefill_seconds,
            "repeats": len(self.decode_seconds),
        }


def _ours(engine: Engine, prompts: list[list[int]], s: PeerSettings) -> list[Measurement]:
    """Our plain and MagicDec decoding on one prefill of the whole batch."""
    reserve = {} if isinstance(s.gamma, str) else {"max_gamma": s.gamma}
    with engine.prefill(prompts, max_new_tokens=s.new_tokens, **reserve) as batch:
        plain, spec = [], []
        for _ in range(s.repeats):
            res = engine.decode(batch, stop_at_eos=False)
            plain.append(res[0].stats.decode_seconds)
            steps = res[0].stats.decode_steps
        for _ in range(s.repeats):
            res = engine.decode(
                batch, stop_at_eos=False, speculate=True, draft=s.draft, budget=s.budget, gamma=s.gamma
            )
            spec.append(res[0].stats.decode_seconds)
            spec_tokens = sum(len(r.token_ids) - 1 for r in res)  # the first comes from the prefill
        prefill = batch.prefill_seconds / len(prompts)
    n = len(prompts[0])
    return [
        Measurement(OURS_PLAIN, prefill, n, plain, steps * len(prompts)),
        Measurement(
            f"{OURS_MAGICDEC} ({s.draft}/{s.budget}, gamma {s.gamma})", prefill, n, spec, spec_tokens
        ),
    ]


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

    def measure(self, prompt: list[int], batch: int, s: PeerSettings) -> Measurement:
        """Prefill ``prompt`` once, repeat its cache over the batch, and time ``repeats`` greedy decodes."""
        torch = self.torch
        ids = torch.tensor([prompt])
        times = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - t0
            first = out.logits[:, -1:].argmax(-1).repeat(batch, 1)
            for _ in range(s.repeats_for(TRANSFORMERS)):
                cache = copy.deepcopy(out.past_key_values)
                cache.batch_repeat_interleave(batch)
                nxt = first
                t1 = time.perf_counter()
                for _ in range(s.new_tokens - 1):
                    step = self.model(nxt, past_key_values=cache, use_cache=True)
                    cache, nxt = step.past_key_values, step.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t1)
        return Measurement(TRANSFORMERS, prefill, len(prompt), times, batch * (s.new_tokens - 1))


def llama_gguf(source: Path, dtype: str) -> Path:
    """The GGUF llama.cpp runs for ``dtype``: the shipped file for its own type, else a converted copy."""
    shipped = source.stem.split(".")[-1].lower()
    return source if dtype in (SHIPPED, shipped) else gguf_convert.convert(source, dtype)


def _llama_label(gguf: Path, kv_dtype: str) -> str:
    """E.g. "F32 KV F16": the GGUF's weight type (its name's last part) and the KV cache's."""
    return f"{gguf.stem.split('.')[-1].upper()} KV {kv_dtype.upper()}"


def _llama_plain(gguf: Path, kv: str, prompt, batch: int, s: PeerSettings, threads: int, fa: bool):
    name = f"llama.cpp {_llama_label(gguf, kv)} (flash attn {'on' if fa else 'off'})"
    dec = llamacpp.PlainDecoder(gguf, batch, len(prompt) + s.new_tokens, threads, fa, kv)
    try:
        prefill, first = dec.prefill(prompt)
        times = [dec.decode(first, s.new_tokens - 1)[0] for _ in range(s.repeats_for(name))]
    finally:
        dec.close()
    return Measurement(name, prefill, len(prompt), times, batch * (s.new_tokens - 1))


def _llama_lookup(gguf: Path, kv: str, prompt, s: PeerSettings, threads: int, fa: bool):
    name = f"llama.cpp {_llama_label(gguf, kv)} prompt-lookup (flash attn {'on' if fa else 'off'})"
    dec = llamacpp.PromptLookupDecoder(gguf, len(prompt) + s.new_tokens + 1, threads, fa, kv)
    try:
        prefill = dec.prefill(prompt)
        times = [dec.decode(prompt, s.new_tokens)[0] for _ in range(s.repeats_for(name))]
    finally:
        dec.close()
    return Measurement(name, prefill, len(prompt), times, s.new_tokens)


def compare(
    engine: Engine,
    prompts_by_cell: dict[tuple[int, int], list[list[int]]],
    settings: PeerSettings,
    progress: Callable[[str], None] = print,
) -> tuple[list[dict], list[str]]:
    """Every system in every (batch, context) cell; returns the rows and notes (e.g. a skipped peer)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin against ours
    threads = engine.threads
    source = Path(engine.artifact.config.source)
    notes = []
    have_llama = llamacpp.available() and source.suffix == ".gguf"
    if not llamacpp.available():
        notes.append("llama.cpp skipped: llama_cpp is not installed (pip install 'mlc-magicdec[peers]')")
    elif source.suffix != ".gguf":
        notes.append(f"llama.cpp skipped: the artifact's source {source.name} is not a GGUF")
    ggufs = {d: llama_gguf(source, d) for d, _ in settings.llama_variants} if have_llama else {}
    peer = TransformersPeer(str(source), threads)
    rows = []
    for (batch, context), prompts in prompts_by_cell.items():
        measured: list[Measurement] = []
        progress(f"batch {batch}, context {context}: ours")
        measured += _ours(engine, prompts, settings)
        progress(f"batch {batch}, context {context}: transformers")
        measured.append(peer.measure(prompts[0], batch, settings))
        for dtype, kv in settings.llama_variants if have_llama else ():
            for fa in settings.flash_attn:
                progress(f"batch {batch}, context {context}: llama.cpp {dtype} KV {kv} flash attn {fa}")
                measured.append(_llama_plain(ggufs[dtype], kv, prompts[0], batch, settings, threads, fa))
        if have_llama and batch == 1:
            dtype, kv = settings.llama_variants[0]
            for fa in settings.flash_attn:
                progress(f"batch {batch}, context {context}: llama.cpp prompt lookup flash attn {fa}")
                measured.append(_llama_lookup(ggufs[dtype], kv, prompts[0], settings, threads, fa))
        rows += [m.row(batch, context) for m in measured]
    if have_llama:
        shipped = f"llama.cpp {_llama_label(ggufs[settings.llama_variants[0][0]], LLAMA_DEFAULT_KV)}"
        for r in rows:
            r["llama_as_shipped"] = r["system"].startswith(f"{shipped} ")
    return rows, notes


def bandwidth_fractions(
    engine: Engine, rows: list[dict], new_tokens: int, bandwidth: float
) -> dict[tuple[int, int], float]:
    """``{(batch, context): fraction}``: the bytes/s our plain decode read in each cell over ``bandwidth``.

    A cell of context C prefills C - new_tokens prompt tokens and decodes new_tokens more, so the KV a step
    reads grows from C - new_tokens to C: a step reads the KV of C - new_tokens / 2 tokens on average.
    """
    return {
        (r["batch"], r["context"]): roofline.bandwidth_fraction(
            engine.artifact.spec,
            r["batch"],
            r["context"] - new_tokens // 2,
            r["batch"] / r["decode_tok_s"],
            bandwidth,
        )
        for r in rows
        if r["system"] == OURS_PLAIN
    }


def add_ratios(rows: list[dict]) -> None:
    """Add ``plain_ratio`` and ``magicdec_ratio``: our tokens/s divided by each row's, per cell."""
    for r in rows:
        cell = [o for o in rows if (o["batch"], o["context"]) == (r["batch"], r["context"])]
        plain = next(o for o in cell if o["system"] == OURS_PLAIN)
        spec = next(o for o in cell if o["system"].startswith(OURS_MAGICDEC))
        r["plain_ratio"] = plain["decode_tok_s"] / r["decode_tok_s"]
        r["magicdec_ratio"] = spec["decode_tok_s"] / r["decode_tok_s"]


def best_peer(rows: list[dict], batch: int, context: int, prefix: str = "") -> dict | None:
    """The fastest non-ours row of a cell whose system starts with ``prefix``."""
    peers = [
        r
        for r in rows
        if (r["batch"], r["context"]) == (batch, context)
        and not r["system"].startswith("ours")
        and r["system"].startswith(prefix)
    ]
    return max(peers, key=lambda r: r["decode_tok_s"]) if peers else None


def _llama_as_shipped(rows: list[dict], batch: int, context: int, lookup: bool) -> dict | None:
    """The fastest llama.cpp-as-shipped row of a cell: plain only, or prompt lookup included."""
    cell = [
        r
        for r in rows
        if (r["batch"], r["context"]) == (batch, context)
        and r.get("llama_as_shipped")
        and (lookup or "prompt-lookup" not in r["system"])
    ]
    return max(cell, key=lambda r: r["decode_tok_s"]) if cell else None


def _verdict(value: float, target: float, unit: str = "x") -> str:
    got = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
    want = f"{target:.0%}" if unit == "%" else f"{target:.1f}x"
    if value >= target:
        return f"{got} (target {want}: met)"
    return f"{got} (target {want}: missed by {1 - value / target:.0%})"


def target_lines(rows: list[dict], fractions: dict) -> list[str]:
    """The issue's targets, each with its measured value, for the cells that were run."""
    lines = []
    for batch, context in sorted({(r["batch"], r["context"]) for r in rows}):
        cell = f"batch {batch} x {context}"
        plain = next(
            r for r in rows if (r["batch"], r["context"], r["system"]) == (batch, context, OURS_PLAIN)
        )
        want = BANDWIDTH_TARGETS.get((batch, context))
        if (frac := fractions.get((batch, context))) is not None:
            verdict = _verdict(frac, want, "%") if want else f"{frac:.0%}"
            lines.append(f"read bandwidth used, plain, {cell}: {verdict}")
        if hf := best_peer(rows, batch, context, "transformers"):
            lines.append(f"plain vs transformers, {cell}: {_verdict(hf['plain_ratio'], 1.0)}")
            if batch == 1:
                ratio = plain["prefill_tok_s"] / hf["prefill_tok_s"]
                lines.append(f"prefill vs transformers, {cell}: {_verdict(ratio, PREFILL_VS_TRANSFORMERS)}")
        if (lc := _llama_as_shipped(rows, batch, context, lookup=False)) and (
            want := _target(PLAIN_VS_LLAMA, batch, context)
        ):
            lines.append(f"plain vs {lc['system']}, {cell}: {_verdict(lc['plain_ratio'], want)}")
        if lc and batch == 1:
            fastest = max(
                (r for r in rows if (r["batch"], r["context"]) == (1, context) and r.get("llama_as_shipped")),
                key=lambda r: r["prefill_tok_s"],
            )
            ratio = plain["prefill_tok_s"] / fastest["prefill_tok_s"]
            lines.append(f"prefill vs {fastest['system']}, {cell}: {_verdict(ratio, PREFILL_VS_LLAMA)}")
        if (best := _llama_as_shipped(rows, batch, context, lookup=True)) and (
            want := _target(MAGICDEC_VS_LLAMA, batch, context)
        ):
            lines.append(f"MagicDec vs {best['system']}, {cell}: {_verdict(best['magicdec_ratio'], want)}")
    return lines
