"""The compiled SmolLM2-135M-Instruct against transformers (its own GGUF reader, dequantizer and model),
on long Austen prompts: logits, greedy generation, and batching that does not change results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlc_magicdec.runtime.engine import Engine

pytestmark = pytest.mark.smollm2

LOGITS_ATOL = 1e-3
GREEDY_TOKENS = 64
BATCH_TOKENS = 16


@pytest.fixture(scope="module")
def engine(smollm2_artifact) -> Engine:
    return Engine(smollm2_artifact)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    assert model.dtype == torch.float32
    return model.eval()


def _prompt(engine: Engine, text: str, n: int, offset: int = 20000) -> list[int]:
    ids = engine.encode(text[offset: offset + 12 * n])
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="module")
def prompt_1000(engine, austen_texts) -> list[int]:
    return _prompt(engine, austen_texts["prideprejudice"], 1000, offset=30000)


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompt_1000):
    """transformers' greedy continuation of the 1,000-token prompt and the logits it chose the first from."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_1000]), attention_mask=torch.ones(1, len(prompt_1000), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS, min_new_tokens=0, do_sample=False, eos_token_id=None,
            pad_token_id=0, top_k=None, top_p=None, temperature=None, output_logits=True,
            return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt_1000):].tolist()
    assert len(tokens) == GREEDY_TOKENS
    return tokens, out.logits[0][0].double().numpy()


def test_last_position_logits_match_transformers(engine, prompt_1000, hf_greedy):
    _, want = hf_greedy
    assert len(prompt_1000) == 1000
    with engine.prefill([prompt_1000], max_new_tokens=1) as batch:
        got = batch.logits[0]
    assert got.shape == want.shape == (engine.config.vocab_size,)
    assert want.std() > 1.0  # real logits, far wider than the tolerance
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_ATOL)


def test_greedy_64_tokens_match_transformers(engine, prompt_1000, hf_greedy):
    want, _ = hf_greedy
    [result] = engine.generate([prompt_1000], max_new_tokens=GREEDY_TOKENS, stop_at_eos=False)
    assert result.prompt_tokens == 1000 and result.finish_reason == "length"
    assert result.token_ids == want
    assert result.text == engine.decode_text(want)


def test_batching_does_not_change_results(engine, austen_texts, prompt_1000, hf_greedy):
    """Three prompts of 300, 700 and 1,000 tokens (2,000 tokens: prefill chunks mix sequences)."""
    prompts = [_prompt(engine, austen_texts["emma"], 300), _prompt(engine, austen_texts["persuasion"], 700),
               prompt_1000]
    batch = engine.generate(prompts, max_new_tokens=BATCH_TOKENS, stop_at_eos=False)
    alone = [engine.generate([p], max_new_tokens=BATCH_TOKENS, stop_at_eos=False)[0] for p in prompts]
    for i, (b, a) in enumerate(zip(batch, alone, strict=True)):
        assert b.prompt_tokens == a.prompt_tokens == len(prompts[i])
        assert len(b.token_ids) == BATCH_TOKENS
        assert b.token_ids == a.token_ids, f"prompt {i} ({len(prompts[i])} tokens)"
    assert batch[2].token_ids == hf_greedy[0][:BATCH_TOKENS]
    assert len({tuple(r.token_ids) for r in batch}) == 3
