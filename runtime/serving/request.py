"""What a served request asks for, what it streams back, and its state in the serving loop."""

from __future__ import annotations

import dataclasses
import math
import time

from ...constants import SPECULATE_MODES
from ..sampling import SamplingParams
from ..sequences import SequenceState
from ..speculation import MAX_GAMMA, RequestError
from .textstream import TextStream

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """One request's settings. ``speculate``, ``draft_budget`` and ``gamma`` default to the server's."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    speculate: str | None = None
    draft_budget: int | None = None
    gamma: int | None = None

    def validate(self, context_window: int) -> None:
        """Raise ``RequestError`` (one line) if a field is out of range."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise RequestError(f"temperature must be a finite number, got {self.temperature!r}")
        try:
            self.sampling.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
        if self.speculate is not None and self.speculate not in SPECULATE_MODES:
            raise RequestError(
                f"speculate must be one of {', '.join(SPECULATE_MODES)}, got {self.speculate!r}"
            )
        if self.gamma is not None and not (isinstance(self.gamma, int) and 1 <= self.gamma <= MAX_GAMMA):
            raise RequestError(f"gamma must be an integer from 1 to {MAX_GAMMA}, got {self.gamma!r}")
        if self.draft_budget is not None and not (
            isinstance(self.draft_budget, int) and 1 <= self.draft_budget < context_window
        ):
            raise RequestError(
                f"draft_budget must be an integer from 1 to {context_window - 1}, got {self.draft_budget!r}"
            )

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(float(self.temperature), float(self.top_p), self.seed)


@dataclasses.dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass
class RequestOutput:
    """What one step added to a request: new text and tokens, and the finish reason once it is done
    (``"stop"``: EOS or a stop string; ``"length"``; ``"abort"``; ``"error"`` with ``error`` set)."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    timing: dict[str, float] | None = None  # once finished: Timeline.seconds()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class Timeline:
    """When a request arrived, was first admitted, got its first token and finished (perf_counter)."""

    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None

    def seconds(self) -> dict[str, float]:
        """``queue_s`` (arrival to admission), ``prefill_s`` (admission to the first token; it includes the
        steps of other requests in between) and ``decode_s`` (first token to the end)."""
        out = {}
        if self.admitted is not None:
            out["queue_s"] = self.admitted - self.arrival
            if self.first_token is not None:
                out["prefill_s"] = self.first_token - self.admitted
                if self.finished is not None:
                    out["decode_s"] = self.finished - self.first_token
        return out


@dataclasses.dataclass(eq=False)
class ServeRequest:
    """A request inside the serving loop: its sequence state, text stream and scheduling state."""

    request_id: str
    config: GenerationConfig
    seq: SequenceState
    text: TextStream
    speculate: str  # auto | on | off, resolved against the server's default
    prefilled: int = 0  # tokens of the prefix to recompute that are in the KV
    preemptions: int = 0
    sent_tokens: int = 0  # output tokens already streamed
    timeline: Timeline = dataclasses.field(default_factory=Timeline)

    @property
    def prefix(self) -> list[int]:
        """The tokens prefill must put in the KV: the prompt, or after a preemption everything generated
        but the pending last token (which the next step feeds)."""
        tokens = self.seq.tokens
        return tokens[:-1] if self.seq.output else tokens

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= len(self.prefix)

    @property
    def finished(self) -> bool:
        return self.seq.done or self.text.stopped
