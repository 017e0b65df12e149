"""MagicDec's speedup formulas and the planner: gamma and budget, critical sequence length, plans."""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ...compile.config import ModelConfig
from .hardware import DEFAULT_BUDGETS, DEFAULT_GAMMAS, DEFAULT_MAX_LENGTH, CostModelError, Hardware
from .spec import SELF_DRAFT, Draft, ModelSpec, as_spec
from .steps import _check_positive, fits, t_draft, t_target, t_verify

# ------------------------------------------------------------------------------------------------------
# Speculation arithmetic


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise CostModelError(f"acceptance rate must be within [0, 1], got {alpha}")


def omega(gamma: int, alpha: float) -> float:
    """``Omega = (1 - alpha^(gamma+1)) / (1 - alpha)``: expected tokens per iteration, bonus included.

    Summed as ``1 + alpha + ... + alpha^gamma``: the same value, exact at ``alpha = 1`` (``gamma + 1``) and
    continuous near it (no cancellation in ``1 - alpha``).
    """
    _check_alpha(alpha)
    if gamma < 0:
        raise CostModelError(f"gamma must be at least 0, got {gamma}")
    return math.fsum(alpha**i for i in range(gamma + 1))


def t_sd(gamma: int, t_d: float, t_v: float, accepted_length: float, round_s: float = 0.0) -> float:
    """``T_SD = (gamma * T_D + T_V + round_s) / accepted_length``: time per generated token with
    speculation; ``round_s`` is the hardware's fixed cost per round (``Hardware.round_s``)."""
    if accepted_length <= 0:
        raise CostModelError(f"accepted length must be positive, got {accepted_length}")
    return (gamma * t_d + t_v + round_s) / accepted_length


def speedup(
    model: ModelSpec | ModelConfig,
    hw: Hardware,
    batch: int,
    context: int,
    gamma: int,
    alpha: float,
    budget: int,
    draft: Draft = SELF_DRAFT,
) -> float:
    """``T_T / T_SD`` with ``accepted_length = Omega(gamma, alpha)``."""
    tt = t_target(model, hw, batch, context)
    td = t_draft(model, hw, batch, budget, context, draft)
    tv = t_verify(model, hw, batch, context, gamma)
    return tt / t_sd(gamma, td, tv, omega(gamma, alpha), hw.round_s)


def _best_speedup(model, hw, batch, context, gammas, alpha, budget, draft) -> float:
    return max(speedup(model, hw, batch, context, g, alpha, budget, draft) for g in gammas)


