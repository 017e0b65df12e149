"""Tests for mlc_magicdec.runtime.sampling against independent oracles (scipy, brute force, enumeration)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import scipy.special
import scipy.stats

from mlc_magicdec.runtime.sampling import (
    SamplingParams,
    probs_from_logits,
    sample,
    verify_greedy,
    verify_greedy_batch,
    verify_rejection,
    verify_rejection_batch,
)

P_MIN = 1e-3  # chi-square tests must not reject at this level
MIN_EXPECTED = 5.0  # cells with fewer expected counts are merged before a chi-square test
N_SAMPLE_DRAWS = 20_000
N_SPEC_TRIALS = 30_000
SIGMAS = 5.0  # tolerance, in binomial standard deviations, for empirical rates
TOL = 1e-12

# Toy language model for the losslessness tests.
VOCAB = 6
N_OUT = 3  # tokens generated per trial
MAX_GAMMA = 3
MAX_PREFIX = N_OUT - 1 + MAX_GAMMA  # longest prefix whose conditional table is ever consulted
PREFIX_OFFSETS = np.cumsum([0] + [VOCAB**k for k in range(MAX_PREFIX + 1)])  # row offset per prefix length
N_PREFIXES = int(PREFIX_OFFSETS[-1])


def _chisquare_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square goodness-of-fit p-value after pooling low-expected cells (expected > 0 only)."""
    observed = np.asarray(observed, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    order = np.argsort(expected)
    obs, exp = observed[order], expected[order]
    # Pool the smallest cells together until the pool reaches MIN_EXPECTED.
    n_pool = int(np.searchsorted(np.cumsum(exp), MIN_EXPECTED)) + 1
    n_pool = max(n_pool, int(np.sum(exp < MIN_EXPECTED)))
    obs = np.concatenate([[obs[:n_pool].sum()], obs[n_pool:]])
    exp = np.concatenate([[exp[:n_pool].sum()], exp[n_pool:]])
    assert len(exp) >= 2, "too few cells for a chi-square test"
    assert np.all(exp >= MIN_EXPECTED)
    return float(scipy.stats.chisquare(obs, exp * (obs.sum() / exp.sum())).pvalue)


class _FixedRng:
    """Stand-in for np.random.Generator whose ``random`` returns preset values in order."""

    def __init__(self, values: list[float]) -> None:
        self._values = list(values)

    def random(self, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        n = int(np.prod(size)) if size is not None else 1
        out, self._values = self._values[:n], self._values[n:]
        assert len(out) == n, "stub rng ran out of values"
        return np.asarray(out, dtype=np.float64).reshape(size if size is not None else ())


# --------------------------------------------------------------------------- SamplingParams


def test_params_validate() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0.7, top_p=0.9, seed=3).validate()
    SamplingParams(temperature=1.0, top_p=1.0).validate()
    for bad in [
        SamplingParams(temperature=-0.1),
        SamplingParams(temperature=float("nan")),
        SamplingParams(temperature=float("inf")),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
        SamplingParams(top_p=float("nan")),
    ]:
        with pytest.raises(ValueError) as info:
            bad.validate()
        assert "\n" not in str(info.value)


def test_params_rng_seeded() -> None:
    params = SamplingParams(temperature=1.0, seed=11)
    assert params.make_rng().random() == params.make_rng().random()
    assert SamplingParams().greedy and not params.greedy


# --------------------------------------------------------------------------- probs_from_logits


def test_temperature_zero_is_argmax_with_lowest_index_ties() -> None:
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-np.inf, -2.0, -1.0, -1.0]], np.float32)
    probs = probs_from_logits(logits, 0.0, 1.0)
    np.testing.assert_array_equal(probs, np.eye(4)[[1, 0, 2]])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 50)).astype(np.float32)
    for top_p in (1.0, 0.3):
        probs = probs_from_logits(logits, 0.0, top_p)
        assert probs.dtype == np.float64
        np.testing.assert_array_equal(probs, np.eye(50)[np.argmax(logits, axis=-1)])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_softmax_without_top_p(temperature: float) -> None:
    rng = np.random.default_rng(1)
    # Large offsets and spread: a naive exp() would overflow.
    logits = (rng.normal(scale=30.0, size=(8, 40)) + 1000.0).astype(np.float32)
    probs = probs_from_logits(logits, temperature, 1.0)
    expected = scipy.special.softmax(logits.astype(np.float64) / temperature, axis=-1)
    np.testing.assert_allclose(probs, expected, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=TOL)


