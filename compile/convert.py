"""Hugging Face weights to this project's parameter layout: fused qkv and gate/up, float linears ``[in, out]``
(or ``[out, in]``, as Hugging Face stores them, for GPU targets) or group-quantized (``quantization``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from .config import ModelConfig, ModelError
from .loaders import WeightSource
from .quantization import FORMATS, GGUF_FALLBACK, GROUP_SIZE, GroupFormat, QuantizedWeight, quantize


def linear_sources(cfg: ModelConfig) -> dict[str, list[str]]:
    """Each linear of the model (``"layers.0.self_attn.qkv_proj"``, ``"lm_head"``) and the Hugging Face
    weights ``[out, in]`` stacked along the outputs to make it."""
    linears: dict[str, list[str]] = {}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        linears[dst + "self_attn.qkv_proj"] = [f"{src}self_attn.{p}_proj.weight" for p in "qkv"]
        linears[dst + "self_attn.o_proj"] = [src + "self_attn.o_proj.weight"]
        linears[dst + "mlp.gate_up_proj"] = [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]
        linears[dst + "mlp.down_proj"] = [src + "mlp.down_proj.weight"]
    linears["lm_head"] = ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return linears


def quantization_plan(
    cfg: ModelConfig, weights: WeightSource, quantization: str
) -> tuple[dict[str, GroupFormat], list[str]]:
    """The format of each quantized linear for ``--quantization`` (``none``, a scheme of ``FORMATS``, or
    ``gguf``: each linear keeps its file's blocks when all its parts share a kept format, else it is
    re-quantized to ``GGUF_FALLBACK``), and the linears so re-quantized."""
    linears = linear_sources(cfg)
    if quantization == "none":
        return {}, []
    if quantization != "gguf":
        return dict.fromkeys(linears, FORMATS[quantization]), []
    formats, requantized = {}, []
    for linear, parts in linears.items():
        kept = {weights.stored_type(p) for p in parts}
        if len(kept) == 1 and (name := kept.pop()) in FORMATS:
            formats[linear] = FORMATS[name]
        else:
            formats[linear] = FORMATS[GGUF_FALLBACK]
            requantized.append(linear)
    return formats, requantized


def unquantizable_width(cfg: ModelConfig) -> int | None:
    """An input width of the model's linears that is not a whole number of quantization groups, if any."""
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    return next((w for w in widths if w % GROUP_SIZE), None)


def _layer_params(cfg: ModelConfig, hf: Mapping[str, np.ndarray], i: int) -> dict[str, Callable]:
    src, dst = f"model.layers.{i}.", f"layers.{i}."
    get = lambda name: hf[src + name]  # noqa: E731
    out = {
        dst + "input_layernorm.weight": lambda: get("input_layernorm.weight"),
        dst + "post_attention_layernorm.weight": lambda: get("post_attention_layernorm.weight"),
    }
    if cfg.qkv_bias:
        out[dst + "self_attn.qkv_proj.bias"] = lambda: np.concatenate(
            [get(f"self_attn.{p}_proj.bias") for p in "qkv"]
        )
    return out


def _quantized(hf: WeightSource, parts: list[str], fmt: GroupFormat) -> QuantizedWeight:
    """A linear's parts in ``fmt``: the file's own blocks when they are in it, else quantized from floats."""
    stored = getattr(hf, "stored_type", lambda _: "float")  # a plain mapping of floats has no blocks
    if all(stored(p) == fmt.name for p in parts):  # read blocks only where they are kept
        return QuantizedWeight.stack([hf.quantized(p) for p in parts])
    return quantize(np.concatenate([hf[p] for p in parts], axis=0), fmt)


def convert(
    cfg: ModelConfig,
    hf: Mapping[str, np.ndarray],
    names: list[str],
    dtype: str,
    formats: Mapping[str, GroupFormat] | None = None,
    out_in: bool = False,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for each of the model's parameter ``names``, converted one linear at a time;
    the linears in ``formats`` as their quantized tensors (``codes``, ``scale``, ``min``), the others as
    float ``[in, out]``; all transposed with ``out_in``."""
    formats = formats or {}
    makers: dict[str, Callable] = {
        "embed_tokens.weight": lambda: hf["model.embed_tokens.weight"],
        "norm.weight": lambda: hf["model.norm.weight"],
    }
    for i in range(cfg.num_layers):
        makers.update(_layer_params(cfg, hf, i))
    packed: dict[str, dict[str, np.ndarray]] = {}  # the linear being written: its quantized tensors
    for linear, parts in linear_sources(cfg).items():
        if linear not in formats:
            stacked = lambda parts=parts: np.concatenate([hf[p] for p in parts], axis=0)  # noqa: E731
            makers[linear + ".weight"] = stacked if out_in else lambda stacked=stacked: stacked().T
            continue
        fmt = formats[linear]
        for tensor in fmt.tensors:

            def make(linear=linear, parts=parts, fmt=fmt, tensor=tensor):
                if linear not in packed:
                    packed.clear()
                    packed[linear] = _quantized(hf, parts, fmt).packed(out_in)
                return packed[linear][tensor]

            makers[f"{linear}.{tensor}"] = make
    for name in names:
        if name not in makers:
            raise ModelError(f"no source weight for parameter {name!r}")
        try:
            array = makers[name]()
        except KeyError as e:
            raise ModelError(f"the model file lacks tensor {e.args[0]!r}; it may be incomplete") from None
        quantized = name.rpartition(".")[0] in formats and not name.endswith(".bias")
        yield name, np.ascontiguousarray(array, dtype=array.dtype if quantized else dtype)
