"""Automatic speculation: ``gamma="auto"`` and ``budget="auto"``.

Before every round the policy predicts the batch's throughput for plain decoding and for each (gamma,
budget) from

- **step costs**: the cost model (``runtime/costmodel.py``) with this machine's calibrated rates, each phase
  corrected by the median ratio of measured to predicted time over its recent steps (a median, so that one
  step slowed by other load does not flip the choice); and
- **acceptance**: a running estimate of each sequence's acceptance rate ``alpha``.

and picks the fastest::

    plain       = B / T_T(B, L)
    speculative = sum_i Omega(gamma, alpha_i(K)) / (gamma * T_D(B, K) + T_V(B, L, gamma))

where ``L`` is the batch's mean context (the costs are linear in the KV read, so ``B * L`` is exact).
Speculation turns on only when it is predicted to win by a margin (``SPECULATE_GAIN``), and off again when it
is predicted to lose (``STOP_GAIN``); the band between keeps model error from flipping it every round. It
follows real changes: contexts grow, the batch shrinks as sequences finish, acceptance moves.

A round can be part of a longer step: in the serving loop, a prompt chunk of ``S`` seconds is prefilled
before it, and every running request waits for both. Among the settings that pay (as above, so throughput
is never given up), the policy then picks the most tokens per step, ``tokens / (S + round)``: longer drafts,
larger views, that shorten every running request's time per token while a long prompt prefills.

Acceptance of one sequence is the rate of a geometric model: a round accepts drafts until the first
rejection, so ``alpha = accepted / (accepted + rejections)`` (rounds that accept all their drafts add no
rejection). It is kept per budget, each with a prior worth ``PRIOR_TRIALS`` drafted tokens, and old rounds
fade by ``FORGET`` a round. A budget's prior is the sequence's rate at a neighbouring budget moved along the
average curve's shape; above every budget tried it is at least the average prompt's rate, so a prompt that
drafts poorly with a small view still tries a larger one before speculation is given up.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence

from . import calibration
from . import costmodel as cm

AUTO = "auto"
AUTO_MAX_GAMMA = 8  # longest draft the automatic mode considers
AUTO_BUDGETS = (128, 256, 512, 1024, 2048)  # draft budgets it considers (those the context allows)
# Prior acceptance before a sequence has been seen: alpha = 0.85 at 256 KV entries, the rejection rate
# falling by REJECTION_PER_DOUBLING for each doubling of the budget (SnapKV and StreamingLLM on SmolLM2 and
# Austen prompts give 0.88-0.92 at 256-1024; see bench/results/acceptance_4k.txt). A calibration that
# measured acceptance replaces it.
PRIOR_ALPHA = 0.85
PRIOR_BUDGET = 256
REJECTION_PER_DOUBLING = 0.8
PRIOR_TRIALS = 12.0  # weight of a prior rate, in drafted tokens judged (accepted or rejected)
FORGET = 0.97  # per round: how much of the acceptance evidence is kept
COST_WINDOW = 9  # a phase's correction is the median measured/predicted ratio of its last COST_WINDOW steps
COST_PRIOR = 2  # the calibration counts as this many steps of ratio 1 until measured steps replace them
SPECULATE_GAIN = 1.05  # speculation turns on when predicted this much faster than plain decoding
STOP_GAIN = 1.0  # and off when predicted slower than plain decoding
SWITCH_GAIN = 1.03  # a new speculative setting must be predicted this much faster than the current one


def is_auto(value: object) -> bool:
    """Whether a gamma or budget argument asks for the automatic choice."""
    return isinstance(value, str) and value == AUTO


def prior_curve(budget: int) -> float:
    """The prior ``alpha(K)``."""
    doublings = math.log2(budget / PRIOR_BUDGET)
    return 1.0 - (1.0 - PRIOR_ALPHA) * REJECTION_PER_DOUBLING**doublings


def measured_curve(points: dict[int, float]) -> Callable[[int], float]:
    """``alpha(K)`` through measured points; beyond them, the nearest point moved along the prior's shape."""
    inside = cm.acceptance_curve(points)
    lo, hi = min(points), max(points)

    def alpha_at(budget: int) -> float:
        if lo <= budget <= hi:
            return inside(budget)
        edge = lo if budget < lo else hi
        scale = (1.0 - prior_curve(budget)) / (1.0 - prior_curve(edge))
        return max(0.0, 1.0 - (1.0 - points[edge]) * scale)

    return alpha_at