def test_one_dimensional_input_and_tiny_temperature() -> None:
    logits = np.array([0.5, 2.0, -1.0, 1.9], np.float32)
    probs = probs_from_logits(logits, 1.0, 1.0)
    assert probs.shape == (4,)
    np.testing.assert_allclose(probs, scipy.special.softmax(logits.astype(np.float64)), rtol=1e-12)
    cold = probs_from_logits(logits, 1e-8, 1.0)
    assert np.all(np.isfinite(cold))
    np.testing.assert_allclose(cold, np.eye(4)[1], atol=TOL)


def _logits_from_weights(weights: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(weights, dtype=np.float64))


@pytest.mark.parametrize(
    ("weights", "top_p", "kept"),
    [
        ([1, 4, 2, 3], 0.5, [1, 3]),  # 0.4 < 0.5 <= 0.7
        ([1, 4, 2, 3], 0.7, [1, 3]),  # boundary hit exactly: 0.4 + 0.3 == 0.7
        ([1, 4, 2, 3], 0.71, [1, 3, 2]),
        ([1, 4, 2, 3], 1e-9, [1]),  # tiny top_p -> argmax
        ([4, 2, 2, 2], 0.5, [0, 1]),  # tie at the boundary -> lowest index
        ([2, 3, 3, 2], 0.5, [1, 2]),  # tie at the boundary, exact hit
        ([2, 3, 3, 2], 1e-9, [1]),  # tie at the argmax -> lowest index
        ([0, 1, 0, 1], 0.99, [1, 3]),  # zero-probability tokens are never kept
    ],
)
def test_top_p_hand_built(weights: list[int], top_p: float, kept: list[int]) -> None:
    w = np.asarray(weights, dtype=np.float64)
    expected = np.zeros_like(w)
    expected[kept] = w[kept] / w[kept].sum()
    probs = probs_from_logits(_logits_from_weights(w), 1.0, top_p)
    np.testing.assert_allclose(probs, expected, atol=TOL)


def _top_p_oracle(weights: list[int], top_p: Fraction) -> tuple[int, ...]:
    """Brute force: the smallest set with mass >= top_p; among those the heaviest, then lowest indices."""
    total = sum(weights)
    for size in range(1, len(weights) + 1):
        combos = list(itertools.combinations(range(len(weights)), size))
        best = max(sum(weights[i] for i in c) for c in combos)
        if Fraction(best, total) >= top_p:
            return next(c for c in combos if sum(weights[i] for i in c) == best)
    raise AssertionError("unreachable: the full set has mass 1")


def test_top_p_against_brute_force() -> None:
    rng = np.random.default_rng(2)
    fractions = [
        Fraction(1, 10),
        Fraction(1, 4),
        Fraction(1, 3),
        Fraction(1, 2),
        Fraction(3, 5),
        Fraction(2, 3),
        Fraction(3, 4),
        Fraction(9, 10),
        Fraction(1),
    ]
    n_cases, max_weight = 300, 4
    for _ in range(n_cases):
        weights = rng.integers(0, max_weight + 1, size=VOCAB)
        if weights.sum() == 0:
            continue
        top_p = fractions[rng.integers(len(fractions))]
        kept = list(_top_p_oracle(weights.tolist(), top_p))
        expected = np.zeros(VOCAB)
        expected[kept] = weights[kept] / weights[kept].sum()
        probs = probs_from_logits(_logits_from_weights(weights), 1.0, float(top_p))
        np.testing.assert_allclose(probs, expected, atol=TOL, err_msg=f"{weights=} {top_p=}")


