"""A float16 KV pool (``--kv-dtype float16``) against the float32 pool of the same weights: logits close
(tiny random models and SmolLM2 on a 1,000-token Austen prompt, top-1 agreement at every position), and
speculative greedy decoding exactly lossless within the float16 artifact, with both views."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_VOCAB

from mlc_magicdec.compile.build import compile_model
from mlc_magicdec.runtime.engine import Engine

SMOLLM2_LOGITS_ATOL = 2e-2
SMOLLM2_TOP1 = 0.99
GREEDY_TOKENS = 48


def logits_at_every_position(engine: Engine, ids: list[int]) -> np.ndarray:
    """One ``verify`` call over the whole of ``ids`` from position 0 (after a prefill that reserves pages)."""
    with engine.prefill([ids], max_new_tokens=1) as batch:
        n = len(ids)
        return engine.target.forward("verify", np.array(ids), np.zeros(n), np.arange(n), batch.seq_ids)


def assert_lossless(engine: Engine, prompts: list[list[int]], budget: int) -> None:
    plain = engine.generate(prompts, max_new_tokens=GREEDY_TOKENS, stop_at_eos=False)
    for view in ("streamingllm", "snapkv"):
        spec = engine.generate(
            prompts,
            max_new_tokens=GREEDY_TOKENS,
            stop_at_eos=False,
            speculate=True,
            draft=view,
            budget=budget,
            gamma=3,
        )
        for p, s in zip(plain, spec, strict=True):
            assert s.token_ids == p.token_ids, view
        assert sum(s.stats.drafted_tokens for s in spec) > 0


@pytest.fixture(scope="module")
def tiny_pair(tiny_models, tmp_path_factory):
    folder, _, fp32 = tiny_models("llama")
    fp16 = compile_model(folder, tmp_path_factory.mktemp("kv16") / "a", kv_dtype="float16", quiet=True)
    return Engine(fp32), Engine(fp16)


def test_the_pool_is_float16_and_the_weights_are_not(tiny_pair):
    fp32, engine = tiny_pair
    assert engine.artifact.config.kv_dtype == "float16" and engine.artifact.dtype == "float32"
    engine.target.ensure_pool(4, 4)
    assert engine.target.pool_tensor.dtype == "float16"
    ours, theirs = engine.artifact.spec, fp32.artifact.spec  # what the cost model and the reports count
    assert 2 * ours.kv_bytes_per_token == theirs.kv_bytes_per_token
    assert ours.weight_bytes == theirs.weight_bytes


def test_tiny_float16_pool_logits_are_close_to_float32(tiny_pair):
    fp32, fp16 = tiny_pair
    ids = np.random.default_rng(0).integers(3, TINY_VOCAB, 90).tolist()
    want, got = logits_at_every_position(fp32, ids), logits_at_every_position(fp16, ids)
    diff = np.abs(got - want).max()
    assert 0 < diff < 2e-2  # rounded, so not identical; close, since attention computes in float32
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.97


def test_tiny_float16_pool_is_lossless(tiny_pair):
    _, engine = tiny_pair
    rng = np.random.default_rng(1)
    assert_lossless(engine, [rng.integers(3, TINY_VOCAB, n).tolist() for n in (120, 75)], budget=40)


@pytest.mark.smollm2
def test_smollm2_float16_pool_against_float32(smollm2_gguf, smollm2_artifact, austen_texts, tmp_path):
    fp16 = Engine(compile_model(smollm2_gguf, tmp_path / "kv16", kv_dtype="float16", quiet=True))
    fp32 = Engine(smollm2_artifact)
    text = austen_texts["emma"]
    ids = fp32.encode(text[40000:52000])[:1000]
    assert len(ids) == 1000
    want, got = logits_at_every_position(fp32, ids), logits_at_every_position(fp16, ids)
    assert np.abs(got[-1] - want[-1]).max() < SMOLLM2_LOGITS_ATOL
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= SMOLLM2_TOP1
    assert_lossless(fp16, [ids, fp32.encode(text[90000:99000])[:700]], budget=128)
