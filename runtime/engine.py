"""The Python API: ``Engine(artifact).generate(prompts, ...)`` with plain or speculative decoding."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm

from ..compile.attention import PAGE_SIZE, QUERY_TILE
from ..errors import UserError
from .artifact import Artifact
from .kv import PagePool
from .sampling import SamplingParams, probs_from_logits, sample
from .threads import configure_threads

DEFAULT_PREFILL_CHUNK = 1024  # prompt tokens per prefill call (all sequences of the chunk together)


class RequestError(UserError, ValueError):
    """A generation request that cannot be served; the message is one line and says what to do."""


@dataclasses.dataclass
class GenerationStats:
    """Timings and speculation figures of one ``generate`` call (shared by its sequences)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # target forward passes after prefill (decode or verify calls)
    draft_seconds: float = 0.0  # total time in draft steps (T_D * draft steps)
    verify_seconds: float = 0.0  # total time in verify calls (T_V * verify calls)
    draft_steps: int = 0
    verify_steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclasses.dataclass
class GenerationResult:
    """One sequence's output."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "length"
    stats: GenerationStats
    accepted_lengths: list[int] = dataclasses.field(default_factory=list)  # tokens gained per verify

    @property
    def mean_accepted_length(self) -> float:
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else 0.0


@dataclasses.dataclass
class _Request:
    """Per-sequence state during generation."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    max_new_tokens: int
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    accepted_lengths: list[int] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def query_tiles(seq_rows: np.ndarray) -> np.ndarray:
    """``[first, end)`` runs of at most ``QUERY_TILE`` consecutive tokens of the same row."""
    change = np.flatnonzero(np.diff(seq_rows)) + 1
    bounds = [0, *change.tolist(), len(seq_rows)]
    tiles = [(s, min(s + QUERY_TILE, end)) for start, end in zip(bounds, bounds[1:])
             for s in range(start, end, QUERY_TILE)]
    return np.asarray(tiles, dtype=np.int32)


