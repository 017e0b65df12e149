"""The drafter of speculative decoding: who proposes ``gamma`` tokens a round, and whose KV it reads.

Two kinds, one interface:

- ``SelfDrafter``: MagicDec's self-speculation. The target's own weights attend through a compressed view
  (StreamingLLM or SnapKV) of the target's KV pool, so its KV is always the target's committed KV.
- ``ModelDrafter``: a separate small model with the target's tokenizer and its own pool, whose KV holds
  what it has drafted from; after a round it keeps the KV of the accepted drafts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import tvm

from . import costmodel as cm
from .runner import ModelRunner
from .sequences import ScoreCache, SequenceState
from .views import snapkv_view, streaming_view


def snapkv_scores(runner: ModelRunner, sequences: Sequence[SequenceState]) -> dict[int, np.ndarray]:
    """Each sequence's SnapKV scores (``[layers, kv_heads, prompt]``): its prompt's last ``draft.window``
    tokens attend to the whole prompt, on the device."""
    toks, rows, pos = [], [], []
    for row, r in enumerate(sequences):
        start = len(r.prompt) - r.draft.window
        toks.append(r.prompt[start:])
        rows.append(np.full(r.draft.window, row))
        pos.append(np.arange(start, len(r.prompt)))
    scores = runner.forward(
        "snapkv_scores",
        np.concatenate(toks),
        np.concatenate(rows),
        np.concatenate(pos),
        [r.seq_id for r in sequences],
    )
    return {r.seq_id: scores[:, row] for row, r in enumerate(sequences)}


def sampling_params(sequences: Sequence[SequenceState]) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's temperature and top-p, as the device's sampling functions take them."""
    return (
        np.array([r.params.temperature for r in sequences], np.float32),
        np.array([r.params.top_p for r in sequences], np.float32),
    )


class Drafter(ABC):
    """Drafts through ``runner``'s ``draft`` function over compressed views of its pool."""

    owns_pool: bool  # whether it has a pool of its own (to reserve, prefill and release with the target's)

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    @abstractmethod
    def cost_model(self) -> cm.Draft:
        """How the cost model sees this drafter."""

    @abstractmethod
    def after_plain_step(self, r: SequenceState, committed: int) -> None:
        """The target committed ``committed`` tokens of ``r`` in a plain step."""

    @abstractmethod
    def after_verify(self, r: SequenceState, committed: int, kept: int, accepted: int, gamma: int) -> None:
        """A round of ``gamma`` drafts for ``r`` from ``committed`` tokens accepted ``accepted`` of them and
        kept ``kept`` tokens (the accepted ones and the target's next, up to EOS or the limit)."""

    def build_views(self, sequences: Sequence[SequenceState], batch: ScoreCache) -> None:
        """After prefill: each sequence's compressed view (SnapKV scores its prompt's last window on the
        device, once per batch and window)."""
        c = self.runner.cfg
        snap = [
            r
            for r in sequences
            if r.draft.kind == "snapkv"
            and len(r.prompt) > r.draft.window
            and (r.seq_id, r.draft.window) not in batch.snapkv_scores
        ]
        if snap:
            for seq_id, scores in snapkv_scores(self.runner, snap).items():
                batch.snapkv_scores[seq_id, next(r.draft.window for r in snap if r.seq_id == seq_id)] = scores
        for r in sequences:
            if r.draft.kind == "streamingllm":
                r.view = streaming_view(r.draft, len(r.prompt), c.num_layers, c.num_kv_heads)
            else:
                scores = batch.snapkv_scores.get((r.seq_id, r.draft.window))
                r.view = snapkv_view(r.draft, len(r.prompt), scores, c.num_layers, c.num_kv_heads)

    def draft(
        self,
        active: Sequence[SequenceState],
        committed: np.ndarray,
        gammas: np.ndarray,
        static_pos: np.ndarray,
        static_len: np.ndarray,
    ) -> tuple[np.ndarray, tvm.runtime.Tensor | None]:
        """``gammas[b]`` draft steps for each active sequence: tokens ``[B, max(gammas)]`` (row ``b`` valid up
        to ``gammas[b]``) and, unless every sequence is greedy, their probabilities on the device,
        ``[sum(gammas), vocab]``: each sequence's drafts in order, sequence after sequence.

        The first step also feeds the drafter any committed token it has no KV for yet (a separate draft model
        never saw the last drafted token when all were accepted), so it may take two tokens for a sequence.
        """
        runner = self.runner
        gammas = np.asarray(gammas, dtype=np.int64)
        batch, vocab, most = len(active), runner.cfg.vocab_size, int(gammas.max())
        tokens = np.zeros((batch, most), dtype=np.int64)
        first_q = np.concatenate([[0], np.cumsum(gammas)])  # each sequence's first row of q
        greedy = all(r.params.greedy for r in active)
        q = None if greedy else tvm.runtime.empty((int(first_q[-1]), vocab), "float32", runner.device)
        temperature, top_p = sampling_params(active)
        window_start = np.array([r.view.window_start(int(n)) for r, n in zip(active, committed)], np.int32)
        feed = [r.tokens[r.draft_len :] for r in active]
        rows = np.concatenate([np.full(len(f), b) for b, f in enumerate(feed)])
        positions = np.concatenate([np.arange(r.draft_len, len(r.tokens)) for r in active])
        current = np.concatenate(feed)
        live = np.arange(batch)  # the sequences still drafting
        for i in range(most):
            logits = runner.forward_device(
                "draft",
                current,
                rows,
                positions,
                [active[b].seq_id for b in live],
                static_pos[live],
                static_len[live],
                window_start[live],
            )
            last = np.cumsum(np.bincount(rows, minlength=len(live))) - 1  # each sequence's last token row
            if q is None:
                tokens[live, i] = runner.to_host(runner.call("argmax", logits))[last]
            else:
                seq = live[rows]
                probs = runner.call("probs", logits, temperature[seq], top_p[seq])
                u = np.zeros(len(rows))
                for row, b in zip(last, live):
                    if not active[b].params.greedy:
                        u[row] = active[b].rng.random()
                tokens[live, i] = runner.to_host(runner.call("sample", probs, u))[last]
                for row, b in zip(last, live):
                    runner.copy_row(q, int(first_q[b]) + i, probs, int(row))
            live = live[gammas[live] > i + 1]
            current, rows, positions = tokens[live, i], np.arange(len(live)), committed[live] + i + 1
        return tokens, q


class SelfDrafter(Drafter):
    """The target drafting for itself through a compressed view of its own pool (MagicDec)."""

    owns_pool = False

    def cost_model(self) -> cm.Draft:
        return cm.SELF_DRAFT

    def after_plain_step(self, r: SequenceState, committed: int) -> None:
        r.draft_len = committed

    def after_verify(self, r: SequenceState, committed: int, kept: int, accepted: int, gamma: int) -> None:
        r.draft_len = committed + kept  # the target's pool is the draft's


class ModelDrafter(Drafter):
    """A separate small model with its own pool."""

    owns_pool = True

    def cost_model(self) -> cm.Draft:
        a = self.runner.artifact
        return cm.Draft(a.spec)

    def after_plain_step(self, r: SequenceState, committed: int) -> None:
        pass  # its own KV catches up in the next round: the first draft step feeds what it has not seen

    def after_verify(self, r: SequenceState, committed: int, kept: int, accepted: int, gamma: int) -> None:
        # its KV is valid for the tokens it drafted from that were accepted
        r.draft_len = committed + min(gamma, accepted + 1)
        self.runner.pages.set_length(r.seq_id, r.draft_len)