def critical_sequence_length(
    model: ModelSpec | ModelConfig,
    hw: Hardware,
    batch: int,
    alpha: float,
    gamma: int | None = None,
    budget: int = DEFAULT_BUDGETS[0],
    draft: Draft = SELF_DRAFT,
    gammas: Sequence[int] = DEFAULT_GAMMAS,
    max_length: int | None = None,
) -> int | None:
    """Smallest context ``L`` with ``speedup > 1`` (at ``gamma``, or the best of ``gammas``); None if never.

    Powers of two up to ``max_length`` (default: the model's context window) find the first length with a
    speedup; bisection between it and the power below finds the exact length (the speedup rises with
    ``L``: ``T_T`` and ``T_V`` grow with ``L`` at the same rate while ``T_D`` does not).
    """
    m = as_spec(model)
    _check_alpha(alpha)
    cap = max_length or m.config.context_window or DEFAULT_MAX_LENGTH
    gs = [gamma] if gamma is not None else list(gammas)

    def wins(length: int) -> bool:
        return _best_speedup(m, hw, batch, length, gs, alpha, budget, draft) > 1.0

    prev, length = 0, 1
    while True:
        if wins(length):
            break
        if length >= cap:
            return None
        prev, length = length, min(2 * length, cap)
    lo, hi = prev, length  # lo fails (or is 0), hi wins
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if wins(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------------------------------------------
# Acceptance curves and planning

AlphaSource = float | Mapping[int, float] | Callable[[int], float]


def acceptance_curve(points: Mapping[int, float]) -> Callable[[int], float]:
    """``K -> alpha`` through measured points: linear in ``log2 K`` between them, an error outside."""
    if not points:
        raise CostModelError("the acceptance curve has no points")
    for k, a in points.items():
        _check_positive(budget=k)
        _check_alpha(a)
    ks = sorted(points)

    def alpha_at(budget: int) -> float:
        if budget in points:
            return points[budget]
        if not ks[0] < budget < ks[-1]:
            raise CostModelError(
                f"budget {budget} is outside the measured acceptance curve ({ks[0]} to {ks[-1]})"
            )
        i = bisect.bisect(ks, budget)
        k0, k1 = ks[i - 1], ks[i]
        w = (math.log2(budget) - math.log2(k0)) / (math.log2(k1) - math.log2(k0))
        return points[k0] + w * (points[k1] - points[k0])

    return alpha_at


def alpha_function(source: AlphaSource) -> Callable[[int], float]:
    """A ``K -> alpha`` callable from a constant, a measured ``{K: alpha}`` curve, or a callable."""
    if isinstance(source, Mapping):
        return acceptance_curve(source)
    if callable(source):
        return source
    _check_alpha(float(source))
    return lambda _budget: float(source)


def parse_alpha(text: str) -> float | dict[int, float]:
    """``"0.85"`` -> 0.85; ``"256:0.8,512:0.85"`` -> ``{256: 0.8, 512: 0.85}`` (a measured curve)."""
    try:
        if ":" not in text:
            value = float(text)
            _check_alpha(value)
            return value
        curve: dict[int, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            k, a = part.split(":")
            curve[int(k)] = float(a)
    except ValueError as e:
        if isinstance(e, CostModelError):
            raise
        raise CostModelError(
            f"bad --alpha {text!r}; give a rate like 0.85 or budget:rate pairs like 256:0.8,512:0.85"
        ) from None
    acceptance_curve(curve)  # validates
    return curve


@dataclasses.dataclass(frozen=True)
class Plan:
    """The predicted best MagicDec setting for one (batch, context); times in seconds.

    ``t_verify`` and ``speedups`` are per gamma, at the best budget; ``critical_length`` is that of this
    batch at the best budget and the best gamma at each length.
    """

    batch: int
    context: int
    t_target: float
    budget: int
    alpha: float
    t_draft: float
    t_verify: dict[int, float]
    speedups: dict[int, float]
    gamma: int
    speedup: float
    critical_length: int | None
    fits: bool | None = None  # weights and KV fit in the devices' memory (None: memory unknown)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["t_verify"] = {str(g): t for g, t in self.t_verify.items()}
        d["speedups"] = {str(g): s for g, s in self.speedups.items()}
        return d


def best_plan(
    model: ModelSpec | ModelConfig,
    hw: Hardware,
    batch: int,
    context: int,
    alpha_of_budget: AlphaSource,
    budgets: Iterable[int] | None = None,
    gammas: Iterable[int] = DEFAULT_GAMMAS,
    draft: Draft = SELF_DRAFT,
    with_critical_length: bool = True,
) -> Plan:
    """The (gamma, budget) with the highest predicted speedup at this batch and context.

    ``alpha_of_budget``: a constant rate, a measured ``{K: alpha}`` curve or a callable ``K -> alpha``.
    ``budgets`` defaults to the curve's points, or ``DEFAULT_BUDGETS`` for a constant or callable.
    """
    m = as_spec(model)
    alpha_at = alpha_function(alpha_of_budget)
    if budgets is None:
        budgets = sorted(alpha_of_budget) if isinstance(alpha_of_budget, Mapping) else DEFAULT_BUDGETS
    budgets, gammas = list(budgets), list(gammas)
    if not budgets or not gammas:
        raise CostModelError("give at least one budget and one gamma")
    for g in gammas:
        _check_positive(gamma=g)
    tt = t_target(m, hw, batch, context)
    tv = {g: t_verify(m, hw, batch, context, g) for g in gammas}
    best: tuple[float, int, int] | None = None  # (speedup, budget, gamma)
    for k in budgets:
        alpha = alpha_at(k)
        _check_alpha(alpha)
        td = t_draft(m, hw, batch, k, context, draft)
        for g in gammas:
            s = tt / t_sd(g, td, tv[g], omega(g, alpha), hw.round_s)
            if best is None or s > best[0]:
                best = (s, k, g)
    assert best is not None
    s, k, g = best
    alpha = alpha_at(k)
    td = t_draft(m, hw, batch, k, context, draft)
    speedups = {gg: tt / t_sd(gg, td, tv[gg], omega(gg, alpha), hw.round_s) for gg in gammas}
    critical = (
        critical_sequence_length(m, hw, batch, alpha, budget=k, draft=draft, gammas=gammas)
        if with_critical_length
        else None
    )
    memory = fits(m, hw, batch, context, draft, k)
    return Plan(batch, context, tt, k, alpha, td, tv, speedups, g, s, critical, memory)
