"""The cost model's view of a model (bytes and FLOPs of a step), its drafts, and the built-in models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ...compile.config import ModelConfig, ModelError
from ...compile.loaders import read_json
from ...constants import DTYPE_BYTES, KV_TENSORS
from ...manifest import CONFIG_NAME as ARTIFACT_CONFIG_NAME
from ...manifest import Manifest, ManifestError, stored_weight_bytes
from .hardware import ATTENTION_FLOPS_PER_ENTRY, DEFAULT_DTYPE, HF_CONFIG_NAME, CostModelError

# ------------------------------------------------------------------------------------------------------
# Model sizes

# Kernels a decode step launches: per layer 2 RMSNorms, the QKV projection, RoPE, the KV append, attention,
# the output projection, 2 residual adds, the gate-up projection, SiLU-and-multiply and the down projection;
# per step the embedding, the final norm, the lm_head and sampling.
KERNELS_PER_LAYER = 12
KERNELS_PER_STEP = 4
# Tensor parallelism (Megatron-style, as MagicDec's gpt-fast code shards): an all-reduce of the hidden
# state after the attention's output projection and after the MLP's down projection, and an all-gather of
# the vocab-parallel lm_head's logits.
ALLREDUCES_PER_LAYER = 2


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model's architecture, the bytes per weight (and activation) and per KV element (default: the
    same), a display name, and for an artifact the bytes its weights take as stored (quantized linears
    take fewer than ``dtype_bytes`` per weight)."""

    config: ModelConfig
    dtype_bytes: int = DTYPE_BYTES[DEFAULT_DTYPE]
    name: str = "model"
    kv_dtype_bytes: int | None = None
    stored_bytes: int | None = None  # an artifact's weights as stored (quantized linears), if known

    @property
    def kv_element_bytes(self) -> int:
        return self.kv_dtype_bytes or self.dtype_bytes

    @property
    def param_count(self) -> int:
        """All parameters: embedding + layers (qkv bias included) + final norm + lm_head unless tied."""
        c = self.config
        embedding = c.vocab_size * c.hidden_size
        return embedding + self._body_params + (0 if c.tie_word_embeddings else embedding)

    @property
    def step_param_count(self) -> int:
        """Parameters read (and multiplied) by each decode step: all but an untied input embedding table.

        A token's embedding is a lookup of one row, so the untied table costs neither bandwidth nor FLOPs;
        a tied table is read in full as the lm_head.
        """
        return self._body_params + self.config.vocab_size * self.config.hidden_size

    @property
    def _body_params(self) -> int:
        """Decoder layers plus the final norm."""
        c = self.config
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        attention = c.hidden_size * (q_dim + 2 * kv_dim) + q_dim * c.hidden_size
        bias = q_dim + 2 * kv_dim if c.qkv_bias else 0
        mlp = 3 * c.hidden_size * c.intermediate_size  # gate, up, down
        norms = 2 * c.hidden_size
        return c.num_layers * (attention + bias + mlp + norms) + c.hidden_size

    @property
    def param_bytes(self) -> int:
        """Bytes of all the weights, as held in memory."""
        return self.param_count * self.dtype_bytes if self.stored_bytes is None else self.stored_bytes

    @property
    def weight_bytes(self) -> int:
        """``W``: bytes of weights one decode step reads: all but the input embedding table, of which a step
        looks up one row per token (an artifact stores that table on its own, in ``dtype``)."""
        if self.stored_bytes is None:
            return self.step_param_count * self.dtype_bytes
        return self.stored_bytes - self.config.vocab_size * self.config.hidden_size * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """``2 * layers * kv_heads * head_dim * kv_element_bytes``: K and V of one token, all layers."""
        c = self.config
        return KV_TENSORS * c.num_layers * c.num_kv_heads * c.head_dim * self.kv_element_bytes

    @property
    def attention_flops_per_entry(self) -> int:
        """``4 * layers * heads * head_dim``: attention FLOPs of one query token over one KV position."""
        c = self.config
        return ATTENTION_FLOPS_PER_ENTRY * c.num_layers * c.num_heads * c.head_dim

    @property
    def kernels_per_step(self) -> int:
        """``12 * layers + 4``: kernels one forward step launches (``KERNELS_PER_LAYER``)."""
        return KERNELS_PER_LAYER * self.config.num_layers + KERNELS_PER_STEP

    @property
    def allreduces_per_step(self) -> int:
        """``2 * layers``: all-reduces of the hidden state per forward step with tensor parallelism."""
        return ALLREDUCES_PER_LAYER * self.config.num_layers

    @property
    def hidden_bytes_per_token(self) -> int:
        """Bytes of one token's hidden state: what each all-reduce sums per token."""
        return self.config.hidden_size * self.dtype_bytes

    @property
    def logit_bytes_per_token(self) -> int:
        """Bytes of one token's logits: what the lm_head's all-gather collects per token."""
        return self.config.vocab_size * self.dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.config.family,
            "dtype_bytes": self.dtype_bytes,
            "kv_dtype_bytes": self.kv_element_bytes,
            "params": self.param_count,
            "step_params": self.step_param_count,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "context_window": self.config.context_window,
        }