@dataclasses.dataclass
class Acceptance:
    """One sequence's acceptance evidence, kept per draft budget.

    At each budget the estimate is the rate of its own rounds there with a prior worth ``PRIOR_TRIALS``
    drafted tokens (``_prior``). One prompt's acceptance can depend on the budget far more than the average
    prompt's does (drafting poorly at 256 and well at 1024), so a budget is judged by its own rounds once
    tried, and poor rounds with a small view do not keep the policy from trying a larger one.
    """

    curve: Callable[[int], float]
    budget: int  # the budget it drafts with now
    # per budget: (accepted drafts, rejections), faded by FORGET a round
    evidence: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)

    def observe(self, accepted: int, gamma: int) -> None:
        """A round drafted ``gamma`` tokens at the current budget and ``accepted`` of them were accepted."""
        self.evidence = {k: (FORGET * a, FORGET * r) for k, (a, r) in self.evidence.items()}
        a, r = self.evidence.get(self.budget, (0.0, 0.0))
        self.evidence[self.budget] = (a + accepted, r + (accepted < gamma))

    def alpha(self, budget: int | None = None) -> float:
        """The estimated rate at ``budget`` (default: the current one)."""
        budget = self.budget if budget is None else budget
        return self._posterior(budget, self._prior(budget))

    def _prior(self, budget: int) -> float:
        """The rate expected at ``budget`` before its own rounds: carried from the nearest tried budget above
        it (a larger SnapKV or StreamingLLM view holds the smaller one, so it bounds it), else from the
        largest tried below it but never less than the average prompt's rate there, else the average."""
        tried = [k for k in self.evidence if k != budget]
        above = [k for k in tried if k > budget]
        if above:
            return self._carried(min(above), budget)
        if tried:
            return max(self.curve(budget), self._carried(max(tried), budget))
        return self.curve(budget)

    def _posterior(self, budget: int, prior: float) -> float:
        """The geometric model's rate from the rounds at ``budget`` and a prior rate ``prior``."""
        accepted, rejections = self.evidence.get(budget, (0.0, 0.0))
        return (accepted + PRIOR_TRIALS * prior) / (accepted + rejections + PRIOR_TRIALS)

    def _carried(self, source: int, budget: int) -> float:
        """The rate measured at ``source`` moved to ``budget``: rejection rates scale as the curve's do."""
        alpha = self._posterior(source, self.curve(source))
        scale = (1.0 - self.curve(budget)) / max(1.0 - self.curve(source), 1e-9)
        return max(0.0, 1.0 - (1.0 - alpha) * scale)


class StepCosts:
    """Predicted step times: the cost model on calibrated rates, times a measured correction per phase.

    A phase's correction is the median measured/predicted ratio of its recent steps. A phase not measured
    yet takes the median correction of those that are: a machine slower or faster than at calibration is
    so for every phase, and plain steps alone must not make speculation look cheaper than it is.
    """

    def __init__(self, model: cm.ModelSpec, hardware: cm.Hardware, draft: cm.Draft = cm.SELF_DRAFT):
        self.model, self.hardware, self.draft = model, hardware, draft
        self.correction = dict.fromkeys(cm.PHASES, 1.0)
        self._ratios = {p: collections.deque([1.0] * COST_PRIOR, maxlen=COST_WINDOW) for p in cm.PHASES}
        self._measured: set[str] = set()

    def target(self, batch: int, context: int) -> float:
        return self.correction["target"] * cm.t_target(self.model, self.hardware, batch, context)

    def draft_step(self, batch: int, budget: int, context: int) -> float:
        t = cm.t_draft(self.model, self.hardware, batch, budget, context, self.draft)
        return self.correction["draft"] * t

    def verify(self, batch: int, context: int, gamma: int) -> float:
        return self.correction["verify"] * cm.t_verify(self.model, self.hardware, batch, context, gamma)

    def observe(self, phase: str, predicted: float, measured: float) -> None:
        """Fold a measured time into the phase's correction (``predicted`` includes the correction)."""
        if predicted > 0 and measured > 0:
            self._ratios[phase].append(measured / predicted * self.correction[phase])
            self._measured.add(phase)
            own = {p: statistics.median(self._ratios[p]) for p in self._measured}
            shared = statistics.median(own.values())
            self.correction = {p: own.get(p, shared) for p in cm.PHASES}