class ModelRunner:
    """Calls one artifact's compiled functions over the shared paged pool; numpy in, numpy out."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.cfg = artifact.model
        self.device = artifact.device
        self.pool_tensor: tvm.runtime.Tensor | None = None
        self.pages: PagePool | None = None

    def ensure_pool(self, num_pages: int) -> PagePool:
        """(Re)allocate the device pool with ``num_pages`` pages if it is smaller; returns the allocator."""
        if self.pages is None or self.pages.num_pages < num_pages:
            c = self.cfg
            shape = (c.num_layers, num_pages, 2, c.num_kv_heads, PAGE_SIZE * c.head_dim)
            self.pool_tensor = None  # free the old pool first
            self.pool_tensor = tvm.runtime.empty(shape, self.artifact.dtype, self.device)
            self.pages = PagePool(num_pages, PAGE_SIZE)
        return self.pages

    def _t(self, array: np.ndarray) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    def forward(self, fn: str, tokens: np.ndarray, seq_rows: np.ndarray, positions: np.ndarray,
                seq_ids: list[int], *extra: np.ndarray) -> np.ndarray:
        """Run ``fn`` (prefill/decode/verify/draft) on new ``tokens`` of rows ``seq_rows`` of ``seq_ids``.

        Tokens are grouped by row in ascending order; ``extra`` are the function's further index arrays.
        """
        vm, params, pages = self.artifact.vm, self.artifact.params, self.pages
        slots = np.concatenate([pages.slots(s, positions[seq_rows == row]) for row, s in enumerate(seq_ids)])
        embeds = vm["embed"](self._t(tokens.astype(np.int32)), params)
        args = [embeds, self._t(slots.astype(np.int32)), self._t(seq_rows.astype(np.int32)),
                self._t(positions.astype(np.int32)), self._t(pages.page_table(seq_ids)),
                self._t(query_tiles(seq_rows))]
        args += [self._t(a) for a in extra]
        logits, self.pool_tensor = vm[fn](*args, self.pool_tensor, params)
        return logits.numpy()


class Engine:
    """Generate text with a compiled artifact.

    ``kv_capacity`` caps the KV pool in tokens (all sequences together); by default the pool grows to what
    each ``generate`` call needs. ``prefill_chunk`` is the number of prompt tokens per prefill call.
    ``threads`` is the CPU thread count (default: ``$TVM_NUM_THREADS`` or all available CPUs).
    """

    def __init__(self, artifact: str | Path, *, kv_capacity: int | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, threads: int | None = None):
        self.threads = configure_threads(threads)
        self.artifact = Artifact.load(artifact)
        self.config = self.artifact.model
        self.tokenizer = self.artifact.tokenizer
        self.kv_capacity = kv_capacity
        self.prefill_chunk = prefill_chunk
        self.target = ModelRunner(self.artifact)

    # ---------------------------------------------------------------------------------------------
    # Requests

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _requests(self, prompts, max_new_tokens: int, params: SamplingParams) -> list[_Request]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts given")
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        try:
            params.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        ctx, vocab = self.config.context_window, self.config.vocab_size
        requests = []
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:
                raise RequestError(f"prompt {i} is empty; give at least one token")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            if len(ids) + max_new_tokens > ctx:
                raise RequestError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                    f"context window of {ctx}; shorten the prompt or lower max_new_tokens"
                )
            seed = None if params.seed is None else [params.seed, i]
            requests.append(_Request(i, ids, params, np.random.default_rng(seed), max_new_tokens))
        return requests

    def _reserve(self, runner: ModelRunner, requests: list[_Request], slack: int) -> PagePool:
        """Reserve every request's pages up front, so a batch never runs out of KV midway."""
        need = sum(-(-(len(r.prompt) + r.max_new_tokens + slack) // PAGE_SIZE) for r in requests)
        if self.kv_capacity is not None:
            have = self.kv_capacity // PAGE_SIZE
            if need > have:
                raise RequestError(
                    f"KV pool exhausted: this batch needs {need * PAGE_SIZE} token slots but kv_capacity is "
                    f"{have * PAGE_SIZE}; raise kv_capacity or use a smaller batch or fewer new tokens"
                )
        pages = runner.ensure_pool(need if self.kv_capacity is None else self.kv_capacity // PAGE_SIZE)
        for r in requests:
            if r.seq_id in pages._seqs:
                pages.remove(r.seq_id)
            pages.add(r.seq_id)
            pages.reserve(r.seq_id, len(r.prompt) + r.max_new_tokens + slack)
        return pages

    def _release(self, runner: ModelRunner, requests: list[_Request]) -> None:
        for r in requests:
            runner.pages.remove(r.seq_id)

    # ---------------------------------------------------------------------------------------------
    # Prefill

    def _prefill(self, runner: ModelRunner, requests: list[_Request]) -> np.ndarray:
        """Run the prompts through ``runner`` in chunks; returns each request's last-position logits."""
        last_logits = np.zeros((len(requests), self.config.vocab_size), dtype=np.float32)
        done = [0] * len(requests)
        while any(d < len(r.prompt) for d, r in zip(done, requests)):
            budget, rows, seq_ids, toks, pos, seq_rows = self.prefill_chunk, [], [], [], [], []
            for i, r in enumerate(requests):
                if budget == 0:
                    break
                take = min(len(r.prompt) - done[i], budget)
                if take == 0:
                    continue
                toks.append(r.prompt[done[i]: done[i] + take])
                pos.append(np.arange(done[i], done[i] + take))
                seq_rows.append(np.full(take, len(rows)))
                rows.append(i)
                seq_ids.append(r.seq_id)
                budget -= take
                done[i] += take
            ends = np.cumsum([len(t) for t in toks]) - 1
            logits = runner.forward("prefill", np.concatenate(toks), np.concatenate(seq_rows),
                                    np.concatenate(pos), seq_ids, ends.astype(np.int32))
            for row, i in enumerate(rows):
                runner.pages.set_length(requests[i].seq_id, done[i])
                if done[i] == len(requests[i].prompt):
                    last_logits[i] = logits[row]
        return last_logits

    # ---------------------------------------------------------------------------------------------
    # Decoding

    def _choose(self, requests: list[_Request], logits: np.ndarray) -> np.ndarray:
        """Sample (or argmax) one token per request from ``logits[len(requests), vocab]``."""
        out = np.empty(len(requests), dtype=np.int64)
        for i, r in enumerate(requests):
            if r.params.greedy:
                out[i] = int(np.argmax(logits[i]))
            else:
                probs = probs_from_logits(logits[i], r.params.temperature, r.params.top_p)
                out[i] = int(sample(probs[None], r.rng)[0])
        return out

    def _append(self, r: _Request, new_tokens: Sequence[int], stop_at_eos: bool) -> int:
        """Add generated tokens to ``r`` up to EOS or its limit; returns how many were kept."""
        eos = set(self.config.eos_token_ids) if stop_at_eos else set()
        kept = 0
        for t in new_tokens:
            r.output.append(int(t))
            kept += 1
            if int(t) in eos:
                r.finish_reason = "eos"
                break
            if len(r.output) >= r.max_new_tokens:
                r.finish_reason = "length"
                break
        return kept

    def _decode_plain(self, requests: list[_Request], stats: GenerationStats, stop_at_eos: bool) -> None:
        runner = self.target
        while True:
            active = [r for r in requests if not r.done]
            if not active:
                return
            positions = np.array([len(r.tokens) - 1 for r in active])
            tokens = np.array([r.tokens[-1] for r in active])
            t0 = time.perf_counter()
            logits = runner.forward("decode", tokens, np.arange(len(active)), positions,
                                    [r.seq_id for r in active])
            stats.decode_seconds += time.perf_counter() - t0
            stats.decode_steps += 1
            for r, tok, p in zip(active, self._choose(active, logits), positions):
                runner.pages.set_length(r.seq_id, int(p) + 1)
                self._append(r, [tok], stop_at_eos)

    # ---------------------------------------------------------------------------------------------
    # API

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> list[GenerationResult]:
        """Generate a continuation of each prompt (text or token ids); each stops at its own EOS or limit."""
        params = SamplingParams(temperature, top_p, seed)
        requests = self._requests(prompts, max_new_tokens, params)
        stats = GenerationStats()
        runner = self.target
        self._reserve(runner, requests, slack=0)
        try:
            t0 = time.perf_counter()
            first = self._choose(requests, self._prefill(runner, requests))
            stats.prefill_seconds = time.perf_counter() - t0
            for r, tok in zip(requests, first):
                self._append(r, [tok], stop_at_eos)
            self._decode_plain(requests, stats, stop_at_eos)
        finally:
            self._release(runner, requests)
        return [
            GenerationResult(self.decode_text(r.output), r.output, len(r.prompt), r.finish_reason, stats,
                             r.accepted_lengths)
            for r in requests
        ]
