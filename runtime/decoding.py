"""One decoding round over a batch of sequences: a plain step, or a speculative round (draft, verify, keep).

The static ``Engine`` and the serving loop both decode through these functions. A round takes the
sequences that run in it; each sequence carries its own sampling parameters, stop tokens and, in a
speculative round, its own gamma (0: it takes a plain step inside the round's verification pass).

Logits stay on the device: the artifact's sampling functions (``compile.sampling``) pick the tokens and verify
the drafts there, from uniforms that each sequence's generator draws on the host in the order of
``runtime.sampling``'s reference, so only token ids and accepted counts come back.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import tvm

from .drafter import Drafter, sampling_params
from .runner import ModelRunner
from .sequences import GenerationStats, SequenceState


@dataclasses.dataclass(frozen=True)
class PrefillPiece:
    """Prompt tokens ``tokens`` of sequence ``seq_id`` at positions ``start``.. (its pages reserved)."""

    seq_id: int
    tokens: Sequence[int]
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def prefill(runner: ModelRunner, pieces: Sequence[PrefillPiece]) -> np.ndarray:
    """One prefill call over the pieces (one each of different sequences); commits their KV and returns the
    logits at each piece's last position, ``[len(pieces), vocab]``."""
    lengths = [len(p.tokens) for p in pieces]
    logits = runner.forward(
        "prefill",
        np.concatenate([np.asarray(p.tokens, dtype=np.int64) for p in pieces]),
        np.repeat(np.arange(len(pieces)), lengths),
        np.concatenate([np.arange(p.start, p.end) for p in pieces]),
        [p.seq_id for p in pieces],
        (np.cumsum(lengths) - 1).astype(np.int32),
    )
    for p in pieces:
        runner.pages.set_length(p.seq_id, p.end)
    return logits


def choose(
    runner: ModelRunner, requests: Sequence[SequenceState], logits: tvm.runtime.Tensor | np.ndarray
) -> np.ndarray:
    """Sample (or argmax) one token per request from ``logits[len(requests), vocab]``, on the device."""
    if all(r.params.greedy for r in requests):
        return runner.to_host(runner.call("argmax", logits)).astype(np.int64)
    probs = runner.call("probs", logits, *sampling_params(requests))
    u = np.array([0.0 if r.params.greedy else r.rng.random() for r in requests])
    return runner.to_host(runner.call("sample", probs, u)).astype(np.int64)


def append(r: SequenceState, new_tokens: Sequence[int]) -> int:
    """Add generated tokens to ``r`` up to a stop token or its limit; returns how many were kept."""
    kept = 0
    for t in new_tokens:
        r.output.append(int(t))
        kept += 1
        if int(t) in r.stop_token_ids:
            r.finish_reason = "eos"
            break
        if len(r.output) >= r.max_new_tokens:
            r.finish_reason = "length"
            break
    return kept


def plain_step(
    target: ModelRunner, drafter: Drafter, active: Sequence[SequenceState], stats: GenerationStats
) -> float:
    """One target decode step for every active sequence; returns its seconds."""
    positions = np.array([len(r.tokens) - 1 for r in active])
    tokens = np.array([r.tokens[-1] for r in active])
    t0 = time.perf_counter()
    logits = target.forward_device(
        "decode", tokens, np.arange(len(active)), positions, [r.seq_id for r in active]
    )
    chosen = choose(target, active, logits)
    seconds = time.perf_counter() - t0
    stats.decode_seconds += seconds
    stats.decode_steps += 1
    for r, tok, p in zip(active, chosen, positions):
        target.pages.set_length(r.seq_id, int(p) + 1)
        drafter.after_plain_step(r, int(p) + 1)
        append(r, [tok])
    return seconds


