"""Hugging Face folders: config.json, safetensors (sharded or not, F32/F16/BF16) and tokenizer.json."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig, ModelError
from .source import (
    LoadedModel,
    WeightSource,
    check_tokenizer_json,
    error_line,
    expected_weight_shapes,
    read_json,
)

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_HEADER_LEN = struct.Struct("<Q")  # the format: u64 header length, JSON header, data buffer
_BF16_SHIFT = 16  # bfloat16 is the top half of a float32
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def _corrupt(path: Path, e: BaseException) -> ModelError:
    return ModelError(f"cannot read {path}: {error_line(e)}; the file is corrupt, download it again")


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def load_hf_folder(folder: Path) -> LoadedModel:
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
        raise ModelError(f"bad value in {cfg_path} or generation_config.json: {error_line(e)}") from None

    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelError(f"{folder} has no tokenizer.json; copy it from the model's Hugging Face repository")
    tokenizer_json = tok_path.read_text(encoding="utf-8")
    check_tokenizer_json(tokenizer_json, str(tok_path))

    weights = _safetensors_weights(folder, config)
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer_json=tokenizer_json,
        source=str(folder),
        chat_template=_chat_template(folder),
    )


def _chat_template(folder: Path) -> str | None:
    """The default chat template of ``tokenizer_config.json`` (a string, or a list of named templates)."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    template = read_json(path).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


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
    """One safetensors file: names, dtypes and shapes read once; each tensor read through a handle that is
    closed again (numpy tensors via safetensors, bf16 via the header's byte offsets)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with self._open() as f:
                self.names = set(f.keys())
                slices = {name: f.get_slice(name) for name in self.names}
                self._dtypes = {name: s.get_dtype() for name, s in slices.items()}
                self._shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
        except Exception as e:
            raise _corrupt(path, e) from None
        self._header: dict[str, Any] | None = None

    def _open(self):
        from safetensors import safe_open

        return safe_open(str(self.path), framework="numpy")

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str) -> np.ndarray:
        if self.dtype(name) == "BF16":
            return self._read_bf16(name)
        with self._open() as f:
            return f.get_tensor(name)

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
