"""Typed access to a GGUF file's key/value metadata (shared by the weight and tokenizer readers)."""

from __future__ import annotations

from typing import Any

from ..config import ModelError


class GGUFMeta:
    """Typed access to a GGUFReader's key/value metadata."""

    def __init__(self, reader: Any, arch: str):
        self._fields = reader.fields
        self.arch = arch

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key.format(arch=self.arch))
        if field is None:
            return default
        return field.contents()

    def require(self, key: str, where: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelError(
                f"{where} lacks GGUF metadata {key.format(arch=self.arch)!r}; "
                "the file is incomplete or not a language model"
            )
        return value
