"""Chat templates: the model's own jinja2 template, rendered as transformers renders it."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ...compile.config import ModelConfig
from ..speculation import RequestError


class ChatTemplate:
    """``render(messages)``: the prompt text that asks the model for the assistant's next message."""

    def __init__(self, source: str, tokenizer: Tokenizer, config: ModelConfig):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise RequestError(f"the model's chat template does not parse: {e}") from None

        def token(i: int | None) -> str:
            return "" if i is None else tokenizer.id_to_token(i) or ""

        self.special = {
            "bos_token": token(config.bos_token_id),
            "eos_token": token(config.eos_token_ids[0] if config.eos_token_ids else None),
        }

    def render(self, messages: Sequence[dict]) -> str:
        """The rendered conversation with the generation prompt; RequestError (one line) if it cannot be."""
        try:
            return self.template.render(messages=list(messages), add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as e:
            raise RequestError(
                f"the chat template rejected the messages: {' '.join(str(e).split())}"
            ) from None


def _tojson(value, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str):
    raise jinja2.TemplateError(message)
