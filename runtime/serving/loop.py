"""The serving loop: requests join and leave at any time, and each ``step`` runs a few small actions.

A step (``ServingEngine.step``):

1. **inbox**: takes new requests and aborts (``submit`` and ``abort`` are thread-safe);
2. **admit**: first come, first served, up to ``max_running`` (``scheduler.py``);
3. **prefill**: one chunk of at most ``max_batch_tokens`` prompt tokens over the admitted requests, so the
   running ones keep streaming while a long prompt prefills; a request whose prefill ends gets its first
   token and runs from the next round (its draft view is built when it first drafts);
4. **decode**: one plain step or one speculative round for the running batch. The policy picks a gamma and
   budget for requests on ``auto`` (or a plain step when speculation would not pay), weighing the step's
   prefill chunk too (every running request waits for it, so more tokens per round pay more); ``on``
   requests always draft, ``off`` requests take a plain step inside the round. Each request keeps its own
   sampling, budget, gamma, stop strings, EOS and ``max_tokens``;
5. **emit**: new text goes to each request's sink; a finished request frees its pages at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import tvm

from ...constants import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_RUNNING,
    DEFAULT_MAX_WAITING,
    PAGE_SIZE,
    SPECULATE_MODES,
)
from .. import decoding
from ..autospec import AUTO_BUDGETS, AUTO_MAX_GAMMA, Acceptance, AutoPolicy, Choice, prior_curve
from ..engine import Engine
from ..sequences import GenerationStats, SequenceState
from ..speculation import DEFAULT_GAMMA, RequestError
from ..views import DraftSettings, pack_views
from .metrics import ServeMetrics
from .request import GenerationConfig, RequestOutput, ServeRequest, Usage
from .scheduler import Scheduler
from .textstream import TextStream

KV_MEMORY_FRACTION = 0.5  # of the memory left after the weights, for the KV pool by default

Sink = Callable[[RequestOutput], None]


class QueueFull(RequestError):
    """The waiting queue is full; the client should retry later."""


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """How the loop serves. ``speculate`` is the default of requests that do not set it; ``draft`` the view
    (default: the artifact's); ``kv_capacity`` the pool in tokens (default: from free memory)."""

    speculate: str = "auto"
    draft: str | None = None
    draft_budget: int | None = None
    gamma: int = DEFAULT_GAMMA
    max_running: int = DEFAULT_MAX_RUNNING
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_waiting: int = DEFAULT_MAX_WAITING
    kv_capacity: int | None = None

    def validate(self) -> None:
        if self.speculate not in SPECULATE_MODES:
            raise RequestError(
                f"speculate must be one of {', '.join(SPECULATE_MODES)}, got {self.speculate!r}"
            )
        for name in ("max_running", "max_waiting", "gamma"):
            if getattr(self, name) < 1:
                raise RequestError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_batch_tokens <= self.max_running:
            raise RequestError(
                f"max_batch_tokens ({self.max_batch_tokens}) must exceed max_running ({self.max_running}): "
                "each step's budget holds one token per running request plus a prefill chunk"
            )


def default_kv_capacity(engine: Engine, max_running: int) -> int:
    """KV tokens for ``max_running`` full context windows, or ``KV_MEMORY_FRACTION`` of the free memory."""
    specs = [r.artifact.spec for r in engine.runners]
    device = engine.target.device
    if device.dlpack_device_type() == tvm.cpu().dlpack_device_type():  # (the PoCL device too)
        free = _available_host_memory()
    else:
        free = device.total_global_memory - sum(s.param_bytes for s in specs)
    per_token = sum(s.kv_bytes_per_token for s in specs)
    tokens = min(
        max_running * engine.config.context_window,
        int(KV_MEMORY_FRACTION * max(free, 0) / per_token),
        min(r.max_pages for r in engine.runners) * PAGE_SIZE,
    )
    return max(PAGE_SIZE, tokens // PAGE_SIZE * PAGE_SIZE)


def _available_host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class _Scores:
    """SnapKV scores of the admitted requests' prompts (kept to rebuild a view at another budget)."""

    def __init__(self) -> None:
        self.snapkv_scores: dict[tuple[int, int], np.ndarray] = {}

    def forget(self, seq_id: int) -> None:
        for key in [k for k in self.snapkv_scores if k[0] == seq_id]:
            del self.snapkv_scores[key]


class ServingEngine:
    """A continuous batch over one ``Engine``'s compiled model; drive it with ``step`` (one thread)."""

    def __init__(
        self, engine: Engine, config: ServeConfig | None = None, metrics: ServeMetrics | None = None
    ):
        config = config or ServeConfig()
        config.validate()
        self.engine, self.config = engine, config
        self.metrics = metrics or ServeMetrics()
        self.stats = GenerationStats()
        self.draft_kind = config.draft or engine.default_draft()
        self.default_budget = config.draft_budget or engine.default_budget()
        try:
            DraftSettings(self.draft_kind, self.default_budget).validate(engine.config.context_window)
        except ValueError as e:
            raise RequestError(str(e)) from None
        self._policy: AutoPolicy | None = None
        if config.speculate == "auto":
            self.policy()  # calibrate before the pool takes the memory
        capacity = config.kv_capacity or default_kv_capacity(engine, config.max_running)
        pages = -(-capacity // PAGE_SIZE)
        pools = [runner.ensure_pool(pages, pages) for runner in engine.runners]
        self.scheduler = Scheduler(pools, config.max_running, self._on_preempt)
        self._scores = _Scores()
        self._prefill_s = 0.0
        self._sinks: dict[str, Sink] = {}
        self._inbox: list[tuple[str, object]] = []
        self._lock = threading.Lock()
        self._queued = 0  # submitted and never admitted
        self._ids = itertools.count()
        self.wake = threading.Event()  # set when the inbox gets something

    @property
    def kv_capacity(self) -> int:
        return self.scheduler.num_pages * PAGE_SIZE

    # ---------------------------------------------------------------------------------------------
    # Thread-safe entry points

    def submit(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig,
        sink: Sink,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; its outputs go to ``sink`` (called from the loop's thread). Raises
        ``RequestError`` (one line) for a request that can never be served, ``QueueFull`` when full."""
        ctx, vocab = self.engine.config.context_window, self.engine.config.vocab_size
        config.validate(ctx)
        ids = self.engine.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"the prompt has token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(ids) + config.max_tokens > ctx:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; with max_tokens={config.max_tokens} it exceeds the "
                f"context window of {ctx}; shorten the prompt or lower max_tokens"
            )
        if self.scheduler.pages_for(len(ids) + config.max_tokens) > self.scheduler.num_pages:
            raise RequestError(
                f"the prompt and max_tokens need {len(ids) + config.max_tokens} KV slots, more than the "
                f"whole pool of {self.kv_capacity}; lower max_tokens or serve with a larger --kv-capacity"
            )
        mode = config.speculate or self.config.speculate
        budget = config.draft_budget or self.default_budget
        if mode != "off":
            try:
                DraftSettings(self.draft_kind, budget).validate(ctx)
            except ValueError as e:
                raise RequestError(str(e)) from None
        seed = None if config.seed is None else [config.seed, 0]  # as Engine.generate seeds one prompt
        with self._lock:
            if self._queued >= self.config.max_waiting:
                raise QueueFull(
                    f"the queue is full ({self.config.max_waiting} waiting requests); retry later"
                )
            self._queued += 1
            seq_id = next(self._ids)
            request_id = request_id or f"req-{seq_id}"
            stop_ids = frozenset() if config.ignore_eos else frozenset(self.engine.config.eos_token_ids)
            seq = SequenceState(
                seq_id,
                ids,
                config.sampling,
                np.random.default_rng(seed),
                config.max_tokens,
                stop_token_ids=stop_ids,
            )
            seq.draft = DraftSettings(self.draft_kind, budget)
            r = ServeRequest(request_id, config, seq, TextStream(self.engine.tokenizer, config.stop), mode)
            self._inbox.append(("add", (r, sink)))
        self.wake.set()
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request; its sink gets a final output with finish reason ``"abort"``."""
        with self._lock:
            self._inbox.append(("abort", request_id))
        self.wake.set()

    @property
    def has_work(self) -> bool:
        s = self.scheduler
        return bool(self._inbox or s.waiting or s.prefilling or s.running)

    # ---------------------------------------------------------------------------------------------
    # The step

    def step(self) -> None:
        """One step of the loop (see the module docstring). A failure inside fails the admitted requests
        with a one-line error and leaves the loop serving."""
        self._take_inbox()
        self._prefill_s = 0.0  # this step's prefill chunk, which the round's choice weighs
        try:
            self._admit()
            self._prefill()
            self._decode()
        except Exception as e:  # noqa: BLE001 - an engine bug must not take down the server
            for r in [*self.scheduler.prefilling, *self.scheduler.running]:
                self._finish(r, "error", f"internal error: {' '.join(str(e).split())[:300]}")
        self._gauges()

    def run_until_idle(self, max_steps: int | None = None) -> None:
        """Step until nothing is queued or running (tests and offline use)."""
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_work:
                return
            self.step()

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            self.wake.clear()
        for kind, item in inbox:
            if kind == "add":
                r, sink = item
                self._sinks[r.request_id] = sink
                self.scheduler.waiting.append(r)
            elif (r := self.scheduler.find(item)) is not None:
                self._finish(r, "abort")

    def _admit(self) -> None:
        for r in self.scheduler.admit():
            if r.timeline.admitted is None:
                r.timeline.admitted = time.perf_counter()
                with self._lock:
                    self._queued -= 1

    def _prefill(self) -> None:
        """One chunk of prompt tokens over the prefilling requests, first admitted first."""
        budget = self.config.max_batch_tokens - len(self.scheduler.running)
        chunk: list[tuple[ServeRequest, decoding.PrefillPiece]] = []
        for r in self.scheduler.prefilling:
            if budget <= 0:
                break
            take = min(len(r.prefix) - r.prefilled, budget)
            chunk.append(
                (
                    r,
                    decoding.PrefillPiece(
                        r.seq.seq_id, r.prefix[r.prefilled : r.prefilled + take], r.prefilled
                    ),
                )
            )
            budget -= take
        if not chunk:
            return
        t0 = time.perf_counter()
        pieces = [piece for _, piece in chunk]
        for runner in reversed(self.engine.runners):  # the target last: its logits give first tokens
            logits = decoding.prefill(runner, pieces)
        self._prefill_s = time.perf_counter() - t0
        self.metrics.step_seconds.labels("prefill").observe(self._prefill_s)
        self.metrics.prompt_tokens.inc(sum(len(p.tokens) for p in pieces))
        for row, (r, piece) in enumerate(chunk):
            r.prefilled = piece.end
            if r.prefill_done:
                self._start(r, logits[row])

    def _start(self, r: ServeRequest, logits: np.ndarray) -> None:
        """``r``'s prefill ended: its first token (unless it is resuming) and its draft view."""
        seq = r.seq
        seq.draft_len = len(r.prefix)
        if not seq.output:
            decoding.append(seq, decoding.choose(self.engine.target, [seq], logits[None]))
            r.timeline.first_token = time.perf_counter()
        if seq.acceptance is None:  # the policy weighs every running sequence
            curve = self._policy.acceptance_curve if self._policy else prior_curve
            seq.acceptance = Acceptance(curve, seq.draft.budget)
        self.scheduler.promote(r)
        self._emit(r)

    def _decode(self) -> None:
        """One plain step or speculative round for the running batch."""
        batch = list(self.scheduler.running)
        if not batch:
            return
        choice = self._choose(batch)
        plan = {r.request_id: self._gamma(r, choice) for r in batch}
        for r in batch:  # room for this round, oldest first; the newest are preempted if the pool is full
            if r in self.scheduler.running:
                self.scheduler.grow(r, len(r.seq.tokens) + plan[r.request_id])
        batch = [r for r in batch if r in self.scheduler.running]
        if not batch:
            return
        seqs, gammas = [r.seq for r in batch], [plan[r.request_id] for r in batch]
        contexts = [len(s.tokens) for s in seqs]
        self.metrics.decode_batch.observe(len(seqs))
        if max(gammas) == 0:
            seconds = decoding.plain_step(self.engine.target, self.engine.drafter, seqs, self.stats)
            self.metrics.plain_steps.inc()
            self.metrics.step_seconds.labels("decode").observe(seconds)
            if choice is not None and choice.gamma == 0:
                self._policy.observe(choice, len(seqs), round(np.mean(contexts)), (seconds,))
        else:
            self._prepare_views([r for r, g in zip(batch, gammas) if g], choice)
            static_pos, static_len = pack_views([s.view for s, g in zip(seqs, gammas) if g])
            before = [len(s.output) for s in seqs]
            drafted, accepted = self.stats.drafted_tokens, self.stats.accepted_tokens
            t_draft, t_verify = decoding.speculative_round(
                self.engine.target, self.engine.drafter, seqs, gammas, static_pos, static_len, self.stats
            )
            gained = sum(len(s.output) - b for s, b, g in zip(seqs, before, gammas) if g)
            self.metrics.observe_round(
                self.stats.drafted_tokens - drafted,
                self.stats.accepted_tokens - accepted,
                gained,
                sum(1 for g in gammas if g),
            )
            self.metrics.step_seconds.labels("draft").observe(t_draft)
            self.metrics.step_seconds.labels("verify").observe(t_verify)
            if choice is not None and choice.gamma and all(g in (0, choice.gamma) for g in gammas):
                self._policy.observe(choice, len(seqs), round(np.mean(contexts)), (t_draft, t_verify))
        for r in batch:
            self._emit(r)

    # ---------------------------------------------------------------------------------------------
    # Speculation settings per round

    def policy(self) -> AutoPolicy:
        """The automatic policy (calibrated on first use: cached per machine)."""
        if self._policy is None:
            ctx = self.engine.config.context_window
            budgets = tuple(k for k in AUTO_BUDGETS if k < ctx // 2) or (self.default_budget,)
            self._policy = AutoPolicy.calibrated(
                self.engine, self.engine.drafter.cost_model(), range(1, AUTO_MAX_GAMMA + 1), budgets
            )
        return self._policy

    def _choose(self, batch: list[ServeRequest]) -> Choice | None:
        """The policy's choice for the batch, if a request follows it."""
        if not any(r.speculate == "auto" for r in batch):
            return None
        seqs = [r.seq for r in batch]
        contexts = [len(s.tokens) for s in seqs]
        return self.policy().choose(contexts, [s.acceptance for s in seqs], self._prefill_s)

    def _gamma(self, r: ServeRequest, choice: Choice | None) -> int:
        """``r``'s draft tokens this round (0: a plain step), within its context window and ``max_tokens``."""
        if r.speculate == "off" or (r.speculate == "auto" and (choice is None or choice.gamma == 0)):
            return 0
        gamma = r.config.gamma or (choice.gamma if choice is not None and choice.gamma else self.config.gamma)
        seq = r.seq
        room = min(
            self.engine.config.context_window - len(seq.tokens), seq.max_new_tokens - len(seq.output) - 1
        )
        return max(0, min(gamma, room))

    def _prepare_views(self, drafting: list[ServeRequest], choice: Choice | None) -> None:
        """Build the views of requests drafting for the first time, and rebuild those whose budget changed
        (the policy's, on ``auto``), in one call. A view is built when first needed, so a request that
        never drafts never pays for one (SnapKV scores its prompt's last window then: the prompt's KV is
        still the same)."""
        build = []
        for r in drafting:
            seq = r.seq
            want = r.config.draft_budget or (
                choice.budget
                if r.speculate == "auto" and choice is not None and choice.gamma
                else seq.draft.budget
            )
            if want != seq.draft.budget:
                seq.draft = dataclasses.replace(seq.draft, budget=want)
                seq.acceptance.budget = want
                build.append(seq)
            elif seq.view is None:
                build.append(seq)
        if build:
            t0 = time.perf_counter()
            self.engine.drafter.build_views(build, self._scores)
            self.metrics.step_seconds.labels("views").observe(time.perf_counter() - t0)

    # ---------------------------------------------------------------------------------------------
    # Results

    def _emit(self, r: ServeRequest) -> None:
        """Send ``r``'s new tokens and text; finish it if it hit EOS, a stop string or ``max_tokens``."""
        seq = r.seq
        new = seq.output[r.sent_tokens :]
        r.sent_tokens = len(seq.output)
        r.text.push(new)
        self.metrics.generated_tokens.inc(len(new))
        if r.finished:
            reason = "length" if seq.finish_reason == "length" and not r.text.stopped else "stop"
            self._finish(r, reason, new=new)
        elif new:
            self._send(r, RequestOutput(r.request_id, r.text.delta(), new))

    def _finish(
        self, r: ServeRequest, reason: str, error: str | None = None, new: Sequence[int] = ()
    ) -> None:
        self.scheduler.release(r)
        self._scores.forget(r.seq.seq_id)
        r.timeline.finished = time.perf_counter()
        if r.timeline.admitted is None:
            with self._lock:
                self._queued -= 1
        self.metrics.requests.labels(reason).inc()
        usage = Usage(len(r.seq.prompt), len(r.seq.output))
        out = RequestOutput(r.request_id, r.text.delta(final=True), list(new), reason, usage, error)
        out.timing = {**r.timeline.seconds(), "preemptions": r.preemptions}
        self._send(r, out)
        self._sinks.pop(r.request_id, None)

    def _send(self, r: ServeRequest, out: RequestOutput) -> None:
        sink = self._sinks.get(r.request_id)
        if sink is not None:
            sink(out)

    def _on_preempt(self, r: ServeRequest) -> None:
        self.metrics.preemptions.inc()
        r.seq.draft_len = 0

    def _gauges(self) -> None:
        s, m = self.scheduler, self.metrics
        m.running.set(len(s.prefilling) + len(s.running))
        m.waiting.set(len(s.waiting) + len(self._inbox))
        m.kv_pages_used.set(s.used_pages)
        m.kv_pages_free.set(s.free_pages)
