"""Host-side sampling and speculative-decoding verification (pure numpy).

Logits arrive as float32 numpy arrays; all probability math is done in float64.
Greedy decoding is ``temperature == 0``; sampling uses temperature plus nucleus (top-p) filtering.
Verification implements MagicDec step 4: greedy prefix matching, or lossless rejection sampling
(accept ``x`` with probability ``min(1, p(x)/q(x))``, else resample from ``normalize(max(p - q, 0))``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "SamplingParams",
    "probs_from_logits",
    "sample",
    "verify_greedy",
    "verify_greedy_batch",
    "verify_rejection",
    "verify_rejection_batch",
]

# Slack when comparing the cumulative top-p mass with ``top_p``: a set whose exact mass equals ``top_p``
# must be kept even if float64 round-off puts its computed mass one ulp below.
_TOP_P_ATOL = 1e-12
# Residual mass below this is float round-off (rejection then has probability < this), so the residual
# distribution is replaced by the target distribution itself.
_MIN_RESIDUAL_MASS = 1e-12


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling configuration."""

    temperature: float = 0.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # nucleus; 1.0 disables
    seed: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` (one-line message) if the parameters are out of range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_rng(self) -> np.random.Generator:
        """A generator seeded with ``seed`` (fresh entropy when ``seed`` is None)."""
        return np.random.default_rng(self.seed)


def _check_params(temperature: np.ndarray, top_p: np.ndarray) -> None:
    if not np.all(np.isfinite(temperature)) or np.any(temperature < 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature.tolist()!r}")
    if not np.all((top_p > 0.0) & (top_p <= 1.0)):
        raise ValueError(f"top_p must be in (0, 1], got {top_p.tolist()!r}")


def _top_p_filter(probs: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Keep, per row, the smallest highest-probability set with mass >= top_p; renormalize.

    Ties are broken toward the lowest token index (stable sort). Operates in place on ``probs`` [B, V].
    """
    rows = np.flatnonzero(top_p < 1.0)
    if rows.size == 0:
        return probs
    sub = probs[rows]
    order = np.argsort(-sub, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(sub, order, axis=-1), axis=-1)
    # Number of tokens strictly needed before reaching top_p, plus the one that reaches it.
    n_keep = np.sum(cum < top_p[rows, None] - _TOP_P_ATOL, axis=-1) + 1
    keep_sorted = np.arange(sub.shape[-1])[None, :] < n_keep[:, None]
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    sub = np.where(keep, sub, 0.0)
    probs[rows] = sub / sub.sum(axis=-1, keepdims=True)
    return probs


def probs_from_logits(
    logits: np.ndarray, temperature: np.ndarray | float, top_p: np.ndarray | float
) -> np.ndarray:
    """Turn logits [B, V] (or [V]) into float64 probabilities with per-row temperature and top-p.

    Rows with temperature 0 are one-hot at the argmax (ties -> lowest index). Other rows get a stable
    softmax of ``logits / T`` followed by top-p filtering (always at least one token) and renormalization.
    """
    logits = np.asarray(logits)
    squeeze = logits.ndim == 1
    x = np.atleast_2d(logits).astype(np.float64)
    if x.ndim != 2 or x.shape[-1] == 0:
        raise ValueError(f"logits must have shape [B, V] or [V] with V > 0, got {logits.shape}")
    n_rows = x.shape[0]
    temp = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (n_rows,))
    tp = np.broadcast_to(np.asarray(top_p, dtype=np.float64), (n_rows,))
    _check_params(temp, tp)

    row_max = x.max(axis=-1, keepdims=True)
    if not np.all(np.isfinite(row_max)):
        raise ValueError("every logits row needs a finite maximum (no NaN, +inf, or all -inf rows)")

    out = np.zeros_like(x)
    greedy = temp == 0.0
    if np.any(greedy):
        g = np.flatnonzero(greedy)
        out[g, np.argmax(x[g], axis=-1)] = 1.0
    s = np.flatnonzero(~greedy)
    if s.size:
        # Subtract the max before dividing so tiny temperatures cannot overflow.
        z = np.exp((x[s] - row_max[s]) / temp[s, None])
        out[s] = _top_p_filter(z / z.sum(axis=-1, keepdims=True), tp[s])
    return out[0] if squeeze else out


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one token per row of ``probs`` [B, V] by exact inverse-CDF sampling; returns int64 [B].

    Rows need not be exactly normalized (each is scaled by its own total); zero-probability tokens are
    never returned. Uses one ``rng.random(B)`` call. A [V] input returns a 0-d array.
    """
    probs = np.asarray(probs, dtype=np.float64)
    squeeze = probs.ndim == 1
    p2 = np.atleast_2d(probs)
    if p2.ndim != 2 or p2.shape[-1] == 0:
        raise ValueError(f"probs must have shape [B, V] or [V] with V > 0, got {probs.shape}")
    cdf = np.cumsum(p2, axis=-1)
    total = cdf[:, -1]
    if np.any(p2 < 0) or not np.all(np.isfinite(total)) or np.any(total <= 0):
        raise ValueError("probs rows must be non-negative and finite with positive total mass")
    # u <= 1 - 2**-53, so fl(u * total) < total under round-to-nearest: some cdf entry exceeds it, and the
    # first such entry (cdf is non-decreasing) always belongs to a token with positive mass.
    u = rng.random(p2.shape[0]) * total
    tokens = np.sum(cdf <= u[:, None], axis=-1).astype(np.int64)  # first index with cdf > u
    return tokens[0] if squeeze else tokens


def verify_greedy_batch(draft_tokens: np.ndarray, target_argmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batched :func:`verify_greedy`: draft [B, gamma], target argmax [B, gamma+1] -> (n [B], next [B])."""
    draft = np.asarray(draft_tokens)
    target = np.asarray(target_argmax)
    n_rows, gamma = draft.shape
    if target.shape != (n_rows, gamma + 1):
        raise ValueError(f"target_argmax must have shape {(n_rows, gamma + 1)}, got {target.shape}")
    mismatch = np.concatenate([draft != target[:, :gamma], np.ones((n_rows, 1), dtype=bool)], axis=1)
    n_accepted = np.argmax(mismatch, axis=1).astype(np.int64)
    next_token = target[np.arange(n_rows), n_accepted].astype(np.int64)
    return n_accepted, next_token


def verify_greedy(draft_tokens: np.ndarray, target_argmax: np.ndarray) -> tuple[int, int]:
    """Accept the longest prefix where draft == target argmax; return (n_accepted, next_token).

    ``next_token`` is the target's token at the first mismatch, or the bonus ``target_argmax[gamma]``.
    """
    n, nxt = verify_greedy_batch(np.asarray(draft_tokens)[None], np.asarray(target_argmax)[None])
    return int(n[0]), int(nxt[0])


def verify_rejection_batch(
    draft_tokens: np.ndarray, q: np.ndarray, p: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Batched :func:`verify_rejection`: draft [B, gamma], q [B, gamma, V], p [B, gamma+1, V].

    Returns (n_accepted int64 [B], next_token int64 [B]). Draws ``rng.random((B, gamma))`` for the
    accept tests, then one ``rng.random(B)`` (via :func:`sample`) for the next tokens.
    """
    draft = np.asarray(draft_tokens, dtype=np.int64)
    q = np.asarray(q, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    n_rows, gamma = draft.shape
    vocab = p.shape[-1]
    if q.shape != (n_rows, gamma, vocab) or p.shape != (n_rows, gamma + 1, vocab):
        raise ValueError(
            f"expected q {(n_rows, gamma, vocab)} and p {(n_rows, gamma + 1, vocab)}, "
            f"got {q.shape} and {p.shape}"
        )
    if np.any((draft < 0) | (draft >= vocab)):
        raise ValueError("draft token out of vocabulary range")

    rows = np.arange(n_rows)
    px = np.take_along_axis(p[:, :gamma], draft[..., None], axis=-1)[..., 0]
    qx = np.take_along_axis(q, draft[..., None], axis=-1)[..., 0]
    u = rng.random((n_rows, gamma))
    # u < p/q without dividing: q == 0 acts as ratio inf (accept iff p > 0); p >= q always accepts.
    accepted = u * qx < px
    reject = np.concatenate([~accepted, np.ones((n_rows, 1), dtype=bool)], axis=1)
    n_accepted = np.argmax(reject, axis=1).astype(np.int64)

    target = p[rows, n_accepted]  # [B, V]; the bonus distribution for fully accepted rows
    rejected = np.flatnonzero(n_accepted < gamma)
    if rejected.size:
        pos = n_accepted[rejected]
        residual = np.maximum(target[rejected] - q[rejected, pos], 0.0)
        mass = residual.sum(axis=-1, keepdims=True)
        target[rejected] = np.where(mass > _MIN_RESIDUAL_MASS, residual, target[rejected])
    return n_accepted, sample(target, rng)


def verify_rejection(
    draft_tokens: np.ndarray, q: np.ndarray, p: np.ndarray, rng: np.random.Generator
) -> tuple[int, int]:
    """Lossless speculative-sampling verification for one sequence; returns (n_accepted, next_token).

    draft_tokens [gamma], q [gamma, V] draft probs, p [gamma+1, V] target probs (same processing).
    Accept x_i with probability min(1, p_i(x)/q_i(x)); at the first rejection sample from
    normalize(max(p_i - q_i, 0)) (falling back to p_i if round-off leaves no mass); if all are accepted,
    sample the bonus from p[gamma]. One-hot p and q reduce exactly to :func:`verify_greedy`.
    """
    n, nxt = verify_rejection_batch(
        np.asarray(draft_tokens)[None], np.asarray(q)[None], np.asarray(p)[None], rng
    )
    return int(n[0]), int(nxt[0])
