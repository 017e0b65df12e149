"""The Python API: ``Engine(artifact).generate(prompts, ...)`` with plain or speculative decoding.

A prefill, then rounds: a plain decode step, or a speculative round in which a drafter (``drafter.py``)
proposes ``gamma`` tokens a sequence and one target pass verifies them. Speculation settings are checked
once (``speculation.py``); under ``"auto"`` the policy (``autospec.py``) answers one question per round.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..constants import DEFAULT_DRAFT, PAGE_SIZE
from . import decoding
from .artifact import Artifact, ArtifactError
from .autospec import Acceptance, AutoPolicy
from .drafter import Drafter, ModelDrafter, SelfDrafter
from .kv import PagePool
from .runner import ModelRunner
from .sampling import SamplingParams
from .sequences import GenerationResult, GenerationStats, PrefilledBatch, SequenceState
from .speculation import DEFAULT_GAMMA, MAX_GAMMA, RequestError, SpecSettings
from .threads import configure_threads
from .views import DraftSettings, pack_views

DEFAULT_PREFILL_CHUNK = 1024  # prompt tokens per prefill call (all sequences of the chunk together)

__all__ = [
    "DEFAULT_GAMMA",
    "MAX_GAMMA",
    "Engine",
    "GenerationResult",
    "GenerationStats",
    "PrefilledBatch",
    "RequestError",
    "SpecSettings",
]


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
        self.drafter: Drafter = (
            SelfDrafter(self.target)
            if draft_model is None
            else ModelDrafter(ModelRunner(self._load_draft(draft_model)))
        )
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
        return [self.target, self.drafter.runner] if self.drafter.owns_pool else [self.target]

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

    def _requests(
        self, batch: PrefilledBatch, max_new_tokens: int, params: SamplingParams
    ) -> list[SequenceState]:
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
            SequenceState(
                seq_id,
                prompt,
                params,
                np.random.default_rng(None if params.seed is None else [params.seed, i]),
                max_new_tokens,
            )
            for i, (seq_id, prompt) in enumerate(zip(batch.seq_ids, batch.prompts))
        ]

    def _reserve(self, runner: ModelRunner, requests: list[SequenceState], slack: int) -> PagePool:
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

    def _release(self, runner: ModelRunner, requests: list[SequenceState]) -> None:
        for r in requests:
            runner.pages.remove(r.seq_id)

    # ---------------------------------------------------------------------------------------------
    # Prefill

    def _prefill(self, runner: ModelRunner, requests: list[SequenceState]) -> np.ndarray:
        """Run the prompts through ``runner`` in chunks; returns each request's last-position logits."""
        last_logits = np.zeros((len(requests), self.config.vocab_size), dtype=np.float32)
        done = [0] * len(requests)
        while any(d < len(r.prompt) for d, r in zip(done, requests)):
            budget, rows, pieces = self.prefill_chunk, [], []
            for i, r in enumerate(requests):
                take = min(len(r.prompt) - done[i], budget)
                if take == 0:
                    continue
                pieces.append(decoding.PrefillPiece(r.seq_id, r.prompt[done[i] : done[i] + take], done[i]))
                rows.append(i)
                budget -= take
                done[i] += take
                if budget == 0:
                    break
            logits = decoding.prefill(runner, pieces)
            for row, i in enumerate(rows):
                if done[i] == len(requests[i].prompt):
                    last_logits[i] = logits[row]
        return last_logits

    # ---------------------------------------------------------------------------------------------
    # Decoding

    def _decode_plain(self, requests: list[SequenceState], stats: GenerationStats) -> None:
        while active := [r for r in requests if not r.done]:
            decoding.plain_step(self.target, self.drafter, active, stats)

    # ---------------------------------------------------------------------------------------------
    # Speculative decoding (MagicDec)

    def default_draft(self) -> str:
        """The draft view the artifact was compiled for (its first ``--draft``), else SnapKV."""
        return (self.artifact.config.drafts or [DEFAULT_DRAFT])[0]

    def default_budget(self) -> int:
        """The artifact's draft budget, else DEFAULT_BUDGET, but never more than half the context window."""
        return self.artifact.config.draft_budget or min(
            DraftSettings().budget, self.config.context_window // 2
        )

    def _round(
        self,
        active: list[SequenceState],
        gamma: int,
        static_pos: np.ndarray,
        static_len: np.ndarray,
        stats: GenerationStats,
    ) -> tuple[float, float]:
        gammas = [gamma] * len(active)
        return decoding.speculative_round(
            self.target, self.drafter, active, gammas, static_pos, static_len, stats
        )

    def _decode_speculative(self, requests: list[SequenceState], stats: GenerationStats, gamma: int) -> None:
        static_all, len_all = pack_views([r.view for r in requests])
        row_of = {r.seq_id: i for i, r in enumerate(requests)}
        while active := [r for r in requests if not r.done]:
            rows = [row_of[r.seq_id] for r in active]
            self._round(active, gamma, static_all[rows], len_all[rows], stats)

    def _decode_auto(
        self,
        requests: list[SequenceState],
        batch: PrefilledBatch,
        stats: GenerationStats,
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
            context = round(np.mean(contexts))
            if choice.gamma == 0:
                seconds = decoding.plain_step(self.target, self.drafter, active, stats)
                policy.observe(choice, len(active), context, (seconds,))
                continue
            if choice.budget != packed_budget:  # a new budget: new views, timed as part of decoding
                t0 = time.perf_counter()
                for r in requests:
                    r.draft = dataclasses.replace(r.draft, budget=choice.budget)
                    r.acceptance.budget = choice.budget
                self.drafter.build_views(requests, batch)
                static_all, len_all = pack_views([r.view for r in requests])
                packed_budget = choice.budget
                stats.decode_seconds += time.perf_counter() - t0
            rows = [row_of[r.seq_id] for r in active]
            seconds = self._round(active, choice.gamma, static_all[rows], len_all[rows], stats)
            policy.observe(choice, len(active), context, seconds)

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
            SequenceState(i, p, SamplingParams(), None, max_new_tokens)
            for i, p in zip(batch.seq_ids, prompt_ids)
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
        draft: str | None = None,
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
        spec = None
        if speculate:
            settings = SpecSettings(draft or self.default_draft(), budget, gamma, draft_settings)
            spec = settings.check(
                len(requests), batch.max_gamma, self.config.context_window, self.default_budget()
            )
        policy = None
        if spec is not None and spec.auto:
            policy = AutoPolicy.calibrated(self, self.drafter.cost_model(), spec.gammas, spec.budgets)
        stats = GenerationStats(prefill_seconds=batch.prefill_seconds)
        for r in requests:
            r.draft_len = len(r.prompt)
            for runner in self.runners:
                runner.pages.set_length(r.seq_id, len(r.prompt))
        if spec is not None:
            for r, s in zip(requests, spec.drafts):
                r.draft = s
            t0 = time.perf_counter()
            self.drafter.build_views(requests, batch)
            stats.prefill_seconds += time.perf_counter() - t0
        stop = frozenset(self.config.eos_token_ids) if stop_at_eos else frozenset()
        for r, tok in zip(requests, decoding.choose(self.target, requests, batch.logits)):
            r.stop_token_ids = stop
            decoding.append(r, [tok])
        if policy is not None:
            for r in requests:
                r.acceptance = Acceptance(policy.acceptance_curve, r.draft.budget)
            self._decode_auto(requests, batch, stats, policy)
        elif spec is not None:
            self._decode_speculative(requests, stats, spec.gamma)
        else:
            self._decode_plain(requests, stats)
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
        view of the KV (``draft``: "snapkv" or "streamingllm", by default ``default_draft()``; ``budget`` KV
        entries, one value or one per prompt; ``draft_settings`` gives full control), and one target pass
        verifies them. Greedy output is identical to plain decoding, and sampling keeps the target's
        distribution (rejection sampling).
        ``gamma="auto"`` and/or ``budget="auto"`` choose them each round from calibrated step costs and the
        running acceptance of each sequence, and decode plainly where speculation would not pay
        (``runtime/autospec.py``).
        """
        gamma = decode_args.get("gamma", DEFAULT_GAMMA)
        max_gamma = SpecSettings(gamma=gamma).prefill_gamma() if decode_args.get("speculate") else 0
        with self.prefill(prompts, max_new_tokens=max_new_tokens, max_gamma=max_gamma) as batch:
            return self.decode(batch, **decode_args)