def as_spec(model: ModelSpec | ModelConfig) -> ModelSpec:
    """A ``ModelSpec``; a bare ``ModelConfig`` is taken to be float16."""
    return model if isinstance(model, ModelSpec) else ModelSpec(model)


@dataclasses.dataclass(frozen=True)
class Draft:
    """How drafting is done: the target's own weights (``model=None``, self-speculation) or a small model.

    ``compressed``: the draft attends to a budget of ``K`` KV entries (StreamingLLM, SnapKV); otherwise to
    its full KV cache of ``L`` entries.
    """

    model: ModelSpec | None = None
    compressed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.name if self.model else "self", "compressed": self.compressed}


SELF_DRAFT = Draft()


# ------------------------------------------------------------------------------------------------------
# Loading models

LLAMA_3_1_8B = ModelConfig(
    family="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    context_window=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_ids=(128001, 128008, 128009),
)
LLAMA_3_2_1B = dataclasses.replace(
    LLAMA_3_1_8B,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    head_dim=64,
    rope_scaling={**(LLAMA_3_1_8B.rope_scaling or {}), "factor": 32.0},
    tie_word_embeddings=True,
)
BUILTIN_MODELS = {"llama-3.1-8b": LLAMA_3_1_8B, "llama-3.2-1b": LLAMA_3_2_1B}


def _dtype_bytes(dtype: str | None, where: Path) -> int:
    dtype = dtype or DEFAULT_DTYPE
    if dtype not in DTYPE_BYTES:
        raise CostModelError(f"{where}: unsupported dtype {dtype!r}; supported: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def load_model(spec: str, dtype: str | None = None) -> ModelSpec:
    """A built-in name (``llama-3.1-8b``, ``llama-3.2-1b``), an artifact folder, or an HF config.json.

    The dtype is ``dtype`` if given, else the artifact's, else the config's ``torch_dtype``, else float16.
    """
    if spec.strip().lower() in BUILTIN_MODELS:
        name = spec.strip().lower()
        return ModelSpec(BUILTIN_MODELS[name], _dtype_bytes(dtype, Path(name)), name)
    path = Path(spec)
    if path.is_dir() and (path / ARTIFACT_CONFIG_NAME).is_file():
        try:
            model, artifact_dtype, kv_dtype = Manifest.model_of(path)
            config = ModelConfig.from_dict(model)
        except (ManifestError, KeyError, TypeError) as e:
            raise CostModelError(f"{path / ARTIFACT_CONFIG_NAME} is corrupt ({e}); compile again") from None
        if dtype:  # a dtype asked for replaces both
            return ModelSpec(config, _dtype_bytes(dtype, path), path.name)
        return ModelSpec(
            config,
            _dtype_bytes(artifact_dtype, path),
            path.name,
            _dtype_bytes(kv_dtype, path),
            stored_weight_bytes(path),
        )
    file = path / HF_CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise CostModelError(
            f"no model at {spec!r}; give an artifact folder, a config.json (or its folder), "
            f"or one of {', '.join(BUILTIN_MODELS)}"
        )
    cfg = read_json(file)
    try:
        config = ModelConfig.from_hf(cfg)
    except ModelError as e:
        raise CostModelError(f"{file}: {e}") from None
    name = path.name if path.is_dir() else file.parent.name or file.name
    return ModelSpec(config, _dtype_bytes(dtype or cfg.get("torch_dtype"), file), name)
