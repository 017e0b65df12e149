"""Tests for compile/loaders.py: HF folders and GGUF files, checked against transformers and tokenizers."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mlc_magicdec.compile.config import ModelError
from mlc_magicdec.compile.loaders import LoadedModel, load_model, unpermute_qk
from mlc_magicdec.texts import novels

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 320
TRICKY = [
    "Hello 1234 world <|im_start|>user\nHi there!<|im_end|>\n",
    "  leading spaces\n\n\ttabs and\r\nCRLF\rCR",
    "émigré naïve café 日本語 😀 Ωμέγα",
    "don't I'll we've HE'S they'd",
    "3.14159 1,000,000 -42 x=y+z; f(a[0])",
    "<|im_start|><|im_end|><|endoftext|>",
    "<|im_start|<|im_end|>>",
    "x" * 200,
    "   ",
    "",
    "\u00a0nbsp\u2003em-space",
    "ĠHello",
]


_novels = functools.cache(novels)


def _austen(chars_per_book: int = 3000, offset: int = 20000) -> list[str]:
    books = [text[offset:offset + chars_per_book] for text in _novels().values()]
    assert all(books), f"the shipped Austen texts are shorter than {offset + chars_per_book} characters"
    return books


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------------
# A tiny byte-level BPE tokenizer, trained here (the "original HF tokenizer" for the tiny models)


def _train_bpe(pre: pre_tokenizers.PreTokenizer, vocab_size: int = TINY_VOCAB) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_austen(20000, 0), trainer)
    return tok


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Tokenizer:
    """SmolLM-style: each digit alone, then the GPT-2 byte-level regex."""
    return _train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)]))


# ------------------------------------------------------------------------------------------------------
# Tiny random HF models

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0,
                  "original_max_position_embeddings": 8192}


def _tiny_hf(family: str, **overrides):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(**{"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_SCALING),
                             "tie_word_embeddings": False, **common})
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(**{"tie_word_embeddings": True, "rope_theta": 1000000.0, **common})
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = MistralConfig(**{"sliding_window": 4096, "tie_word_embeddings": False, **common})
        model = MistralForCausalLM(cfg)
    with torch.no_grad():  # norms start at 1 and biases at 0: randomize so that they are checked too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    return model


def _save_hf(model, folder: Path, tokenizer: Tokenizer, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _hf_state(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def _assert_weights_equal(loaded: LoadedModel, expected: dict[str, np.ndarray]) -> None:
    assert sorted(loaded.weights) == sorted(expected)
    assert len(loaded.weights) == len(expected)
    for name, want in expected.items():
        got = loaded.weights[name]
        assert name in loaded.weights
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def _assert_config_matches(loaded: LoadedModel, hf_cfg, family: str, context: int | None = None) -> None:
    c = loaded.config
    assert c.family == family
    assert c.vocab_size == hf_cfg.vocab_size
    assert c.hidden_size == hf_cfg.hidden_size
    assert c.intermediate_size == hf_cfg.intermediate_size
    assert c.num_layers == hf_cfg.num_hidden_layers
    assert c.num_heads == hf_cfg.num_attention_heads
    assert c.num_kv_heads == hf_cfg.num_key_value_heads
    assert c.head_dim == hf_cfg.hidden_size // hf_cfg.num_attention_heads
    assert c.context_window == (context or hf_cfg.max_position_embeddings)
    assert c.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps)
    assert c.rope_theta == pytest.approx(hf_cfg.rope_parameters["rope_theta"])
    assert c.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert c.bos_token_id == hf_cfg.bos_token_id


def test_hf_llama_untied_gqa_llama3_rope(tmp_path, tiny_tokenizer):
    model = _tiny_hf("llama", eos_token_id=[2, 0])
    folder = _save_hf(model, tmp_path / "llama", tiny_tokenizer)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 5]  # generation_config may add end tokens of its own
    (folder / "generation_config.json").write_text(json.dumps(gen))

    loaded = load_model(folder)
    _assert_weights_equal(loaded, _hf_state(model))
    _assert_config_matches(loaded, model.config, "llama")
    assert loaded.config.rope_scaling == LLAMA3_SCALING
    assert loaded.config.eos_token_ids == (2, 0, 5)
    assert not loaded.config.qkv_bias and "lm_head.weight" in loaded.weights
    assert loaded.source == str(folder)
    assert Tokenizer.from_str(loaded.tokenizer_json).encode("Emma Woodhouse").ids == \
        tiny_tokenizer.encode("Emma Woodhouse").ids


def test_hf_qwen2_bias_tied(tmp_path, tiny_tokenizer):
    model = _tiny_hf("qwen2")
    loaded = load_model(_save_hf(model, tmp_path / "qwen", tiny_tokenizer))
    _assert_weights_equal(loaded, _hf_state(model))
    _assert_config_matches(loaded, model.config, "qwen2")
    assert loaded.config.qkv_bias and loaded.config.tie_word_embeddings
    assert "lm_head.weight" not in loaded.weights and "model.layers.1.self_attn.k_proj.bias" in loaded.weights
    assert loaded.config.rope_scaling is None


def test_hf_mistral_sharded(tmp_path, tiny_tokenizer):
    model = _tiny_hf("mistral")
    folder = _save_hf(model, tmp_path / "mistral", tiny_tokenizer, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    loaded = load_model(folder)
    _assert_weights_equal(loaded, _hf_state(model))
    _assert_config_matches(loaded, model.config, "mistral", context=4096)  # capped at the sliding window


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hf_half_precision(tmp_path, tiny_tokenizer, dtype):
    model = _tiny_hf("llama").to(dtype)
    loaded = load_model(_save_hf(model, tmp_path / "half", tiny_tokenizer))
    _assert_weights_equal(loaded, _hf_state(model))  # f16/bf16 -> f32 is exact


# ------------------------------------------------------------------------------------------------------
# Tiny GGUF files, written the way llama.cpp's convert_hf_to_gguf.py does

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(theta: float, head_dim: int, s: dict) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (llama3 rope_freqs)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        old = s["original_max_position_embeddings"]
        if wavelen < old / s["high_freq_factor"]:
            out.append(1.0)
        elif wavelen > old / s["low_freq_factor"]:
            out.append(s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def _add_gpt2_vocab(w: gguf.GGUFWriter, tok: Tokenizer, pre: str) -> None:
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)


def _write_gguf(path: Path, model, tok: Tokenizer, *, arch: str = "llama",
                qtype=gguf.GGMLQuantizationType.F32, pre: str = "smollm",
                rope_freqs: np.ndarray | None = None) -> Path:
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    _add_gpt2_vocab(w, tok, pre)
    for name, t in _hf_state(model).items():
        if arch == "llama" and ".q_proj." in name:
            t = _llamacpp_permute(t, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            t = _llamacpp_permute(t, cfg.num_key_value_heads)
        if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(_gguf_name(name), t)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(_gguf_name(name), t.astype(np.float16))
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama():
    return _tiny_hf("llama")


def test_gguf_llama_f32_exact_and_unpermuted(tmp_path, tiny_llama, tiny_tokenizer):
    cfg = tiny_llama.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    freqs = _llama3_rope_freqs(cfg.rope_parameters["rope_theta"], head_dim, LLAMA3_SCALING)
    path = _write_gguf(tmp_path / "tiny.gguf", tiny_llama, tiny_tokenizer, rope_freqs=freqs)
    loaded = load_model(path)
    _assert_weights_equal(loaded, _hf_state(tiny_llama))
    _assert_config_matches(loaded, cfg, "llama")
    assert loaded.config.rope_scaling == LLAMA3_SCALING  # recovered from the rope_freqs tensor
    assert loaded.config.eos_token_ids == (2,) and loaded.config.bos_token_id == 1
    assert loaded.source == str(path)


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0])
def test_gguf_llama_quantized(tmp_path, tiny_llama, tiny_tokenizer, qtype):
    path = _write_gguf(tmp_path / "tiny.gguf", tiny_llama, tiny_tokenizer, qtype=qtype)
    loaded = load_model(path)
    expected = _hf_state(tiny_llama)
    assert sorted(loaded.weights) == sorted(expected)
    for name, want in expected.items():
        got = loaded.weights[name]
        assert got.dtype == np.float32 and got.shape == want.shape
        if want.ndim == 1:
            np.testing.assert_array_equal(got, want)
        elif qtype == gguf.GGMLQuantizationType.F16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
        else:  # Q8_0: blocks of 32, step max|w| / 127 stored in f16: half a step plus 127 f16 roundings
            step = np.abs(want.reshape(want.shape[0], -1, 32)).max(-1, keepdims=True) / 127
            err = np.abs(got - want).reshape(step.shape[0], -1, 32)
            assert (err <= step * (0.5 + 127 * 2.0**-11)).all(), name
            assert err.max() > 0  # it really was quantized


def test_gguf_qwen2_not_permuted_with_bias(tmp_path, tiny_tokenizer):
    model = _tiny_hf("qwen2")
    path = _write_gguf(tmp_path / "qwen.gguf", model, tiny_tokenizer, arch="qwen2", pre="qwen2")
    loaded = load_model(path)
    _assert_weights_equal(loaded, _hf_state(model))
    assert loaded.config.family == "qwen2" and loaded.config.qkv_bias and loaded.config.tie_word_embeddings


def test_unpermute_inverts_llamacpp_permute():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((48, 5)), rng.standard_normal(48)
    for n_head in (1, 3, 6):
        np.testing.assert_array_equal(unpermute_qk(_llamacpp_permute(w, n_head), n_head), w)
        np.testing.assert_array_equal(unpermute_qk(_llamacpp_permute(b, n_head), n_head), b)


def test_weights_mapping_is_lazy_and_read_only(tmp_path, tiny_llama, tiny_tokenizer):
    loaded = load_model(_write_gguf(tmp_path / "tiny.gguf", tiny_llama, tiny_tokenizer))
    w = loaded.weights
    assert "nope" not in w and "model.norm.weight" in w
    with pytest.raises(KeyError):
        w["nope"]
    assert w.shape("model.layers.0.mlp.down_proj.weight") == (64, 96)
    assert not hasattr(w, "__setitem__")
    first = w["model.norm.weight"]
    first[:] = 0  # the caller owns what it gets
    assert w["model.norm.weight"].any()


# ------------------------------------------------------------------------------------------------------
# GGUF tokenizers against the tokenizer they were made from, and against transformers


@pytest.mark.parametrize("pre,pre_tokenizer", [
    ("smollm", None),
    ("gpt-2", pre_tokenizers.ByteLevel(add_prefix_space=False)),
    ("llama-bpe", "llama3"),
    ("qwen2", "qwen2"),
])
def test_gguf_gpt2_tokenizer_matches_original(tmp_path, tiny_llama, tiny_tokenizer, pre, pre_tokenizer):
    from tokenizers import Regex, normalizers

    from mlc_magicdec.compile.loaders import gguf_tokenizer as loaders

    if pre_tokenizer is None:
        original = tiny_tokenizer
    else:
        if isinstance(pre_tokenizer, str):
            regex = loaders._LLAMA3_SPLIT if pre_tokenizer == "llama3" else loaders._QWEN2_SPLIT
            pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        original = _train_bpe(pre_tokenizer)
        if pre == "qwen2":
            original.normalizer = normalizers.NFC()
    path = _write_gguf(tmp_path / "tok.gguf", tiny_llama, original, pre=pre)
    rebuilt = Tokenizer.from_str(load_model(path).tokenizer_json)
    for text in _austen(2000) + TRICKY + ["Cafe\u0301 ½ ² 12345"]:
        assert rebuilt.encode(text).ids == original.encode(text).ids, repr(text[:80])
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == \
            original.decode(original.encode(text).ids, skip_special_tokens=False)


def test_gguf_unknown_pretokenizer_is_an_error(tmp_path, tiny_llama, tiny_tokenizer):
    path = _write_gguf(tmp_path / "tok.gguf", tiny_llama, tiny_tokenizer, pre="some-new-pre")
    with pytest.raises(ModelError, match="some-new-pre") as e:
        load_model(path)
    _one_line_error(e)


def _write_spm_gguf(path: Path, model) -> Path:
    """A Llama-2 style (SentencePiece BPE) vocabulary: byte tokens, control tokens, scores, no merges."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_austen(5000, 0), trainers.BpeTrainer(
        vocab_size=model.config.vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_scores([-float(i) for _, i in vocab])
    types = {"<unk>": gguf.TokenType.UNKNOWN, "<s>": gguf.TokenType.CONTROL, "</s>": gguf.TokenType.CONTROL}
    w.add_token_types([types.get(t, gguf.TokenType.BYTE if t in byte_tokens else gguf.TokenType.NORMAL)
                       for t, _ in vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, t in _hf_state(model).items():
        w.add_tensor(_gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    model = _tiny_hf("llama", vocab_size=600)
    path = _write_spm_gguf(tmp_path / "spm.gguf", model)
    rebuilt = Tokenizer.from_str(load_model(path).tokenizer_json)
    oracle = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in _austen(1500) + TRICKY + ["<s>hi</s> ☃ \n\n x"]:
        ids = rebuilt.encode(text).ids
        assert ids == oracle(text).input_ids, repr(text[:80])
        assert ids[0] == 1  # llama.cpp adds BOS to SentencePiece vocabularies by default
        assert rebuilt.decode(ids) == oracle.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------
# Errors: one line, saying what is wrong


def test_missing_path():
    with pytest.raises(ModelError, match="does not exist") as e:
        load_model("/nonexistent/model.gguf")
    _one_line_error(e)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError) as e:
        load_model(path)
    _one_line_error(e)


def test_truncated_gguf(tmp_path, tiny_llama, tiny_tokenizer):
    full = _write_gguf(tmp_path / "full.gguf", tiny_llama, tiny_tokenizer)
    data = full.read_bytes()
    for cut in (100, len(data) // 4, len(data) - 1000):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError) as e:
            load_model(path)
        _one_line_error(e)


def test_folder_errors(tmp_path, tiny_tokenizer):
    model = _tiny_hf("llama")
    folder = _save_hf(model, tmp_path / "m", tiny_tokenizer)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="config.json") as e:
        load_model(empty)
    _one_line_error(e)

    for missing, what in (("tokenizer.json", "tokenizer.json"), ("model.safetensors", "safetensors")):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(folder, broken)
        (broken / missing).unlink()
        with pytest.raises(ModelError, match=what) as e:
            load_model(broken)
        _one_line_error(e)

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(folder, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="GPT2LMHeadModel") as e:
        load_model(gpt2)
    _one_line_error(e)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    st = corrupt / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ModelError, match="model.safetensors") as e:
        load_model(corrupt)
    _one_line_error(e)

    garbage = tmp_path / "garbage"
    shutil.copytree(folder, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x07" * 64)
    with pytest.raises(ModelError) as e:
        load_model(garbage)
    _one_line_error(e)

    bad_json = tmp_path / "badjson"
    shutil.copytree(folder, bad_json)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json") as e:
        load_model(bad_json)
    _one_line_error(e)


def test_unsupported_gguf_architecture(tmp_path, tiny_llama, tiny_tokenizer):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    _add_gpt2_vocab(w, tiny_tokenizer, "gpt-2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="gpt2") as e:
        load_model(path)
    _one_line_error(e)


def test_unsupported_quantization_named(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch):
    path = _write_gguf(tmp_path / "q.gguf", tiny_llama, tiny_tokenizer, qtype=gguf.GGMLQuantizationType.Q8_0)
    loaded = load_model(path)

    def unsupported(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", unsupported)
    with pytest.raises(ModelError, match="Q8_0") as e:
        loaded.weights["model.layers.0.mlp.up_proj.weight"]
    _one_line_error(e)


# ------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF, against transformers' own GGUF loader


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    from mlc_magicdec.compile.fetch import fetch_model

    return fetch_model(quiet=True)


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> LoadedModel:
    return load_model(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_path):
    """transformers' dequantized model (its own GGUF reader and dequantizer: an independent oracle)."""
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM, GgufConfig

    # transformers asks for `accelerate` before loading any GGUF, but does not use it for a CPU load.
    patch = pytest.MonkeyPatch()
    patch.setattr(modeling_utils, "is_accelerate_available", lambda *a, **k: True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
    finally:
        patch.undo()
    return model


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.mark.smollm2
def test_smollm2_config(smollm2, smollm2_hf):
    c = smollm2.config
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 9, 3, 64)
    assert (c.vocab_size, c.context_window, c.intermediate_size) == (49152, 8192, 1536)
    assert c.tie_word_embeddings and not c.qkv_bias and c.rope_scaling is None
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)  # <|im_start|>, <|im_end|>
    hf = smollm2_hf.config
    assert c.rope_theta == hf.rope_parameters["rope_theta"]
    assert c.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert (c.vocab_size, c.num_layers, c.intermediate_size) == \
        (hf.vocab_size, hf.num_hidden_layers, hf.intermediate_size)


@pytest.mark.smollm2
def test_smollm2_weights_match_transformers(smollm2, smollm2_hf):
    expected = {k: v for k, v in smollm2_hf.state_dict().items() if k != "lm_head.weight"}
    assert sorted(smollm2.weights) == sorted(expected)
    for name, want in expected.items():
        got = smollm2.weights[name]
        assert got.dtype == np.float32 and got.shape == tuple(want.shape), name
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_hf_tokenizer):
    tok = Tokenizer.from_str(smollm2.tokenizer_json)
    for text in _austen(3000) + _austen(1000, 150000) + TRICKY:
        assert tok.encode(text).ids == smollm2_hf_tokenizer(text).input_ids, repr(text[:80])
    chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    ids = tok.encode(chat).ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == chat


@pytest.mark.smollm2
def test_smollm2_tokenizer_isolates_numbers_like_llamacpp(smollm2, smollm2_hf_tokenizer):
    """The file's pre-tokenizer is "smollm": llama.cpp (and SmolLM2's own tokenizer.json) isolate every
    \\p{N} character before the GPT-2 regex. transformers' GGUF converter ignores "smollm" and uses the
    plain GPT-2 regex, which differs only on a space before a non-ASCII number such as "½"."""
    tok = Tokenizer.from_str(smollm2.tokenizer_json)
    assert tok.encode(" ½").tokens == ["Ġ", "Â½"]
    assert smollm2_hf_tokenizer.convert_ids_to_tokens(smollm2_hf_tokenizer(" ½").input_ids) == ["ĠÂ", "½"]
    assert tok.encode(" 42").tokens == ["Ġ", "4", "2"]
