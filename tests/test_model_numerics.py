"""Compiled tiny Llama / Qwen2 / Mistral models against transformers: logits of prefill, decode and verify
(ragged batches, chunked prefill) and greedy generation, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, TINY_VOCAB

from mlc_magicdec.runtime.engine import Engine

ATOL = 1e-4
PROMPT_LENGTHS = (5, 37, 20)
DECODE_STEPS = 6


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_models):
    """``(engine, hf_model)`` for one family."""
    _, model, artifact = tiny_models(request.param)
    return Engine(artifact), model


def _prompts(seed: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY_VOCAB, n).tolist() for n in lengths]


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """transformers' logits at every position of ``ids`` (one sequence, no padding), float64."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=None,
                             pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(ids):].tolist()


def decode(engine: Engine, seq_ids: list[int], tokens: list[int]) -> np.ndarray:
    """One decode step: feed ``tokens[i]`` to sequence ``i`` at its next position; returns its logits."""
    runner = engine.target
    positions = np.array([runner.pages.length(s) for s in seq_ids])
    logits = runner.forward("decode", np.array(tokens), np.arange(len(seq_ids)), positions, seq_ids)
    for s, p in zip(seq_ids, positions, strict=True):
        runner.pages.set_length(s, int(p) + 1)
    return logits


def _check_prefill_then_decode(engine: Engine, model, prompts: list[list[int]]) -> None:
    rng = np.random.default_rng(123)
    forced = [rng.integers(3, TINY_VOCAB, DECODE_STEPS).tolist() for _ in prompts]  # teacher-forced tokens
    expected = [hf_logits(model, p + f) for p, f in zip(prompts, forced, strict=True)]
    with engine.prefill(prompts, max_new_tokens=DECODE_STEPS) as batch:
        assert batch.logits.shape == (len(prompts), TINY_VOCAB)
        for i, p in enumerate(prompts):
            np.testing.assert_allclose(batch.logits[i], expected[i][len(p) - 1], rtol=0, atol=ATOL,
                                       err_msg=f"prefill logits of prompt {i} ({len(p)} tokens)")
        for step in range(DECODE_STEPS):
            logits = decode(engine, batch.seq_ids, [f[step] for f in forced])
            assert logits.shape == (len(prompts), TINY_VOCAB)
            for i, p in enumerate(prompts):
                np.testing.assert_allclose(logits[i], expected[i][len(p) + step], rtol=0, atol=ATOL,
                                           err_msg=f"decode step {step} of prompt {i}")


def _verify(engine: Engine, seq_ids: list[int], new: list[list[int]], starts: list[int]) -> np.ndarray:
    """Run ``verify`` on tokens ``new[i]`` of sequence ``i`` from position ``starts[i]`` (one ragged call)."""
    tokens = np.concatenate([np.array(n) for n in new])
    rows = np.concatenate([np.full(len(n), i) for i, n in enumerate(new)])
    positions = np.concatenate([np.arange(s, s + len(n)) for s, n in zip(starts, new, strict=True)])
    logits = engine.target.forward("verify", tokens, rows, positions, seq_ids)
    assert logits.shape == (len(tokens), TINY_VOCAB)
    return logits


def test_oracle_logits_are_not_trivial(tiny):
    """The tolerance means something only if the logits are spread out well beyond it."""
    _, model = tiny
    logits = hf_logits(model, _prompts(0)[1])
    assert logits.std(axis=-1).min() > 0.1
    assert len(set(logits.argmax(-1).tolist())) > 3


def test_batched_prefill_and_decode_match_transformers(tiny):
    engine, model = tiny
    _check_prefill_then_decode(engine, model, _prompts(1))


def test_chunked_prefill_matches_transformers(tiny):
    engine, model = tiny
    prompts = _prompts(2)
    old, engine.prefill_chunk = engine.prefill_chunk, 16  # 62 tokens in 4 chunks, 2 of them mixed
    try:
        _check_prefill_then_decode(engine, model, prompts)
    finally:
        engine.prefill_chunk = old


def test_single_token_prompts(tiny):
    engine, model = tiny
    _check_prefill_then_decode(engine, model, _prompts(3, (1, 1, 2)))


def test_verify_logits_at_every_position(tiny):
    """``verify`` over whole prompts (a ragged batch of 3 rows from position 0): every position's logits."""
    engine, model = tiny
    prompts = _prompts(4)
    with engine.prefill(prompts, max_new_tokens=1) as batch:  # reserves the pages; verify rewrites the KV
        logits = _verify(engine, batch.seq_ids, prompts, [0] * len(prompts))
    start = 0
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(logits[start:start + len(p)], hf_logits(model, p), rtol=0, atol=ATOL,
                                   err_msg=f"verify logits of prompt {i}")
        start += len(p)


def test_verify_after_prefill_matches_transformers(tiny):
    """Verify several new tokens per sequence on top of a prefilled cache (the speculative-decoding shape)."""
    engine, model = tiny
    prompts = _prompts(5)
    new = [np.random.default_rng(6 + i).integers(3, TINY_VOCAB, 5).tolist() for i in range(len(prompts))]
    with engine.prefill(prompts, max_new_tokens=len(new[0])) as batch:
        logits = _verify(engine, batch.seq_ids, new, [len(p) for p in prompts])
    for i, (p, n) in enumerate(zip(prompts, new, strict=True)):
        want = hf_logits(model, p + n)[len(p):]
        np.testing.assert_allclose(logits[i * len(n):(i + 1) * len(n)], want, rtol=0, atol=ATOL,
                                   err_msg=f"verify logits of sequence {i}")


@pytest.mark.parametrize("chunk", [1024, 16])
def test_greedy_generation_matches_transformers(tiny, chunk):
    engine, model = tiny
    prompts = _prompts(7)
    old, engine.prefill_chunk = engine.prefill_chunk, chunk
    try:
        results = engine.generate(prompts, max_new_tokens=32, stop_at_eos=False)
    finally:
        engine.prefill_chunk = old
    for i, (p, r) in enumerate(zip(prompts, results, strict=True)):
        want = hf_greedy(model, p, 32)
        assert r.token_ids == want, f"prompt {i} ({len(p)} tokens)"
        assert r.prompt_tokens == len(p) and r.finish_reason == "length"
    assert len({tuple(r.token_ids) for r in results}) == len(prompts)  # the rows really differ


def test_greedy_text_prompts_match_transformers(tiny):
    """Text prompts go through the artifact's tokenizer (one token per character here)."""
    engine, model = tiny
    texts = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome, clever, and rich,", "Hi"]
    results = engine.generate(texts, max_new_tokens=12, stop_at_eos=False)
    for text, r in zip(texts, results, strict=True):
        ids = engine.encode(text)
        assert len(ids) == len(text) and r.prompt_tokens == len(text)
        assert r.token_ids == hf_greedy(model, ids, 12)
        assert r.text == engine.decode_text(r.token_ids)
