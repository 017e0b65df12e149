"""What every format loads into: the lazy weight mapping, the loaded model, and shared readers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig, ModelError
from ..quantization import QuantizedWeight

_MAX_ERROR_CHARS = 300


def error_line(e: BaseException | str) -> str:
    """An exception (or text) as one short line, for wrapping third-party errors in a ModelError."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, BaseException) and type(e).__name__ not in text:
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# The lazy weight mapping


class WeightSource(Mapping[str, np.ndarray]):
    """A read-only, lazy ``name -> float32 np.ndarray`` mapping; each access reads and converts one tensor.

    Every access returns a fresh array that the caller owns. ``shape(name)`` gives a tensor's shape
    without reading it.
    """

    def __init__(
        self,
        readers: dict[str, Callable[[], np.ndarray]],
        shapes: dict[str, tuple[int, ...]],
        source: str,
        types: dict[str, str] | None = None,
        blocks: dict[str, Callable[[], QuantizedWeight]] | None = None,
    ):
        self._readers = readers
        self._shapes = shapes
        self._source = source
        self._types = types or {}
        self._blocks = blocks or {}

    def __getitem__(self, name: str) -> np.ndarray:
        reader = self._readers[name]  # KeyError for unknown names, as a Mapping should
        try:
            arr = reader()
        except ModelError:
            raise
        except Exception as e:  # third-party readers raise anything on corrupt data
            raise ModelError(
                f"cannot read tensor {name!r} from {self._source}: {error_line(e)}; "
                "the file may be corrupt, download it again"
            ) from None
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not arr.flags.writeable:  # a view of a read-only memory map: give the caller its own copy
            arr = arr.copy()
        if arr.shape != self._shapes[name]:
            raise ModelError(
                f"tensor {name!r} in {self._source} has shape {arr.shape}, "
                f"expected {self._shapes[name]}; the file does not match its config"
            )
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def __contains__(self, name: object) -> bool:
        return name in self._readers

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (without reading it)."""
        return self._shapes[name]

    def stored_type(self, name: str) -> str:
        """How the file stores tensor ``name``: a GGML type name ("Q4_1", "F16", ...) or "float"."""
        return self._types.get(name, "float")

    def quantized(self, name: str) -> QuantizedWeight | None:
        """Tensor ``name``'s quantized blocks as the file holds them, if it is in a format an artifact keeps
        (``quantization.GGUF_KEPT``), else None."""
        reader = self._blocks.get(name)
        if reader is None:
            return None
        try:
            return reader()
        except Exception as e:  # a truncated tensor
            raise ModelError(
                f"cannot read tensor {name!r} from {self._source}: {error_line(e)}; "
                "the file may be corrupt, download it again"
            ) from None

    def __repr__(self) -> str:
        return f"WeightSource({len(self)} tensors from {self._source})"


@dataclasses.dataclass
class LoadedModel:
    """A model ready to compile: its config, lazy float32 weights (HF names) and tokenizer."""

    config: ModelConfig
    weights: WeightSource
    tokenizer_json: str  # a serialized ``tokenizers.Tokenizer`` (tokenizer.json contents)
    source: str  # the path it came from
    chat_template: str | None = None  # jinja2, as transformers renders it (GGUF or tokenizer_config.json)


def expected_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face parameter names and shapes of a model with config ``cfg``, in state_dict order."""
    q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
        if cfg.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
        if cfg.qkv_bias:
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        if cfg.qkv_bias:
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ModelError (one line) if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {error_line(e)}; the file is not valid JSON") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def check_tokenizer_json(text: str, where: str) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ModelError(f"{where} is not a valid tokenizers JSON file: {error_line(e)}") from None
