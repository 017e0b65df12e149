"""Load Llama-family models from a GGUF file or a Hugging Face folder.

Both formats come out the same: a :class:`ModelConfig`, a lazy mapping from Hugging Face parameter names
(``transformers``' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` state_dict keys and
layouts) to float32 numpy arrays, and a serialized ``tokenizers.Tokenizer``.

GGUF files are read with the ``gguf`` package, which also dequantizes them; llama.cpp's tensor names are
mapped back to Hugging Face names and its q/k row permutation (Llama architectures) is undone. The
tokenizer is rebuilt from the GGUF metadata with the ``tokenizers`` library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig, ModelError

_MAX_ERROR_CHARS = 300


def _one_line(e: BaseException | str) -> str:
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
        self, readers: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple[int, ...]], source: str
    ):
        self._readers = readers
        self._shapes = shapes
        self._source = source

    def __getitem__(self, name: str) -> np.ndarray:
        reader = self._readers[name]  # KeyError for unknown names, as a Mapping should
        try:
            arr = reader()
        except ModelError:
            raise
        except Exception as e:  # third-party readers raise anything on corrupt data
            raise ModelError(
                f"cannot read tensor {name!r} from {self._source}: {_one_line(e)}; "
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

    def __repr__(self) -> str:
        return f"WeightSource({len(self)} tensors from {self._source})"


@dataclasses.dataclass
class LoadedModel:
    """A model ready to compile: its config, lazy float32 weights (HF names) and tokenizer."""

    config: ModelConfig
    weights: WeightSource
    tokenizer_json: str  # a serialized ``tokenizers.Tokenizer`` (tokenizer.json contents)
    source: str  # the path it came from


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


# ----------------------------------------------------------------------------------------------------------
# Entry point


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a ``.gguf`` file or a Hugging Face folder (config.json, safetensors, tokenizer.json).

    Raises ModelError (one-line message) for a missing, incomplete, corrupt or unsupported model.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model path {str(p)!r} does not exist; pass a .gguf file or a Hugging Face folder")
    if p.is_dir():
        return _load_hf_folder(p)
    return _load_gguf(p)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face folders

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_HEADER_LEN = struct.Struct("<Q")  # the format: u64 header length, JSON header, data buffer
_BF16_SHIFT = 16  # bfloat16 is the top half of a float32
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def _corrupt(path: Path, e: BaseException) -> ModelError:
    return ModelError(f"cannot read {path}: {_one_line(e)}; the file is corrupt, download it again")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ModelError (one line) if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {_one_line(e)}; the file is not valid JSON") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    return data


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _load_hf_folder(folder: Path) -> LoadedModel:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} has no config.json; pass a Hugging Face model folder or a .gguf file")
    try:
        config = ModelConfig.from_hf(read_json(cfg_path))
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            gen = read_json(gen_path)
            eos = list(config.eos_token_ids)
            eos += [i for i in _as_ids(gen.get("eos_token_id")) if i not in eos]
            bos = config.bos_token_id if config.bos_token_id is not None else gen.get("bos_token_id")
            config = dataclasses.replace(
                config, eos_token_ids=tuple(eos), bos_token_id=None if bos is None else int(bos)
            )
    except ModelError:
        raise
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelError(f"bad value in {cfg_path} or generation_config.json: {_one_line(e)}") from None

    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelError(f"{folder} has no tokenizer.json; copy it from the model's Hugging Face repository")
    tokenizer_json = tok_path.read_text(encoding="utf-8")
    _check_tokenizer_json(tokenizer_json, str(tok_path))

    weights = _safetensors_weights(folder, config)
    return LoadedModel(config=config, weights=weights, tokenizer_json=tokenizer_json, source=str(folder))


def _check_tokenizer_json(text: str, where: str) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ModelError(f"{where} is not a valid tokenizers JSON file: {_one_line(e)}") from None


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index} has no weight_map; the index file is corrupt")
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"{folder} has no *.safetensors weights; download them "
            "(PyTorch .bin checkpoints are not supported)"
        )
    from safetensors import safe_open

    located: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                located.update(dict.fromkeys(st.keys(), f))
        except Exception as e:  # SafetensorError and friends
            raise _corrupt(f, e) from None
    return located


class _SafetensorsFile:
    """One open safetensors file: numpy tensors via safetensors, bf16 via the header's byte offsets."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._handle = safe_open(str(path), framework="numpy")
            self._file = self._handle.__enter__()
            self.names = set(self._file.keys())
        except Exception as e:
            raise _corrupt(path, e) from None
        self._header: dict[str, Any] | None = None

    def dtype(self, name: str) -> str:
        return self._file.get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        if self.dtype(name) == "BF16":
            return self._read_bf16(name)
        return self._file.get_tensor(name)

    def _read_bf16(self, name: str) -> np.ndarray:
        # numpy has no bfloat16 and safetensors' numpy backend cannot return it: read the raw uint16
        # words at the tensor's offsets and widen them to float32.
        if self._header is None:
            with open(self.path, "rb") as f:
                (n,) = _SAFETENSORS_HEADER_LEN.unpack(f.read(_SAFETENSORS_HEADER_LEN.size))
                self._header = {"__start__": _SAFETENSORS_HEADER_LEN.size + n, **json.loads(f.read(n))}
        entry = self._header[name]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        raw = np.fromfile(
            self.path, dtype="<u2", count=(end - begin) // 2, offset=self._header["__start__"] + begin
        )
        return (raw.astype(np.uint32) << _BF16_SHIFT).view(np.float32).reshape(shape)


