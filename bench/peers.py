"""Decoding throughput side by side: ours (plain and MagicDec) against what a CPU user would otherwise run.

Systems, each with the same prompts, greedy, the same thread count, measured one after the other in one run
(idle thread pools spin for a while after a run, so no two run at once):

- **ours, plain**: ``decode`` over the prefilled batch;
- **ours, MagicDec**: self-speculative decoding (``draft``/``budget``/``gamma``) on the same prefill;
- **transformers** on torch CPU, fp32 (the ``test`` extra);
- **llama.cpp** through ``llama-cpp-python`` (the ``peers`` extra, skipped when missing): plain decoding on
  the shipped GGUF (Q4_1) and on an F32 GGUF of the same weights, each with llama.cpp's default F16 KV cache,
  and the F32 GGUF with an F32 KV cache (the like-for-like dtype: ours is fp32 throughout); prompt-lookup
  speculative decoding (batch 1, F32 weights and KV); each with flash attention off and on.

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
TRANSFORMERS = "transformers (torch fp32)"
BANDWIDTH_TARGET_BATCHED = 0.70  # issue #5: at least 70% of the bandwidth at batch 8 x 4k
BANDWIDTH_BATCHED_CONTEXT = 4096
BANDWIDTH_TARGET_SINGLE = 0.50  # and at least 50% at batch 1
LIKE_FOR_LIKE = "F32 KV F32"  # the llama.cpp weights and KV cache matching our fp32 artifact
LLAMA_TARGET_MIN_CONTEXT = 4096  # the llama.cpp targets are set at 4k and 8k
LLAMA_TARGET_BATCHED = 2.0  # at least 2x llama.cpp at batch 8
MAGICDEC_TARGET = 1.5  # MagicDec at least 1.5x the best peer at batch 8 x 8k
MAGICDEC_TARGET_MIN_CONTEXT = 8192


@dataclasses.dataclass
class PeerSettings:
    new_tokens: int
    repeats: int
    draft: str
    budget: int
    gamma: int
    # llama.cpp runs (weights, KV cache): the shipped GGUF and a converted F32 copy with llama.cpp's default
    # F16 KV, and the F32 copy with an F32 KV
    llama_variants: tuple[tuple[str, str], ...] = (("q4_1", "f16"), ("f32", "f16"), ("f32", "f32"))
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
    with engine.prefill(prompts, max_new_tokens=s.new_tokens, max_gamma=s.gamma) as batch:
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
        Measurement(f"ours, MagicDec ({s.draft}/{s.budget}, gamma {s.gamma})", prefill, n, spec, spec_tokens),
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
    return source if dtype == shipped else gguf_convert.convert(source, dtype)


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
            dtype, kv = settings.llama_variants[-1]
            for fa in settings.flash_attn:
                progress(f"batch {batch}, context {context}: llama.cpp prompt lookup flash attn {fa}")
                measured.append(_llama_lookup(ggufs[dtype], kv, prompts[0], settings, threads, fa))
        rows += [m.row(batch, context) for m in measured]
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
        spec = next(o for o in cell if o["system"].startswith("ours, MagicDec"))
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


def _verdict(value: float, target: float, unit: str = "x") -> str:
    got = f"{value:.0%}" if unit == "%" else f"{value:.2f}x"
    want = f"{target:.0%}" if unit == "%" else f"{target:.1f}x"
    if value >= target:
        return f"{got} (target {want}: met)"
    return f"{got} (target {want}: missed by {1 - value / target:.0%})"


def target_lines(rows: list[dict], fractions: dict) -> list[str]:
    """The issue's targets, each with its measured value, for the cells that were run."""
    lines = []
    cells = sorted({(r["batch"], r["context"]) for r in rows})
    for batch, context in cells:
        frac = fractions.get((batch, context))
        want = BANDWIDTH_TARGET_SINGLE if batch == 1 else None
        want = BANDWIDTH_TARGET_BATCHED if batch > 1 and context == BANDWIDTH_BATCHED_CONTEXT else want
        if frac is not None and want is not None:
            verdict = _verdict(frac, want, "%")
            lines.append(f"read bandwidth used, plain, batch {batch} x {context}: {verdict}")
        hf = best_peer(rows, batch, context, "transformers")
        if hf:
            lines.append(
                f"plain vs transformers, batch {batch} x {context}: {_verdict(hf['plain_ratio'], 1.0)}"
            )
        lc = _best_plain_llama(rows, batch, context)
        if lc and context >= LLAMA_TARGET_MIN_CONTEXT:
            want = LLAMA_TARGET_BATCHED if batch > 1 else 1.0
            verdict = _verdict(lc["plain_ratio"], want)
            lines.append(f"plain vs best {lc['system']}, batch {batch} x {context}: {verdict}")
        best = best_peer(rows, batch, context)
        if best and batch > 1 and context >= MAGICDEC_TARGET_MIN_CONTEXT:
            lines.append(
                f"MagicDec vs best peer ({best['system']}), batch {batch} x {context}: "
                f"{_verdict(best['magicdec_ratio'], MAGICDEC_TARGET)}"
            )
    return lines


def _best_plain_llama(rows: list[dict], batch: int, context: int) -> dict | None:
    plain = [
        r
        for r in rows
        if (r["batch"], r["context"]) == (batch, context)
        and r["system"].startswith(f"llama.cpp {LIKE_FOR_LIKE}")
        and "prompt-lookup" not in r["system"]
    ]
    return max(plain, key=lambda r: r["decode_tok_s"]) if plain else None
