"""Speculation settings, checked once: the draft view, its KV budget and gamma, each fixed or ``"auto"``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..constants import DEFAULT_DRAFT
from ..errors import UserError
from .autospec import AUTO_BUDGETS, AUTO_MAX_GAMMA, is_auto
from .views import DRAFT_KINDS, DraftSettings

DEFAULT_GAMMA = 3  # draft tokens per speculation round
MAX_GAMMA = 32  # more draft tokens than this per round cannot pay off at any acceptance rate worth having


class RequestError(UserError, ValueError):
    """A generation request that cannot be served; the message is one line and says what to do."""


@dataclasses.dataclass(frozen=True)
class Speculation:
    """Checked settings for one batch: each sequence's draft view (under ``"auto"``: at the first budget),
    and the gammas and budgets a round may use (one each unless automatic)."""

    drafts: list[DraftSettings]
    gammas: tuple[int, ...]
    budgets: tuple[int, ...]
    auto: bool

    @property
    def gamma(self) -> int:
        """The fixed gamma (automatic: the longest candidate, which sizes the rounds' buffers)."""
        return self.gammas[-1]


@dataclasses.dataclass(frozen=True)
class SpecSettings:
    """How to speculate, as a caller gives it.

    ``draft`` is the compressed view ("snapkv" or "streamingllm") and ``budget`` its KV entries (one value,
    one per prompt, None for the artifact's default, or "auto"); ``gamma`` is the draft tokens per round (or
    "auto"); ``draft_settings`` gives every view parameter instead (one, or one per prompt).
    """

    draft: str = DEFAULT_DRAFT
    budget: int | Sequence[int] | str | None = None
    gamma: int | str = DEFAULT_GAMMA
    draft_settings: DraftSettings | Sequence[DraftSettings] | None = None

    @property
    def auto(self) -> bool:
        return is_auto(self.gamma) or is_auto(self.budget)

    def prefill_gamma(self) -> int:
        """The longest round to reserve KV for when prefilling for these settings (an invalid gamma reserves
        ``MAX_GAMMA``; ``check`` reports it)."""
        if is_auto(self.gamma):
            return AUTO_MAX_GAMMA
        if isinstance(self.gamma, (int, np.integer)) and 0 <= self.gamma <= MAX_GAMMA:
            return int(self.gamma)
        return MAX_GAMMA

    def check(self, sequences: int, max_gamma: int, context_window: int, default_budget: int) -> Speculation:
        """The settings for ``sequences`` prompts prefilled for rounds of up to ``max_gamma`` drafts, or a
        one-line ``RequestError`` saying what is wrong (before anything runs)."""
        if self.auto:
            spec = self._automatic(sequences, max_gamma, context_window, default_budget)
        else:
            spec = self._fixed(sequences, default_budget)
        for settings in spec.drafts:
            try:
                settings.validate(context_window)
            except ValueError as e:
                raise RequestError(str(e)) from None
        if spec.gamma > max_gamma:
            raise RequestError(
                f"gamma {spec.gamma} exceeds the {max_gamma} this batch was prefilled for; "
                "pass max_gamma to prefill"
            )
        return spec

    def _fixed(self, sequences: int, default_budget: int) -> Speculation:
        gamma = self.gamma
        if not isinstance(gamma, (int, np.integer)) or not 1 <= gamma <= MAX_GAMMA:
            raise RequestError(f"gamma must be an integer from 1 to {MAX_GAMMA}, got {gamma!r}")
        settings = self.draft_settings
        if settings is None:
            if self.draft not in DRAFT_KINDS:
                raise RequestError(f"unknown draft {self.draft!r}; choose one of: {', '.join(DRAFT_KINDS)}")
            budget = self.budget
            budgets = list(budget) if isinstance(budget, (Sequence, np.ndarray)) else [budget] * sequences
            settings = [
                DraftSettings(self.draft, int(b if b is not None else default_budget)) for b in budgets
            ]
        elif isinstance(settings, DraftSettings):
            settings = [settings] * sequences
        if len(settings) != sequences:
            raise RequestError(f"got {len(settings)} draft budgets or settings for {sequences} prompts")
        return Speculation(list(settings), (int(gamma),), tuple(s.budget for s in settings), auto=False)

    def _automatic(
        self, sequences: int, max_gamma: int, context_window: int, default_budget: int
    ) -> Speculation:
        if self.draft_settings is not None:
            raise RequestError("draft_settings fix the budget; use budget='auto' or draft_settings, not both")
        if max_gamma < 1:
            raise RequestError("this batch was prefilled for plain decoding only; pass max_gamma to prefill")
        for name, value, top in (("gamma", self.gamma, max_gamma), ("budget", self.budget, None)):
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
        if is_auto(self.gamma):
            gammas = tuple(range(1, min(max_gamma, AUTO_MAX_GAMMA) + 1))
        else:
            gammas = (int(self.gamma),)
        if is_auto(self.budget):
            budgets = tuple(k for k in AUTO_BUDGETS if k < context_window // 2) or (default_budget,)
        else:
            budgets = (int(self.budget or default_budget),)
        return Speculation([DraftSettings(self.draft, budgets[0])] * sequences, gammas, budgets, auto=True)