def test_per_row_parameters() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(5, 12)).astype(np.float32)
    temps = np.array([0.0, 0.5, 1.0, 2.0, 0.0])
    top_ps = np.array([1.0, 0.9, 0.9, 1.0, 0.3])
    probs = probs_from_logits(logits, temps, top_ps)
    assert probs.shape == (5, 12)
    for row in range(5):
        np.testing.assert_allclose(probs[row], probs_from_logits(logits[row], temps[row], top_ps[row]))
    x = logits.astype(np.float64)
    np.testing.assert_array_equal(probs[0], np.eye(12)[np.argmax(x[0])])
    np.testing.assert_allclose(probs[3], scipy.special.softmax(x[3] / 2.0), rtol=1e-12)
    # Row 2: nucleus of softmax(x) computed independently by sorting.
    full = scipy.special.softmax(x[2])
    order = np.argsort(-full)
    n_keep = int(np.argmax(np.cumsum(full[order]) >= 0.9)) + 1
    expected = np.zeros(12)
    expected[order[:n_keep]] = full[order[:n_keep]] / full[order[:n_keep]].sum()
    np.testing.assert_allclose(probs[2], expected, rtol=1e-12)
    assert 1 < n_keep < 12


def test_probs_from_logits_rejects_bad_input() -> None:
    logits = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError):
        probs_from_logits(logits, -1.0, 1.0)
    with pytest.raises(ValueError):
        probs_from_logits(logits, np.array([1.0, np.nan]), 1.0)
    with pytest.raises(ValueError):
        probs_from_logits(logits, 1.0, np.array([0.5, 0.0]))
    with pytest.raises(ValueError):
        probs_from_logits(np.full((1, 4), -np.inf), 1.0, 1.0)


# --------------------------------------------------------------------------- sample


@pytest.mark.parametrize(("temperature", "top_p"), [(0.5, 1.0), (1.0, 1.0), (2.0, 1.0), (1.0, 0.8)])
def test_sample_matches_distribution(temperature: float, top_p: float) -> None:
    vocab = 12
    logits = np.random.default_rng(4).normal(scale=1.5, size=vocab).astype(np.float32)
    probs = probs_from_logits(logits, temperature, top_p)
    draws = sample(np.broadcast_to(probs, (N_SAMPLE_DRAWS, vocab)), np.random.default_rng(5))
    assert draws.dtype == np.int64 and draws.shape == (N_SAMPLE_DRAWS,)
    counts = np.bincount(draws, minlength=vocab)
    assert np.all(counts[probs == 0] == 0)
    support = probs > 0
    assert _chisquare_pvalue(counts[support], N_SAMPLE_DRAWS * probs[support]) > P_MIN


def test_sample_detects_wrong_distribution() -> None:
    """Power check for the oracle above: draws from a tempered distribution fail against the untempered."""
    logits = np.random.default_rng(4).normal(scale=1.5, size=12)
    draws = sample(
        np.broadcast_to(probs_from_logits(logits, 1.3, 1.0), (N_SAMPLE_DRAWS, 12)), np.random.default_rng(5)
    )
    counts = np.bincount(draws, minlength=12)
    assert _chisquare_pvalue(counts, N_SAMPLE_DRAWS * probs_from_logits(logits, 1.0, 1.0)) < P_MIN


def test_sample_reproducible_and_edges() -> None:
    probs = probs_from_logits(np.random.default_rng(6).normal(size=(1000, 8)), 1.0, 1.0)
    a = sample(probs, np.random.default_rng(7))
    np.testing.assert_array_equal(a, sample(probs, np.random.default_rng(7)))
    assert not np.array_equal(a, sample(probs, np.random.default_rng(8)))
    # Inverse CDF edges: u = 0 skips leading zeros; u -> 1 never returns a trailing zero-probability token.
    edge = np.array([[0.0, 0.3, 0.7, 0.0], [0.5, 0.5, 0.0, 0.0]])
    almost_one = 1.0 - 2.0**-53
    np.testing.assert_array_equal(sample(edge, _FixedRng([0.0, almost_one])), [1, 1])
    np.testing.assert_array_equal(sample(edge, _FixedRng([almost_one, 0.0])), [2, 0])
    assert int(sample(np.array([0.0, 2.0, 0.0]), _FixedRng([0.5]))) == 1  # unnormalized [V] input
    with pytest.raises(ValueError):
        sample(np.array([[0.0, 0.0]]), np.random.default_rng(0))


# --------------------------------------------------------------------------- verify_greedy


