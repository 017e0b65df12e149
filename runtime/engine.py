"""The Python API: ``Engine(artifact).generate(prompts, ...)`` with plain or speculative decoding."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..constants import PAGE_SIZE
from ..errors import UserError
from . import calibration
from . import costmodel as cm
from .artifact import Artifact, ArtifactError
from .autospec import (
    AUTO_BUDGETS,
    AUTO_MAX_GAMMA,
    Acceptance,
    AutoPolicy,
    StepCosts,
    is_auto,
    measured_curve,
    prior_curve,
)
from .kv import PagePool
from .runner import ModelRunner
from .sampling import SamplingParams, probs_from_logits, sample, verify_greedy, verify_rejection
from .threads import configure_threads
from .views import DRAFT_KINDS, CompressedView, DraftSettings, pack_views, snapkv_view, streaming_view

DEFAULT_PREFILL_CHUNK = 1024  # prompt tokens per prefill call (all sequences of the chunk together)
DEFAULT_GAMMA = 3  # draft tokens per speculation round
MAX_GAMMA = 32  # more draft tokens than this per round cannot pay off at any acceptance rate worth having


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
    draft: DraftSettings | None = None
    view: CompressedView | None = None
    draft_len: int = 0  # positions with KV the drafter can read (its own pool, or the target's)
    acceptance: Acceptance | None = None  # running acceptance estimate (automatic speculation)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclasses.dataclass
class PrefilledBatch:
    """Prompts whose KV is in the pool (from ``Engine.prefill``); decode it any number of times."""

    engine: Engine
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



class Engine:
    """Generate text with a compiled artifact.

    ``kv_capacity`` caps the KV pool in tokens (all sequences together); by default the pool grows to what
    each ``generate`` call needs. ``prefill_chunk`` is the number of prompt tokens per prefill call.
    ``threads`` is the CPU thread count (default: ``$TVM_NUM_THREADS`` or all available CPUs).
    """

    def __init__(
        self,
        artifact: str | Path,
        *,
        kv_capacity: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        threads: int | None = None,
        draft_model: str | Path | None = None,
    ):
        self.threads = configure_threads(threads)
        self.artifact = Artifact.load(artifact)
        self.config = self.artifact.model
        self.tokenizer = self.artifact.tokenizer
        self.kv_capacity = kv_capacity
        self.prefill_chunk = prefill_chunk
        self.target = ModelRunner(self.artifact)
        self.drafter = self.target if draft_model is None else ModelRunner(self._load_draft(draft_model))
        self._next_seq_id = 0

    def _load_draft(self, path: str | Path) -> Artifact:
        """A separate small draft model; it must share the target's tokenizer."""
        draft = Artifact.load(path)
        if (
            draft.tokenizer.get_vocab() != self.tokenizer.get_vocab()
            or draft.model.vocab_size != self.config.vocab_size
        ):
            raise ArtifactError(
                f"draft model {path} uses a different tokenizer or vocabulary than the target; "
                f"a draft must share the target's tokenizer"
            )
        return draft

    @property
    def runners(self) -> list[ModelRunner]:
        """The target, and the separate draft model if there is one."""
        return [self.target] if self.drafter is self.target else [self.target, self.drafter]

    # ---------------------------------------------------------------------------------------------
    # Requests

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _prompt_ids(self, prompts, max_new_tokens: int) -> list[list[int]]:
        """Tokenize and validate prompts (text or token ids) for ``max_new_tokens`` new tokens each."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not prompts:
            raise RequestError("no prompts given")
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ctx, vocab = self.config.context_window, self.config.vocab_size
        out = []
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
            out.append(ids)
        return out

    def _requests(self, batch: PrefilledBatch, max_new_tokens: int, params: SamplingParams) -> list[_Request]:
        try:
            params.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        if not 1 <= max_new_tokens <= batch.max_new_tokens:
            raise RequestError(
                f"max_new_tokens must be from 1 to {batch.max_new_tokens} (what prefill reserved), "
                f"got {max_new_tokens}"
            )
        return [
            _Request(
                seq_id,
                prompt,
                params,
                np.random.default_rng(None if params.seed is None else [params.seed, i]),
                max_new_tokens,
            )
            for i, (seq_id, prompt) in enumerate(zip(batch.seq_ids, batch.prompts))
        ]

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
        pages = runner.ensure_pool(need, None if self.kv_capacity is None else self.kv_capacity // PAGE_SIZE)
        for r in requests:
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
                toks.append(r.prompt[done[i] : done[i] + take])
                pos.append(np.arange(done[i], done[i] + take))
                seq_rows.append(np.full(take, len(rows)))
                rows.append(i)
                seq_ids.append(r.seq_id)
                budget -= take
                done[i] += take
            ends = np.cumsum([len(t) for t in toks]) - 1
            logits = runner.forward(
                "prefill",
                np.concatenate(toks),
                np.concatenate(seq_rows),
                np.concatenate(pos),
                seq_ids,
                ends.astype(np.int32),
            )
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

    def _plain_step(self, active: list[_Request], stats: GenerationStats, stop_at_eos: bool) -> None:
        """One target decode step for every active sequence."""
        runner = self.target
        positions = np.array([len(r.tokens) - 1 for r in active])
        tokens = np.array([r.tokens[-1] for r in active])
        t0 = time.perf_counter()
        logits = runner.forward(
            "decode", tokens, np.arange(len(active)), positions, [r.seq_id for r in active]
        )
        stats.decode_seconds += time.perf_counter() - t0
        stats.decode_steps += 1
        for r, tok, p in zip(active, self._choose(active, logits), positions):
            runner.pages.set_length(r.seq_id, int(p) + 1)
            if self.drafter is runner:
                r.draft_len = int(p) + 1
            self._append(r, [tok], stop_at_eos)

    def _decode_plain(self, requests: list[_Request], stats: GenerationStats, stop_at_eos: bool) -> None:
        while active := [r for r in requests if not r.done]:
            self._plain_step(active, stats, stop_at_eos)

    # ---------------------------------------------------------------------------------------------
    # Speculative decoding (MagicDec): self-speculation through a compressed KV view

    def _attach_drafts(self, requests: list[_Request], draft: str, budget, gamma: int, settings) -> None:
        if not isinstance(gamma, (int, np.integer)) or not 1 <= gamma <= MAX_GAMMA:
            raise RequestError(f"gamma must be an integer from 1 to {MAX_GAMMA}, got {gamma!r}")
        if settings is None:
            if draft not in DRAFT_KINDS:
                raise RequestError(f"unknown draft {draft!r}; choose one of: {', '.join(DRAFT_KINDS)}")
            budgets = list(budget) if isinstance(budget, (Sequence, np.ndarray)) else [budget] * len(requests)
            default = self.default_budget()
            settings = [DraftSettings(draft, int(b if b is not None else default)) for b in budgets]
        elif isinstance(settings, DraftSettings):
            settings = [settings] * len(requests)
        if len(settings) != len(requests):
            raise RequestError(f"got {len(settings)} draft budgets or settings for {len(requests)} prompts")
        for r, s in zip(requests, settings):
            try:
                s.validate(self.config.context_window)
            except ValueError as e:
                raise RequestError(str(e)) from None
            r.draft = s

    def default_budget(self) -> int:
        """The artifact's draft budget, else DEFAULT_BUDGET, but never more than half the context window."""
        return self.artifact.config.draft_budget or min(
            DraftSettings().budget, self.config.context_window // 2
        )

    def _build_views(self, runner: ModelRunner, requests: list[_Request], batch: PrefilledBatch) -> None:
        """After prefill: each request's compressed view (SnapKV scores its observation window on device)."""
        c = runner.cfg
        snap = [
            r
            for r in requests
            if r.draft.kind == "snapkv"
            and len(r.prompt) > r.draft.window
            and (r.seq_id, r.draft.window) not in batch.snapkv_scores
        ]
        if snap:
            for seq_id, scores in self._snapkv_scores(runner, snap).items():
                batch.snapkv_scores[seq_id, next(r.draft.window for r in snap if r.seq_id == seq_id)] = scores
        for r in requests:
            if r.draft.kind == "streamingllm":
                r.view = streaming_view(r.draft, len(r.prompt), c.num_layers, c.num_kv_heads)
            else:
                scores = batch.snapkv_scores.get((r.seq_id, r.draft.window))
                r.view = snapkv_view(r.draft, len(r.prompt), scores, c.num_layers, c.num_kv_heads)

    def _snapkv_scores(self, runner: ModelRunner, requests: list[_Request]) -> dict[int, np.ndarray]:
        toks, rows, pos = [], [], []
        for row, r in enumerate(requests):
            start = len(r.prompt) - r.draft.window
            toks.append(r.prompt[start:])
            rows.append(np.full(r.draft.window, row))
            pos.append(np.arange(start, len(r.prompt)))
        scores = runner.forward(
            "snapkv_scores",
            np.concatenate(toks),
            np.concatenate(rows),
            np.concatenate(pos),
            [r.seq_id for r in requests],
        )
        return {r.seq_id: scores[:, row] for row, r in enumerate(requests)}

    def _draft_round(self, active: list[_Request], committed: np.ndarray, gamma: int, static_pos, static_len):
        """``gamma`` draft steps for each active sequence: tokens ``[B, gamma]`` and their probs or None.

        The first step also feeds the drafter any committed token it has no KV for yet (a separate draft model
        never saw the last drafted token when all were accepted), so it may take two tokens for a sequence.
        """
        runner, batch = self.drafter, len(active)
        tokens = np.empty((batch, gamma), dtype=np.int64)
        greedy = all(r.params.greedy for r in active)
        q = None if greedy else np.empty((batch, gamma, self.config.vocab_size))
        window_start = np.array([r.view.window_start(int(n)) for r, n in zip(active, committed)], np.int32)
        feed = [r.tokens[r.draft_len :] for r in active]
        rows = np.concatenate([np.full(len(f), b) for b, f in enumerate(feed)])
        positions = np.concatenate([np.arange(r.draft_len, len(r.tokens)) for r in active])
        current = np.concatenate(feed)
        for i in range(gamma):
            logits = runner.forward(
                "draft",
                current,
                rows,
                positions,
                [r.seq_id for r in active],
                static_pos,
                static_len,
                window_start,
            )
            logits = logits[np.cumsum(np.bincount(rows, minlength=batch)) - 1]  # each row's last token
            if greedy:
                tokens[:, i] = np.argmax(logits, axis=-1)
            else:
                for b, r in enumerate(active):
                    q[b, i] = probs_from_logits(logits[b], r.params.temperature, r.params.top_p)
                    tokens[b, i] = sample(q[b, i][None], r.rng)[0]
            current, rows, positions = tokens[:, i], np.arange(batch), committed + i + 1
        return tokens, q

    def _speculative_round(
        self,
        active: list[_Request],
        stats: GenerationStats,
        stop_at_eos: bool,
        gamma: int,
        static_pos: np.ndarray,
        static_len: np.ndarray,
    ) -> tuple[float, float]:
        """Draft ``gamma`` tokens per active sequence, verify them in one target pass, keep the accepted.

        Returns the seconds spent drafting and verifying.
        """
        runner = self.target
        committed = np.array([len(r.tokens) - 1 for r in active])  # KV is committed up to the pending token
        t0 = time.perf_counter()
        drafted, q = self._draft_round(active, committed, gamma, static_pos, static_len)
        t1 = time.perf_counter()
        verify_tokens = np.concatenate([[r.tokens[-1], *d] for r, d in zip(active, drafted)])
        seq_rows = np.repeat(np.arange(len(active)), gamma + 1)
        positions = (committed[:, None] + np.arange(gamma + 1)).reshape(-1)
        logits = runner.forward("verify", verify_tokens, seq_rows, positions, [r.seq_id for r in active])
        logits = logits.reshape(len(active), gamma + 1, -1)
        t2 = time.perf_counter()
        stats.draft_seconds += t1 - t0
        stats.verify_seconds += t2 - t1
        stats.draft_steps += gamma
        stats.verify_steps += 1
        stats.decode_seconds += t2 - t0
        stats.decode_steps += 1
        for b, r in enumerate(active):
            if r.params.greedy:
                n_acc, nxt = verify_greedy(drafted[b], np.argmax(logits[b], axis=-1))
            else:
                p = probs_from_logits(logits[b], r.params.temperature, r.params.top_p)
                n_acc, nxt = verify_rejection(drafted[b], q[b], p, r.rng)
            kept = self._append(r, [*drafted[b][:n_acc], nxt], stop_at_eos)
            runner.pages.set_length(r.seq_id, int(committed[b]) + kept)
            # The drafter's own KV is valid for the tokens it drafted from that were accepted.
            if self.drafter is runner:
                r.draft_len = int(committed[b]) + kept
            else:
                r.draft_len = int(committed[b]) + min(gamma, n_acc + 1)
                self.drafter.pages.set_length(r.seq_id, r.draft_len)
            r.accepted_lengths.append(n_acc + 1)
            if r.acceptance is not None:
                r.acceptance.observe(n_acc, gamma)
            stats.drafted_tokens += gamma
            stats.accepted_tokens += n_acc
        return t1 - t0, t2 - t1

    def _decode_speculative(
        self, requests: list[_Request], stats: GenerationStats, stop_at_eos: bool, gamma: int
    ) -> None:
        static_all, len_all = pack_views([r.view for r in requests])
        row_of = {r.seq_id: i for i, r in enumerate(requests)}
        while active := [r for r in requests if not r.done]:
            rows = [row_of[r.seq_id] for r in active]
            self._speculative_round(active, stats, stop_at_eos, gamma, static_all[rows], len_all[rows])

    def _decode_auto(
        self,
        requests: list[_Request],
        batch: PrefilledBatch,
        stats: GenerationStats,
        stop_at_eos: bool,
        policy: AutoPolicy,
    ) -> None:
        """Each round, the policy's choice: a plain step, or speculation at its gamma and budget."""
        row_of = {r.seq_id: i for i, r in enumerate(requests)}
        packed_budget = requests[0].draft.budget  # decode() built every view at this budget
        static_all, len_all = pack_views([r.view for r in requests])
        while active := [r for r in requests if not r.done]:
            contexts = [len(r.tokens) for r in active]
            choice = policy.choose(contexts, [r.acceptance for r in active])
            stats.auto_choices.append((len(active), choice.gamma, choice.budget))
            if choice.gamma == 0:
                t0 = time.perf_counter()
                self._plain_step(active, stats, stop_at_eos)
                predicted = policy.costs.target(len(active), round(np.mean(contexts)))
                policy.costs.observe("target", predicted, time.perf_counter() - t0)
                continue
            if choice.budget != packed_budget:  # a new budget: new views, timed as part of decoding
                t0 = time.perf_counter()
                for r in requests:
                    r.draft = dataclasses.replace(r.draft, budget=choice.budget)
                    r.acceptance.budget = choice.budget
                self._build_views(self.drafter, requests, batch)
                static_all, len_all = pack_views([r.view for r in requests])
                packed_budget = choice.budget
                stats.decode_seconds += time.perf_counter() - t0
            rows = [row_of[r.seq_id] for r in active]
            context = round(np.mean(contexts))
            t_draft, t_verify = self._speculative_round(
                active, stats, stop_at_eos, choice.gamma, static_all[rows], len_all[rows]
            )
            costs, n = policy.costs, len(active)
            costs.observe("draft", choice.gamma * costs.draft_step(n, choice.budget, context), t_draft)
            costs.observe("verify", costs.verify(n, context, choice.gamma), t_verify)

    def _auto_policy(
        self, batch: PrefilledBatch, draft_kind: str, gamma, budget, draft_settings
    ) -> AutoPolicy:
        """The automatic policy for ``batch``: calibrated step costs, candidate gammas and budgets."""
        if draft_settings is not None:
            raise RequestError("draft_settings fix the budget; use budget='auto' or draft_settings, not both")
        if batch.max_gamma < 1:
            raise RequestError("this batch was prefilled for plain decoding only; pass max_gamma to prefill")
        for name, value, top in (("gamma", gamma, batch.max_gamma), ("budget", budget, None)):
            if (
                value is None
                or is_auto(value)
                or isinstance(value, (int, np.integer))
                and 1 <= value <= (top or value)
            ):
                continue
            limit = f"from 1 to {top}" if top else "at least 1 (one for the whole batch)"
            raise RequestError(
                f"with automatic speculation, {name} is 'auto' or an integer {limit}, got {value!r}"
            )
        if not is_auto(budget):
            try:
                DraftSettings(draft_kind, int(budget or self.default_budget())).validate(
                    self.config.context_window
                )
            except ValueError as e:
                raise RequestError(str(e)) from None
        fit = calibration.load_or_calibrate(self)
        draft = cm.SELF_DRAFT
        if self.drafter is not self.target:
            a = self.drafter.artifact
            draft = cm.Draft(cm.ModelSpec(a.model, cm.DTYPE_BYTES[a.dtype], a.path.name))
        costs = StepCosts(calibration.model_spec(self), fit.hardware, draft)
        gammas = range(1, min(batch.max_gamma, AUTO_MAX_GAMMA) + 1)
        budgets = [k for k in AUTO_BUDGETS if k < self.config.context_window // 2]
        return AutoPolicy(
            costs,
            gammas,
            budgets,
            fixed_gamma=None if is_auto(gamma) else int(gamma),
            fixed_budget=None if is_auto(budget) else int(budget or self.default_budget()),
            acceptance_curve=measured_curve(fit.acceptance) if fit.acceptance else prior_curve,
        )

    # ---------------------------------------------------------------------------------------------
    # API

    def prefill(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 128,
        max_gamma: int = MAX_GAMMA,
    ) -> PrefilledBatch:
        """Prefill the prompts and reserve KV for ``max_new_tokens`` each, plus one speculation round of up
        to ``max_gamma`` draft tokens (0: plain decoding only).

        The batch can be decoded several times with ``decode`` (each call restarts from the prompts, which
        lets you compare settings on one prefill); release it with ``release`` or use it as a context manager.
        """
        prompt_ids = self._prompt_ids(prompts, max_new_tokens)
        first_id = self._next_seq_id
        self._next_seq_id += len(prompt_ids)
        batch = PrefilledBatch(
            self, prompt_ids, list(range(first_id, first_id + len(prompt_ids))), max_new_tokens, max_gamma
        )
        placeholders = [
            _Request(i, p, SamplingParams(), None, max_new_tokens) for i, p in zip(batch.seq_ids, prompt_ids)
        ]
        reserved = []
        try:
            for runner in self.runners:
                self._reserve(runner, placeholders, slack=max_gamma + 1 if max_gamma else 0)
                reserved.append(runner)
            t0 = time.perf_counter()
            for runner in reversed(self.runners):  # the target last: its logits start the generation
                batch.logits = self._prefill(runner, placeholders)
            batch.prefill_seconds = time.perf_counter() - t0
        except BaseException:
            for runner in reserved:
                self._release(runner, placeholders)
            raise
        return batch

    def release(self, batch: PrefilledBatch) -> None:
        """Free a prefilled batch's KV pages."""
        if not batch.released:
            for runner in self.runners:
                for seq_id in batch.seq_ids:
                    runner.pages.remove(seq_id)
            batch.released = True

    def decode(
        self,
        batch: PrefilledBatch,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        speculate: bool = False,
        draft: str = "snapkv",
        budget: int | Sequence[int] | str | None = None,
        gamma: int | str = DEFAULT_GAMMA,
        draft_settings: DraftSettings | Sequence[DraftSettings] | None = None,
    ) -> list[GenerationResult]:
        """Generate from a prefilled batch (see ``generate`` for the arguments)."""
        if batch.released:
            raise RequestError("this prefilled batch was released; prefill the prompts again")
        params = SamplingParams(temperature, top_p, seed)
        requests = self._requests(
            batch, batch.max_new_tokens if max_new_tokens is None else max_new_tokens, params
        )
        stats = GenerationStats(prefill_seconds=batch.prefill_seconds)
        for r in requests:
            r.draft_len = len(r.prompt)
            for runner in self.runners:
                runner.pages.set_length(r.seq_id, len(r.prompt))
        auto = speculate and (is_auto(gamma) or is_auto(budget))
        if auto:
            policy = self._auto_policy(batch, draft, gamma, budget, draft_settings)
            gamma, budget = policy.gammas[-1], policy.budgets[0]
        if speculate:
            self._attach_drafts(requests, draft, budget, gamma, draft_settings)
            if gamma > batch.max_gamma:
                raise RequestError(
                    f"gamma {gamma} exceeds the {batch.max_gamma} this batch was prefilled for; "
                    f"pass max_gamma to prefill"
                )
            t0 = time.perf_counter()
            self._build_views(self.drafter, requests, batch)
            stats.prefill_seconds += time.perf_counter() - t0
        for r, tok in zip(requests, self._choose(requests, batch.logits)):
            self._append(r, [tok], stop_at_eos)
        if auto:
            curve = policy.acceptance_curve
            for r in requests:
                r.acceptance = Acceptance(curve, r.draft.budget)
            self._decode_auto(requests, batch, stats, stop_at_eos, policy)
        elif speculate:
            self._decode_speculative(requests, stats, stop_at_eos, gamma)
        else:
            self._decode_plain(requests, stats, stop_at_eos)
        return [
            GenerationResult(
                self.decode_text(r.output),
                r.output,
                len(r.prompt),
                r.finish_reason,
                stats,
                r.accepted_lengths,
            )
            for r in requests
        ]

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 128,
        **decode_args,
    ) -> list[GenerationResult]:
        """Generate a continuation of each prompt (text or token ids); each stops at its own EOS or limit.

        ``temperature`` (0 = greedy), ``top_p`` and ``seed`` control sampling; ``stop_at_eos=False``
        ignores EOS.
        With ``speculate=True`` the target's own weights draft ``gamma`` tokens a round through a compressed
        view of the KV (``draft``: "snapkv" or "streamingllm", ``budget`` KV entries, one value or one per
        prompt; ``draft_settings`` gives full control), and one target pass verifies them. Greedy output is
        identical to plain decoding, and sampling keeps the target's distribution (rejection sampling).
        ``gamma="auto"`` and/or ``budget="auto"`` choose them each round from calibrated step costs and the
        running acceptance of each sequence, and decode plainly where speculation would not pay
        (``runtime/autospec.py``).
        """
        speculate = decode_args.get("speculate", False)
        max_gamma = decode_args.get("gamma", DEFAULT_GAMMA) if speculate else 0
        if is_auto(max_gamma):
            max_gamma = AUTO_MAX_GAMMA
        elif not isinstance(max_gamma, (int, np.integer)) or not 0 <= max_gamma <= MAX_GAMMA:
            max_gamma = MAX_GAMMA  # decode reports the bad gamma
        with self.prefill(prompts, max_new_tokens=max_new_tokens, max_gamma=max_gamma) as batch:
            return self.decode(batch, **decode_args)