@dataclasses.dataclass(frozen=True)
class Choice:
    """One round's setting (``gamma == 0``: a plain decode step) and its predicted tokens and seconds."""

    gamma: int
    budget: int
    tokens: float
    seconds: float

    @property
    def throughput(self) -> float:
        """Predicted tokens/s of the round."""
        return self.tokens / self.seconds

    def step_throughput(self, step_s: float) -> float:
        """Predicted tokens/s of a step that spends ``step_s`` seconds on other work besides the round."""
        return self.tokens / (step_s + self.seconds)


class AutoPolicy:
    """Chooses plain decoding or (gamma, budget) for each round of a batch."""

    def __init__(
        self,
        costs: StepCosts,
        gammas: Sequence[int],
        budgets: Sequence[int],
        fixed_gamma: int | None = None,
        fixed_budget: int | None = None,
        acceptance_curve: Callable[[int], float] = prior_curve,
    ):
        self.costs = costs
        self.acceptance_curve = acceptance_curve
        self.gammas = [fixed_gamma] if fixed_gamma else list(gammas)
        self.budgets = [fixed_budget] if fixed_budget else list(budgets)
        self.current: Choice | None = None

    def candidates(self, contexts: Sequence[int], acceptance: Sequence[Acceptance]) -> list[Choice]:
        """Predicted tokens and seconds of a plain step and of every (gamma, budget) round."""
        batch = len(contexts)
        context = max(1, round(sum(contexts) / batch))
        out = [Choice(0, self.budgets[0], batch, self.costs.target(batch, context))]
        for k in self.budgets:
            t_d = self.costs.draft_step(batch, k, context)
            alphas = [a.alpha(k) for a in acceptance]
            for g in self.gammas:
                tokens = sum(cm.omega(g, a) for a in alphas)
                seconds = g * t_d + self.costs.verify(batch, context, g) + self.costs.hardware.round_s
                out.append(Choice(g, k, tokens, seconds))
        return out

    def choose(
        self, contexts: Sequence[int], acceptance: Sequence[Acceptance], step_s: float = 0.0
    ) -> Choice:
        """The setting for a round in a step that spends ``step_s`` seconds on other work.

        A setting pays if predicted ``SPECULATE_GAIN`` faster than plain decoding (the model's errors must
        not make it lose), or, while speculating, ``STOP_GAIN`` times as fast; of those, the most tokens per
        step wins (with no other work: the fastest round), and a running setting is kept unless another is
        ``SWITCH_GAIN`` better. None pays: a plain step."""
        plain, *options = self.candidates(contexts, acceptance)
        key = None if self.current is None else (self.current.gamma, self.current.budget)
        gain = SPECULATE_GAIN if key is None else STOP_GAIN
        paying = [c for c in options if c.throughput >= gain * plain.throughput]
        if not paying:
            self.current = None
            return plain
        def score(c: Choice) -> float:
            return c.step_throughput(step_s)

        best = max(paying, key=score)
        current = next((c for c in paying if (c.gamma, c.budget) == key), None)
        if current is not None and score(best) < SWITCH_GAIN * score(current):
            best = current
        self.current = best
        return best

    def observe(self, choice: Choice, batch: int, context: int, seconds: Sequence[float]) -> None:
        """Feed back a round's measured seconds at ``batch`` x mean ``context``: ``(step,)`` after a plain
        step, ``(drafting, verification)`` after a speculative round."""
        costs = self.costs
        if choice.gamma == 0:
            costs.observe("target", costs.target(batch, context), seconds[0])
            return
        t_draft, t_verify = seconds
        costs.observe("draft", choice.gamma * costs.draft_step(batch, choice.budget, context), t_draft)
        costs.observe("verify", costs.verify(batch, context, choice.gamma), t_verify)

    @classmethod
    def calibrated(cls, engine, draft: cm.Draft, gammas: Sequence[int], budgets: Sequence[int]) -> AutoPolicy:
        """The policy for ``engine``'s target with ``draft``: this machine's cached calibration (a quick one
        is made now if there is none), and its measured acceptance curve if it has one."""
        fit = calibration.load_or_calibrate(engine)
        costs = StepCosts(engine.artifact.spec, fit.hardware, draft)
        curve = measured_curve(fit.acceptance) if fit.acceptance else prior_curve
        return cls(costs, gammas, budgets, acceptance_curve=curve)
