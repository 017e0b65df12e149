"""The OpenAI API's request bodies (the fields this server reads) and its error body.

Unknown fields are ignored, as OpenAI-compatible servers do; known fields are type-checked strictly, so a
string where a number belongs is a 400, not a silent conversion. ``speculate``, ``draft_budget`` and
``gamma`` are this server's extension fields; standard clients simply omit them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.serving import GenerationConfig


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    ignore_eos: bool = False
    speculate: str | None = None  # checked by GenerationConfig.validate
    draft_budget: int | None = Field(default=None, ge=1)
    gamma: int | None = Field(default=None, ge=1)

    def generation(self, max_tokens: int) -> GenerationConfig:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationConfig(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            speculate=self.speculate,
            draft_budget=self.draft_budget,
            gamma=self.gamma,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(min_length=1)


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow", strict=True)  # templates may read other keys (name, ...)
    role: str
    content: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def error_body(message: str, kind: str = "invalid_request_error", code: int | None = None) -> dict:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
