"""Model configuration shared by all Llama-family architectures (Llama, Qwen2, Mistral)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import UserError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ModelError(UserError, ValueError):
    """A model file or config that cannot be used; the message is one line and says what to do."""


def _legacy_rope_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate transformers>=5's ``rope_parameters`` into the older ``rope_theta``/``rope_scaling`` keys."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return cfg
    cfg = dict(cfg)
    if "rope_theta" in params:
        cfg.setdefault("rope_theta", params["rope_theta"])
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        cfg.setdefault("rope_scaling", scaling)
    return cfg


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters. The three families differ only by these fields."""

    family: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_window: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; raises ModelError if unsupported."""
        cfg = _legacy_rope_keys(cfg)
        archs = cfg.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(cfg.get("model_type", ""))
        if family is None:
            raise ModelError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            scaling = cfg.get("rope_scaling") or None
            if scaling is not None:
                kind = scaling.get("rope_type", scaling.get("type"))
                if kind in (None, "default"):
                    scaling = None
                elif kind != "llama3":
                    raise ModelError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            ctx = int(cfg.get("max_position_embeddings", 4096))
            if family == "mistral" and cfg.get("sliding_window"):
                ctx = min(ctx, int(cfg["sliding_window"]))
            return cls(
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                context_window=ctx,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                rope_scaling=dict(scaling) if scaling else None,
                qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ModelError(f"config.json is missing {e.args[0]!r}; is this a Llama-family model?") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)