@pytest.mark.parametrize(
    ("draft", "target", "expected"),
    [
        ([3, 1, 4], [3, 1, 4, 1], (3, 1)),  # all accepted -> bonus token
        ([3, 1, 4], [2, 1, 4, 1], (0, 2)),  # first rejected
        ([3, 1, 4], [3, 1, 5, 9], (2, 5)),  # middle rejected
        ([3, 1, 4], [3, 7, 4, 1], (1, 7)),  # later matches after a mismatch do not count
        ([], [7], (0, 7)),  # gamma = 0
    ],
)
def test_verify_greedy(draft: list[int], target: list[int], expected: tuple[int, int]) -> None:
    result = verify_greedy(np.array(draft, np.int64), np.array(target, np.int64))
    assert result == expected
    assert all(isinstance(v, int) for v in result)


def test_verify_greedy_batch() -> None:
    draft = np.array([[3, 1, 4], [3, 1, 4], [3, 1, 4]])
    target = np.array([[3, 1, 4, 1], [2, 1, 4, 1], [3, 1, 5, 9]])
    n, nxt = verify_greedy_batch(draft, target)
    np.testing.assert_array_equal(n, [3, 0, 2])
    np.testing.assert_array_equal(nxt, [1, 2, 5])


# --------------------------------------------------------------------------- verify_rejection: unit cases


def test_rejection_one_hot_reduces_to_greedy() -> None:
    rng = np.random.default_rng(9)
    vocab, n_cases, match_prob = 5, 300, 0.7
    eye = np.eye(vocab)
    for case in range(n_cases):
        gamma = case % 5
        target = rng.integers(vocab, size=gamma + 1)
        draft = np.where(rng.random(gamma) < match_prob, target[:gamma], rng.integers(vocab, size=gamma))
        # One-hot rows produced the way the runtime does it: temperature 0.
        p = probs_from_logits(eye[target] + 0.1 * rng.random((gamma + 1, vocab)), 0.0, 1.0)
        q = eye[draft].reshape(gamma, vocab)
        assert verify_rejection(draft, q, p, rng) == verify_greedy(draft, target)


def test_rejection_zero_draft_probability() -> None:
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    # q(x) == 0 < p(x): ratio inf -> always accepted, then the bonus comes from p[1].
    q_zero = np.array([[0.0, 1.0, 0.0]])
    for seed in range(50):
        n, nxt = verify_rejection(np.array([0]), q_zero, p, np.random.default_rng(seed))
        assert n == 1 and nxt in (0, 1, 2)
    # p(x) == q(x) == 0: always rejected; the residual max(p - q, 0) is one-hot at token 2.
    p2 = np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    for seed in range(50):
        assert verify_rejection(np.array([0]), q_zero, p2, np.random.default_rng(seed)) == (0, 2)


def test_rejection_round_off_falls_back_to_target() -> None:
    """p == q up to one ulp at the draft token: a rejection leaves zero residual mass -> sample from p."""
    q = np.array([[0.0, 0.25, 0.5, 0.25]])
    p = np.array([[0.0, 0.25, np.nextafter(0.5, 0.0), 0.25], [1.0, 0.0, 0.0, 0.0]])
    almost_one = 1.0 - 2.0**-53  # u * q(x) == p(x): rejected
    n, nxt = verify_rejection(np.array([2]), q, p, _FixedRng([almost_one, 0.0]))
    assert (n, nxt) == (0, 1)  # u = 0 picks the first token with p > 0


def test_rejection_reproducible_and_batch_consistent() -> None:
    rng = np.random.default_rng(10)
    batch, gamma, vocab = 64, 3, 8
    q = probs_from_logits(rng.normal(size=(batch * gamma, vocab)), 1.0, 1.0).reshape(batch, gamma, vocab)
    p = probs_from_logits(rng.normal(size=(batch * (gamma + 1), vocab)), 1.0, 1.0).reshape(
        batch, gamma + 1, vocab
    )
    draft = rng.integers(vocab, size=(batch, gamma))
    n1, t1 = verify_rejection_batch(draft, q, p, np.random.default_rng(11))
    n2, t2 = verify_rejection_batch(draft, q, p, np.random.default_rng(11))
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_array_equal(t1, t2)
    assert n1.dtype == np.int64 and t1.dtype == np.int64
    assert 0 < n1.mean() < gamma
    single = verify_rejection(draft[0], q[0], p[0], np.random.default_rng(11))
    assert single == verify_rejection(draft[0], q[0], p[0], np.random.default_rng(11))