def speculative_round(
    target: ModelRunner,
    drafter: Drafter,
    active: Sequence[SequenceState],
    gammas: Sequence[int],
    static_pos: np.ndarray,
    static_len: np.ndarray,
    stats: GenerationStats,
) -> tuple[float, float]:
    """Draft ``gammas[b]`` tokens for each active sequence, verify them all in one target pass and keep the
    accepted ones (a sequence with gamma 0 takes a plain step in that pass).

    ``static_pos``/``static_len`` are the packed views of the drafting sequences (gamma > 0), in order.
    Returns the seconds spent drafting and verifying.
    """
    gammas = np.asarray(gammas, dtype=np.int64)
    committed = np.array([len(r.tokens) - 1 for r in active])  # KV is committed up to the pending token
    drafting = np.flatnonzero(gammas > 0)
    most = int(gammas.max())
    t0 = time.perf_counter()
    tokens, q = drafter.draft(
        [active[b] for b in drafting], committed[drafting], gammas[drafting], static_pos, static_len
    )
    t1 = time.perf_counter()
    drafted = [np.empty(0, np.int64)] * len(active)
    for row, b in enumerate(drafting):
        drafted[b] = tokens[row, : gammas[b]]
    verify_tokens = np.concatenate([[r.tokens[-1], *d] for r, d in zip(active, drafted)])
    seq_rows = np.repeat(np.arange(len(active)), gammas + 1)
    positions = np.concatenate([c + np.arange(g + 1) for c, g in zip(committed, gammas)])
    logits = target.forward_device("verify", verify_tokens, seq_rows, positions, [r.seq_id for r in active])
    starts = np.concatenate([[0], np.cumsum(gammas + 1)])
    accepted, next_tokens = verify(target, active, drafted, logits, verify_tokens, starts, q)
    t2 = time.perf_counter()
    stats.draft_seconds += t1 - t0
    stats.verify_seconds += t2 - t1
    stats.draft_steps += most  # the longest draft sets the round's draft calls
    stats.verify_steps += 1
    stats.decode_seconds += t2 - t0
    stats.decode_steps += 1
    for b, r in enumerate(active):
        gamma, n_acc, nxt = int(gammas[b]), int(accepted[b]), int(next_tokens[b])
        kept = append(r, [*drafted[b][:n_acc], nxt])
        target.pages.set_length(r.seq_id, int(committed[b]) + kept)
        if gamma == 0:
            drafter.after_plain_step(r, int(committed[b]) + kept)
            continue
        drafter.after_verify(r, int(committed[b]), kept, n_acc, gamma)
        r.accepted_lengths.append(n_acc + 1)
        if r.acceptance is not None:
            r.acceptance.observe(n_acc, gamma)
        stats.drafted_tokens += gamma
        stats.accepted_tokens += n_acc
    return t1 - t0, t2 - t1


def verify(
    target: ModelRunner,
    active: Sequence[SequenceState],
    drafted: Sequence[np.ndarray],
    logits: tvm.runtime.Tensor,
    verify_tokens: np.ndarray,
    starts: np.ndarray,
    q: tvm.runtime.Tensor | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's accepted drafts and next token from the verify pass's ``logits``, on the device:
    greedy prefix matching when every sequence is greedy, else rejection sampling against the drafts'
    probabilities ``q`` (one-hot for a greedy sequence, which makes it exact greedy verification)."""
    if all(r.params.greedy for r in active):
        accepted, next_tokens = target.call("greedy_verify", logits, verify_tokens, starts)
        return target.to_host(accepted), target.to_host(next_tokens)
    gammas = np.diff(starts) - 1
    temperature, top_p = (np.repeat(a, gammas + 1) for a in sampling_params(active))
    p = target.call("probs", logits, temperature, top_p)
    if q is None:  # every drafting sequence is greedy: their drafts' probabilities are one-hot
        flat = np.concatenate([np.zeros(0, np.int64), *drafted])
        one_hot = np.zeros((len(flat), target.cfg.vocab_size), np.float32)
        one_hot[np.arange(len(flat)), flat] = 1.0
        q = tvm.runtime.tensor(one_hot, target.device)
    # the reference's draws for each sequence: its accept tests, then its next token
    u_accept = np.concatenate(
        [np.zeros(g) if r.params.greedy else r.rng.random(g) for r, g in zip(active, gammas)]
    )
    u_next = np.array([0.0 if r.params.greedy else r.rng.random() for r in active])
    accepted, next_tokens = target.call("rejection_verify", p, q, verify_tokens, starts, u_accept, u_next)
    return target.to_host(accepted), target.to_host(next_tokens)