def _safetensors_weights(folder: Path, config: ModelConfig) -> WeightSource:
    located = _safetensors_files(folder)
    expected = expected_weight_shapes(config)
    missing = [n for n in expected if n not in located]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(
            f"{folder} lacks weight {missing[0]!r}{more}; the checkpoint is incomplete "
            "or does not match config.json"
        )
    files: dict[Path, _SafetensorsFile] = {}
    readers: dict[str, Callable[[], np.ndarray]] = {}
    for name in expected:
        path = located[name]
        if path not in files:
            if not path.is_file():
                raise ModelError(f"{path} is listed in {_SAFETENSORS_INDEX} but missing; download it")
            files[path] = _SafetensorsFile(path)
        st = files[path]
        if name not in st.names:
            raise ModelError(f"{path} has no tensor {name!r} although the index says so; the index is stale")
        if st.dtype(name) not in _FLOAT_DTYPES:
            raise ModelError(
                f"tensor {name!r} in {path} has dtype {st.dtype(name)}; "
                "quantized safetensors checkpoints are not supported, use the float one"
            )
        if st.shape(name) != expected[name]:
            raise ModelError(
                f"tensor {name!r} in {path} has shape {st.shape(name)}, expected "
                f"{expected[name]} from config.json; the checkpoint does not match its config"
            )
        readers[name] = lambda st=st, name=name: st.read(name)
    return WeightSource(readers, expected, str(folder))


# ----------------------------------------------------------------------------------------------------------
# GGUF

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


class _GGUFMeta:
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


def _open_gguf(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # truncated files raise ValueError, IndexError, struct.error...
        raise ModelError(
            f"cannot read GGUF file {path}: {_one_line(e)}; "
            "the file is truncated or not a GGUF, download it again"
        ) from None


def _load_gguf(path: Path) -> LoadedModel:
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
    meta = _GGUFMeta(reader, arch)
    tensors = {t.name: t for t in reader.tensors}
    try:
        config = _gguf_config(meta, tensors, family, str(path))
        tokenizer_json = gguf_tokenizer_json(meta, str(path))
    except ModelError:
        raise
    except Exception as e:  # malformed metadata values
        raise ModelError(
            f"bad metadata in {path}: {_one_line(e)}; the file is corrupt or unsupported"
        ) from None
    weights = _gguf_weights(tensors, config, permute=arch in _PERMUTED_ARCHS, source=str(path))
    return LoadedModel(config=config, weights=weights, tokenizer_json=tokenizer_json, source=str(path))


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _gguf_config(meta: _GGUFMeta, tensors: dict[str, Any], family: str, where: str) -> ModelConfig:
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
    return WeightSource(readers, expected, source)


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


# ----------------------------------------------------------------------------------------------------------
# GGUF tokenizers

# Pre-tokenizer split regexes, by `tokenizer.ggml.pre` (llama.cpp's names; see llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = {"default", "gpt-2", "gpt2", "phi-2", "olmo"}  # the GPT-2 regex of ByteLevel itself
_DIGITS_GPT2_PRE = {"smollm", "starcoder", "refact", "codeshell"}  # each \p{N} alone, then the GPT-2 regex
_REGEX_PRE = {  # pre -> (split regex, NFC-normalize as the original tokenizer.json does, ignore_merges)
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, True),
    "smaug-bpe": (_LLAMA3_SPLIT, False, True),
    "falcon3": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, True, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, True, False),
    "tekken": (_TEKKEN_SPLIT, False, False),
}
_SPM_SPACE = "\u2581"  # SentencePiece's word-boundary marker