def test_rejection_single_step_acceptance_and_distribution() -> None:
    """gamma = 1 on one fixed (p, q): acceptance == sum min(p, q), and the emitted token ~ p."""
    p = np.array([0.05, 0.4, 0.3, 0.2, 0.05, 0.0])
    q = np.array([0.4, 0.05, 0.05, 0.1, 0.2, 0.2])  # bad draft, mass where p has none
    n = N_SPEC_TRIALS
    rng = np.random.default_rng(12)
    draft = sample(np.broadcast_to(q, (n, VOCAB)), rng)[:, None]
    n_acc, nxt = verify_rejection_batch(
        draft, np.broadcast_to(q, (n, 1, VOCAB)), np.broadcast_to(p, (n, 2, VOCAB)), rng
    )
    rate = n_acc.mean()
    expected_rate = np.minimum(p, q).sum()
    assert abs(rate - expected_rate) < SIGMAS * np.sqrt(expected_rate * (1 - expected_rate) / n)
    first = np.where(n_acc == 1, draft[:, 0], nxt)
    counts = np.bincount(first, minlength=VOCAB)
    assert counts[p == 0].sum() == 0
    assert _chisquare_pvalue(counts[p > 0], n * p[p > 0]) > P_MIN


# --------------------------------------------------------------------------- verify_rejection: losslessness


