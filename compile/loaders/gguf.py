"""GGUF files: metadata to a ModelConfig; tensors dequantized by ``gguf``, in HF names and layouts."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig, ModelError
from ..quantization import FORMATS, GGUF_KEPT, GROUP_SIZE, QuantizedWeight
from .gguf_meta import GGUFMeta
from .gguf_tokenizer import gguf_tokenizer_json
from .source import LoadedModel, WeightSource, error_line, expected_weight_shapes

_GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2"}  # general.architecture -> ModelConfig.family
_PERMUTED_ARCHS = {"llama"}  # llama.cpp permutes q/k rows for these (convert_hf_to_gguf LlamaModel.permute)
_DEFAULT_ROPE_THETA = 10000.0
_DEFAULT_RMS_EPS = 1e-5
_DEFAULT_CONTEXT = 4096
# llama.cpp writes llama3 RoPE scaling only as a `rope_freqs` tensor, computed with the config's top-level
# `original_max_position_embeddings` or 8192 when absent (Llama 3.1's value).
_LLAMA3_DEFAULT_ORIG_CTX = 8192
_LLAMA3_DEFAULT_LOW_FREQ_FACTOR = 1.0
_LLAMA3_DEFAULT_HIGH_FREQ_FACTOR = 4.0
_ROPE_FREQS_RTOL = 1e-4
_SIGNIFICANT_DIGITS = 6

_LAYER_TENSORS = {  # llama.cpp per-layer name (after "blk.N.") -> HF name (after "model.layers.N.")
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a llama.cpp tensor name, or None for tensors without one (e.g. rope_freqs)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (``LlamaModel.permute``) of a weight [rows, cols] or a bias."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # truncated files raise ValueError, IndexError, struct.error...
        raise ModelError(
            f"cannot read GGUF file {path}: {error_line(e)}; "
            "the file is truncated or not a GGUF, download it again"
        ) from None


def load_gguf(path: Path) -> LoadedModel:
    import gguf

    if not path.is_file():
        raise ModelError(f"{path} is not a file; pass a .gguf file or a Hugging Face folder")
    reader = _open_gguf(path)
    try:
        arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    except Exception:
        raise ModelError(
            f"{path} has no {gguf.Keys.General.ARCHITECTURE!r}; it is not a GGUF model file"
        ) from None
    family = _GGUF_FAMILIES.get(arch)
    if family is None:
        raise ModelError(
            f"unsupported GGUF architecture {arch!r} in {path}; supported: "
            f"{', '.join(sorted(_GGUF_FAMILIES))}"
        )
    meta = GGUFMeta(reader, arch)
    tensors = {t.name: t for t in reader.tensors}
    try:
        config = _gguf_config(meta, tensors, family, str(path))
        tokenizer_json = gguf_tokenizer_json(meta, str(path))
    except ModelError:
        raise
    except Exception as e:  # malformed metadata values
        raise ModelError(
            f"bad metadata in {path}: {error_line(e)}; the file is corrupt or unsupported"
        ) from None
    weights = _gguf_weights(tensors, config, permute=arch in _PERMUTED_ARCHS, source=str(path))
    template = meta.get("tokenizer.chat_template")
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        source=str(path),
        chat_template=template if isinstance(template, str) else None,
    )


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _gguf_config(meta: GGUFMeta, tensors: dict[str, Any], family: str, where: str) -> ModelConfig:
    import gguf

    K = gguf.Keys
    if "token_embd.weight" not in tensors:
        raise ModelError(f"{where} has no token_embd.weight tensor; it is not a complete language model")
    hidden = int(meta.require(K.LLM.EMBEDDING_LENGTH, where))
    heads = int(meta.require(K.Attention.HEAD_COUNT, where))
    kv_heads = int(meta.get(K.Attention.HEAD_COUNT_KV, heads))
    head_dim = int(meta.get(K.Attention.KEY_LENGTH, hidden // heads))
    rope_dims = meta.get(K.Rope.DIMENSION_COUNT)
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ModelError(f"{where} uses partial RoPE ({rope_dims} of {head_dim} dims); not supported")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # gguf shapes are reversed: [hidden, vocab]
    ctx = int(meta.get(K.LLM.CONTEXT_LENGTH, _DEFAULT_CONTEXT))
    window = meta.get(K.Attention.SLIDING_WINDOW)
    if window:
        ctx = min(ctx, int(window))
    theta = _f32(meta.get(K.Rope.FREQ_BASE, _DEFAULT_ROPE_THETA))

    scaling_type = meta.get(K.Rope.SCALING_TYPE)
    rope_scaling = None
    if "rope_freqs.weight" in tensors:
        orig = int(meta.get(K.Rope.SCALING_ORIG_CTX_LEN, _LLAMA3_DEFAULT_ORIG_CTX))
        factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).reshape(-1)
        rope_scaling = llama3_scaling_from_rope_freqs(factors, theta, head_dim, orig, where)
    elif scaling_type not in (None, "none"):
        factor = float(meta.get(K.Rope.SCALING_FACTOR, 1.0))
        if not (scaling_type == "linear" and factor == 1.0):
            raise ModelError(f"{where} uses RoPE scaling {scaling_type!r}; only llama3 is supported")

    eos: list[int] = []
    for key in (K.Tokenizer.EOS_ID, K.Tokenizer.EOT_ID, K.Tokenizer.EOM_ID):
        value = meta.get(key)
        if value is not None and int(value) not in eos:
            eos.append(int(value))
    bos = meta.get(K.Tokenizer.BOS_ID)
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta.require(K.LLM.FEED_FORWARD_LENGTH, where)),
        num_layers=int(meta.require(K.LLM.BLOCK_COUNT, where)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        context_window=ctx,
        rms_norm_eps=_f32(meta.get(K.Attention.LAYERNORM_RMS_EPS, _DEFAULT_RMS_EPS)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
    )


def _llama3_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for llama3 scaling (convert_hf_to_gguf, LlamaModel)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    orig = scaling["original_max_position_embeddings"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def llama3_scaling_from_rope_freqs(
    factors: np.ndarray, theta: float, head_dim: int, orig_ctx: int, where: str = "GGUF"
) -> dict[str, Any]:
    """Recover llama3 ``rope_scaling`` from llama.cpp's per-frequency ``rope_freqs`` factors.

    Raises ModelError if the factors do not follow the llama3 formula.
    """

    def sig(x: float) -> float:
        return float(f"{x:.{_SIGNIFICANT_DIGITS}g}")

    factor = sig(float(factors.max()))
    low, high = _LLAMA3_DEFAULT_LOW_FREQ_FACTOR, _LLAMA3_DEFAULT_HIGH_FREQ_FACTOR
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    mid = (factors > 1 + _ROPE_FREQS_RTOL) & (factors < factor * (1 - _ROPE_FREQS_RTOL))
    if factor > 1 and mid.sum() >= 2:
        # in the smooth band, smooth = (orig / wavelen - low) / (high - low) is linear in 1 / wavelen
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[mid], smooth, 1)
        span = orig_ctx / slope
        low = sig(-intercept * span)
        high = sig(low + span)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig_ctx,
    }
    if factors.shape != freqs.shape or not np.allclose(
        _llama3_rope_factors(theta, head_dim, scaling), factors, rtol=_ROPE_FREQS_RTOL
    ):
        raise ModelError(f"{where} has rope_freqs that do not follow llama3 RoPE scaling; not supported")
    return scaling


def _gguf_weights(
    tensors: dict[str, Any], config: ModelConfig, *, permute: bool, source: str
) -> WeightSource:
    expected = expected_weight_shapes(config)
    by_hf = {hf: t for t in tensors.values() if (hf := _hf_name(t.name)) is not None}
    missing = [n for n in expected if n not in by_hf]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"{source} lacks the tensor for {missing[0]!r}{more}; the GGUF is incomplete")
    readers: dict[str, Callable[[], np.ndarray]] = {}
    types: dict[str, str] = {}
    blocks: dict[str, Callable[[], QuantizedWeight]] = {}
    for name, shape in expected.items():
        t = by_hf[name]
        gguf_shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if math.prod(gguf_shape) != math.prod(shape) or gguf_shape[-1] != shape[-1]:
            raise ModelError(
                f"tensor {t.name} in {source} has shape {gguf_shape}, expected {shape} "
                "from its metadata; the GGUF is inconsistent"
            )
        n_head = None
        if permute and ".self_attn.q_proj." in name:
            n_head = config.num_heads
        elif permute and ".self_attn.k_proj." in name:
            n_head = config.num_kv_heads
        readers[name] = _gguf_reader(t, shape, n_head, source)
        types[name] = t.tensor_type.name
        if t.tensor_type.name in GGUF_KEPT:
            blocks[name] = _gguf_blocks_reader(t, shape, n_head)
    return WeightSource(readers, expected, source, types, blocks)


def gguf_blocks(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedWeight:
    """A Q4_0, Q4_1 or Q8_0 tensor's raw blocks (``[rows, bytes]`` uint8) as its codes and scales, unchanged:
    each block is an fp16 scale (Q4_1: and an fp16 min), then 32 codes (4-bit: the low nibbles of 16 bytes
    are inputs 0-15, the high nibbles 16-31; Q8_0: int8, stored here offset by 128)."""
    fmt = FORMATS[type_name]
    rows, cols = shape
    blocks = np.ascontiguousarray(data).reshape(rows, cols // GROUP_SIZE, -1)
    head = 4 if fmt.has_min else 2
    scale = blocks[:, :, :2].copy().view(np.float16)[:, :, 0]
    minimum = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0] if fmt.has_min else None
    packed = blocks[:, :, head:]
    if fmt.bits == 4:
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=2)
    else:
        codes = packed ^ np.uint8(0x80)  # int8 two's complement -> code = q + 128
    return QuantizedWeight(fmt, codes.reshape(rows, cols), scale, minimum)


def _gguf_blocks_reader(t: Any, shape: tuple[int, ...], n_head: int | None) -> Callable[[], QuantizedWeight]:
    def read() -> QuantizedWeight:
        weight = gguf_blocks(t.data, t.tensor_type.name, shape)
        if n_head is None:
            return weight
        rows = unpermute_qk(np.arange(shape[0]), n_head)
        return weight.take_rows(rows)

    return read


def _gguf_reader(t: Any, shape: tuple[int, ...], n_head: int | None, source: str) -> Callable[[], np.ndarray]:
    import gguf

    def read() -> np.ndarray:
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelError(
                f"tensor {t.name} in {source} uses quantization {t.tensor_type.name}, which the "
                "gguf package cannot dequantize; use a file with another quantization"
            ) from None
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        return unpermute_qk(arr, n_head) if n_head else arr

    return read
