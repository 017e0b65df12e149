"""Hugging Face weights to this project's parameter layout (fused qkv and gate/up, ``[in, out]`` weights)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from .config import ModelConfig, ModelError


def _layer_params(cfg: ModelConfig, hf: Mapping[str, np.ndarray], i: int) -> dict[str, callable]:
    src, dst = f"model.layers.{i}.", f"layers.{i}."
    get = lambda name: hf[src + name]  # noqa: E731
    out = {
        dst + "self_attn.qkv_proj.weight": lambda: (
            np.concatenate([get(f"self_attn.{p}_proj.weight") for p in "qkv"], axis=0).T
        ),
        dst + "self_attn.o_proj.weight": lambda: get("self_attn.o_proj.weight").T,
        dst + "mlp.gate_up_proj.weight": lambda: (
            np.concatenate([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")], axis=0).T
        ),
        dst + "mlp.down_proj.weight": lambda: get("mlp.down_proj.weight").T,
        dst + "input_layernorm.weight": lambda: get("input_layernorm.weight"),
        dst + "post_attention_layernorm.weight": lambda: get("post_attention_layernorm.weight"),
    }
    if cfg.qkv_bias:
        out[dst + "self_attn.qkv_proj.bias"] = lambda: np.concatenate(
            [get(f"self_attn.{p}_proj.bias") for p in "qkv"]
        )
    return out


def convert(
    cfg: ModelConfig, hf: Mapping[str, np.ndarray], names: list[str], dtype: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for each of the model's parameter ``names``, converted one at a time."""
    makers: dict[str, callable] = {
        "embed_tokens.weight": lambda: hf["model.embed_tokens.weight"],
        "norm.weight": lambda: hf["model.norm.weight"],
        "lm_head.weight": lambda: (
            (hf["model.embed_tokens.weight"] if cfg.tie_word_embeddings else hf["lm_head.weight"]).T
        ),
    }
    for i in range(cfg.num_layers):
        makers.update(_layer_params(cfg, hf, i))
    for name in names:
        if name not in makers:
            raise ModelError(f"no source weight for parameter {name!r}")
        try:
            array = makers[name]()
        except KeyError as e:
            raise ModelError(f"the model file lacks tensor {e.args[0]!r}; it may be incomplete") from None
        yield name, np.ascontiguousarray(array, dtype=dtype)