def _prefix_rows(lengths: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return PREFIX_OFFSETS[lengths] + codes


def _toy_tables(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Conditional tables p(.|prefix), q(.|prefix) [N_PREFIXES, VOCAB] for every prefix up to MAX_PREFIX."""
    rng = np.random.default_rng(13)
    concentration, bad_power, bad_floor, n_q_zeros = 0.7, 4, 0.02, 3
    p = rng.dirichlet(np.full(VOCAB, concentration), size=N_PREFIXES)
    p[np.arange(N_PREFIXES), rng.integers(VOCAB, size=N_PREFIXES)] = 0.0  # target has zeros too
    p /= p.sum(axis=1, keepdims=True)
    if kind == "mild":
        q = 0.5 * p + 0.5 * rng.dirichlet(np.ones(VOCAB), size=N_PREFIXES)
    elif kind == "bad":  # favours exactly the tokens the target dislikes
        q = (p.max(axis=1, keepdims=True) - p + bad_floor) ** bad_power
    elif kind == "zeros":  # q is zero on half the vocabulary, often where p is large
        q = rng.dirichlet(np.ones(VOCAB), size=N_PREFIXES)
        zero_cols = np.argsort(rng.random((N_PREFIXES, VOCAB)), axis=1)[:, :n_q_zeros]
        np.put_along_axis(q, zero_cols, 0.0, axis=1)
    else:
        raise ValueError(kind)
    return p, q / q.sum(axis=1, keepdims=True)


def _exact_joint(p_tab: np.ndarray) -> np.ndarray:
    """Exact target probability of every N_OUT-token output, by enumeration; indexed by base-VOCAB code."""
    joint = np.zeros(VOCAB**N_OUT)
    for seq in itertools.product(range(VOCAB), repeat=N_OUT):
        prob, code = 1.0, 0
        for length, tok in enumerate(seq):
            prob *= p_tab[PREFIX_OFFSETS[length] + code, tok]
            code = code * VOCAB + tok
        joint[code] = prob
    return joint


Verifier = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _speculative_generate(
    p_tab: np.ndarray,
    q_tab: np.ndarray,
    gamma: int,
    n: int,
    seed: int,
    verify: Verifier = verify_rejection_batch,
) -> tuple[np.ndarray, float]:
    """Run n independent speculative generations of N_OUT tokens; returns (output codes, acceptance rate)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, N_OUT + gamma), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    codes = np.zeros(n, dtype=np.int64)
    n_accepted_total = n_drafted_total = 0
    while (active := np.flatnonzero(lengths < N_OUT)).size:
        m, base_len, base_code = active.size, lengths[active], codes[active]
        draft = np.zeros((m, gamma), dtype=np.int64)
        q = np.zeros((m, gamma, VOCAB))
        p = np.zeros((m, gamma + 1, VOCAB))
        code = base_code.copy()
        for j in range(gamma + 1):
            rows = _prefix_rows(base_len + j, code)
            p[:, j] = p_tab[rows]
            if j < gamma:
                q[:, j] = q_tab[rows]
                draft[:, j] = sample(q[:, j], rng)
                code = code * VOCAB + draft[:, j]
        n_acc, nxt = verify(draft, q, p, rng)
        n_accepted_total += int(n_acc.sum())
        n_drafted_total += m * gamma
        code = base_code
        for j in range(gamma + 1):
            emit = j <= n_acc
            tok = draft[:, j] if j < gamma else nxt
            tok = np.where(j < n_acc, tok, nxt)
            pos = base_len + j
            write = emit & (pos < N_OUT)
            out[active[write], pos[write]] = tok[write]
            code = np.where(emit, code * VOCAB + tok, code)
        lengths[active] = base_len + n_acc + 1
        codes[active] = code
    final = np.zeros(n, dtype=np.int64)
    for k in range(N_OUT):
        final = final * VOCAB + out[:, k]
    return final, n_accepted_total / max(n_drafted_total, 1)


@pytest.mark.parametrize("gamma", [1, 2, 3])
@pytest.mark.parametrize("kind", ["mild", "bad", "zeros"])
def test_rejection_is_lossless(kind: str, gamma: int) -> None:
    p_tab, q_tab = _toy_tables(kind)
    joint = _exact_joint(p_tab)
    outputs, rate = _speculative_generate(p_tab, q_tab, gamma, N_SPEC_TRIALS, seed=100 + gamma)
    counts = np.bincount(outputs, minlength=joint.size)
    assert counts[joint == 0].sum() == 0, "produced a sequence the target can never produce"
    assert _chisquare_pvalue(counts[joint > 0], N_SPEC_TRIALS * joint[joint > 0]) > P_MIN
    assert 0.0 < rate < 1.0
    if kind == "bad":
        root_acceptance = np.minimum(p_tab[0], q_tab[0]).sum()
        assert root_acceptance < 0.5 and rate < 0.5  # rejection + resampling dominate


def test_rejection_acceptance_rate_matches_analytic() -> None:
    """gamma = 1, one step from the empty prefix: the empirical rate equals sum_x min(p, q)."""
    p_tab, q_tab = _toy_tables("bad")
    n = N_SPEC_TRIALS
    rng = np.random.default_rng(14)
    p0, q0 = p_tab[0], q_tab[0]
    draft = sample(np.broadcast_to(q0, (n, VOCAB)), rng)[:, None]
    n_acc, _ = verify_rejection_batch(
        draft, np.broadcast_to(q0, (n, 1, VOCAB)), np.broadcast_to(np.stack([p0, p0]), (n, 2, VOCAB)), rng
    )
    expected = np.minimum(p0, q0).sum()
    assert 0.0 < expected < 1.0
    assert abs(n_acc.mean() - expected) < SIGMAS * np.sqrt(expected * (1 - expected) / n)


def _resample_from_target(
    draft: np.ndarray, q: np.ndarray, p: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A classic bug: on rejection, resample from p instead of the residual max(p - q, 0)."""
    n_acc, _ = verify_rejection_batch(draft, q, p, rng)
    return n_acc, sample(p[np.arange(len(n_acc)), n_acc], rng)


def test_lossless_check_detects_biased_verifier() -> None:
    """Power check: the losslessness statistic rejects a subtly wrong verifier."""
    p_tab, q_tab = _toy_tables("bad")
    joint = _exact_joint(p_tab)
    outputs, _ = _speculative_generate(p_tab, q_tab, 1, N_SPEC_TRIALS, seed=15, verify=_resample_from_target)
    counts = np.bincount(outputs, minlength=joint.size)
    assert _chisquare_pvalue(counts[joint > 0], N_SPEC_TRIALS * joint[joint > 0]) < P_MIN
