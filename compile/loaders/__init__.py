"""Load Llama-family models from a GGUF file or a Hugging Face folder.

Both formats come out the same: a :class:`ModelConfig`, a lazy mapping from Hugging Face parameter names
(``transformers``' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MistralForCausalLM`` state_dict keys and
layouts) to float32 numpy arrays, and a serialized ``tokenizers.Tokenizer``.

GGUF files are read with the ``gguf`` package, which also dequantizes them; llama.cpp's tensor names are
mapped back to Hugging Face names and its q/k row permutation (Llama architectures) is undone. The
tokenizer is rebuilt from the GGUF metadata with the ``tokenizers`` library.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ModelError
from .gguf import llama3_scaling_from_rope_freqs, load_gguf, unpermute_qk
from .gguf_tokenizer import gguf_tokenizer_json
from .hf import load_hf_folder
from .source import LoadedModel, WeightSource, expected_weight_shapes, read_json

__all__ = [
    "LoadedModel",
    "WeightSource",
    "expected_weight_shapes",
    "gguf_tokenizer_json",
    "llama3_scaling_from_rope_freqs",
    "load_model",
    "read_json",
    "unpermute_qk",
]


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load a ``.gguf`` file or a Hugging Face folder (config.json, safetensors, tokenizer.json).

    Raises ModelError (one-line message) for a missing, incomplete, corrupt or unsupported model.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"model path {str(p)!r} does not exist; pass a .gguf file or a Hugging Face folder")
    if p.is_dir():
        return load_hf_folder(p)
    return load_gguf(p)