def gguf_tokenizer_json(meta: _GGUFMeta, where: str = "GGUF") -> str:
    """Build the tokenizer a GGUF describes and return it serialized as tokenizer.json."""
    import gguf

    K = gguf.Keys.Tokenizer
    embedded = meta.get(K.HF_JSON)
    if embedded:
        _check_tokenizer_json(embedded, where)
        return embedded
    model = meta.get(K.MODEL)
    tokens = meta.get(K.LIST)
    if model is None or not tokens:
        raise ModelError(f"{where} has no tokenizer metadata; it cannot be used without a tokenizer")
    tokens = list(tokens)
    types = list(meta.get(K.TOKEN_TYPE) or [gguf.TokenType.NORMAL] * len(tokens))
    if model == "gpt2":
        tok = _byte_level_tokenizer(meta, tokens, where)
    elif model == "llama":
        tok = _sentencepiece_tokenizer(meta, tokens, types)
    else:
        raise ModelError(
            f"{where} uses tokenizer model {model!r}, which is not supported yet (supported: gpt2, llama)"
        )
    _add_special_tokens(tok, tokens, types, byte_level=model == "gpt2")
    _set_post_processor(tok, meta, tokens, byte_level=model == "gpt2")
    return tok.to_str()


def _merges(meta: _GGUFMeta) -> list[tuple[str, str]] | None:
    import gguf

    merges = meta.get(gguf.Keys.Tokenizer.MERGES)
    if merges is None:
        return None
    return [(a, b) for a, _, b in (m.partition(" ") for m in merges)]


def _byte_level_tokenizer(meta: _GGUFMeta, tokens: list[str], where: str) -> Any:
    import gguf
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = meta.get(gguf.Keys.Tokenizer.PRE, "default")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def respell(token: str) -> str:  # tokens outside the byte alphabet are stored as raw text
        return token if set(token) <= alphabet else "".join(s for s, _ in spell.pre_tokenize_str(token))

    vocab = {respell(t): i for i, t in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        raise ModelError(f"{where} has a gpt2 tokenizer without merges; the file is incomplete")
    ignore_merges = False
    normalizer = None
    if pre in _GPT2_PRE:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGITS_GPT2_PRE:
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _REGEX_PRE:
        split, nfc, ignore_merges = _REGEX_PRE[pre]
        pre_tok = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        normalizer = normalizers.NFC() if nfc else None
    else:
        raise ModelError(
            f"{where} uses pre-tokenizer {pre!r}, which is not supported yet; supported: "
            f"{', '.join(sorted(_GPT2_PRE | _DIGITS_GPT2_PRE | set(_REGEX_PRE)))}"
        )
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best
    merged-token score first (as transformers' converters derive them)."""
    merges = []
    for token, score in zip(vocab, scores, strict=True):
        splits = ((token[:k], token[k:]) for k in range(1, len(token)))
        pairs = [(a, b) for a, b in splits if a in vocab and b in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(score, len(a), len(b), a, b) for a, b in pairs]
    merges.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(a, b) for *_, a, b in merges]


def _sentencepiece_tokenizer(meta: _GGUFMeta, tokens: list[str], types: list[int]) -> Any:
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    K = gguf.Keys.Tokenizer
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(meta)
    if merges is None:
        scores = meta.get(K.SCORES)
        scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
        merges = _spm_merges({t: vocab[t] for t in tokens}, [scores[vocab[t]] for t in tokens])
    unk_id = meta.get(K.UNK_ID)
    unk = tokens[int(unk_id)] if unk_id is not None else None
    add_prefix = bool(meta.get(K.ADD_PREFIX, True))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPM_SPACE, prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special_tokens(tok: Any, tokens: list[str], types: list[int], *, byte_level: bool) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens (kept whole)."""
    import gguf
    from tokenizers import AddedToken, pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    control = [
        t
        for t, k in zip(tokens, types, strict=True)
        if k == gguf.TokenType.CONTROL and (not byte_level or set(t) <= alphabet)
    ]  # anything else is a llama.cpp mislabel
    user = [t for t, k in zip(tokens, types, strict=True) if k == gguf.TokenType.USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_post_processor(tok: Any, meta: _GGUFMeta, tokens: list[str], *, byte_level: bool) -> None:
    import gguf
    from tokenizers import processors

    K = gguf.Keys.Tokenizer
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    bos_id, eos_id = meta.get(K.BOS_ID), meta.get(K.EOS_ID)
    add_bos = bool(meta.get(K.ADD_BOS, not byte_level)) and bos_id is not None
    add_eos = bool(meta.get(K.ADD_EOS, False)) and eos_id is not None
    if add_bos or add_eos:
        bos = [tokens[int(bos_id)]] if add_bos else []
        eos = [tokens[int(eos_id)]] if add_eos else []
        single = " ".join([*bos, "$A", *eos])
        pair = " ".join([*bos, "$A", *eos, *bos, "$B:1", *eos])
        special = [(tokens[int(i)], int(i)) for i in dict.fromkeys([bos_id] * add_bos + [eos_id] * add_eos)]
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=special))
    if steps:
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
