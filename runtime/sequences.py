"""What generation produces and keeps: results and stats, each sequence's state, and prefilled batches."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from .autospec import Acceptance
from .sampling import SamplingParams
from .views import CompressedView, DraftSettings


class _Owner(Protocol):
    """What a prefilled batch needs of the engine that made it (so this module need not import it)."""

    def release(self, batch: PrefilledBatch) -> None: ...


class ScoreCache(Protocol):
    """Where the SnapKV scores of prompts are kept, ``(seq_id, window) -> [layers, kv_heads, prompt]``
    (a prefilled batch, or the serving loop)."""

    snapkv_scores: dict[tuple[int, int], np.ndarray]


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
    # automatic speculation: (batch, gamma, budget) of each round, gamma 0 for a plain step
    auto_choices: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)

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
class SequenceState:
    """One sequence's state during generation."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    rng: np.random.Generator
    max_new_tokens: int
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    accepted_lengths: list[int] = dataclasses.field(default_factory=list)
    draft: DraftSettings | None = None
    view: CompressedView | None = None
    draft_len: int = 0  # positions with KV the drafter can read (its own pool, or the target's)
    acceptance: Acceptance | None = None  # running acceptance estimate (automatic speculation)
    stop_token_ids: frozenset[int] = frozenset()  # generating one of these ends the sequence ("eos")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclasses.dataclass
class PrefilledBatch:
    """Prompts whose KV is in the pool (from ``Engine.prefill``); decode it any number of times."""

    engine: _Owner  # the Engine that prefilled it
    prompts: list[list[int]]
    seq_ids: list[int]
    max_new_tokens: int
    max_gamma: int  # the longest speculation round its KV reservation allows (0: plain decoding only)
    logits: np.ndarray | None = None  # last-position logits of each prompt
    prefill_seconds: float = 0.0
    snapkv_scores: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)
    released: bool = False

    def __enter__(self) -> PrefilledBatch:
        return self

    def __exit__(self, *exc) -> None:
        self.engine.release(self)
