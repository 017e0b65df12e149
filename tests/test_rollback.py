"""Commit and roll back: after speculative rounds with rejections, the KV that the pool holds for every
committed position is the target's KV of the accepted text, as a fresh prefill of that text computes it.

The draft writes its own (compressed-view) KV for the tokens it drafts and the verify pass overwrites them;
rejected tokens leave KV behind beyond the committed length. Only the committed part is compared.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_VOCAB

from mlc_magicdec.compile.attention import PAGE_SIZE
from mlc_magicdec.runtime.engine import Engine
from mlc_magicdec.runtime.views import DraftSettings, pack_views, streaming_view

KV_ATOL = 1e-5
NEW_TOKENS = 24
GAMMA = 4


def committed_kv(engine: Engine, seq_id: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V of the committed positions of ``seq_id``: ``[layers, positions, kv_heads, head_dim]`` each.

    CPU page layout: keys transposed within a page (``k[d * page_size + slot]``), values row-major
    (``v[slot * head_dim + d]``).
    """
    pool = engine.target.pool_tensor.numpy()
    pages = engine.target.pages
    layers, _, _, heads, width = pool.shape
    head_dim = width // PAGE_SIZE
    n = pages.length(seq_id)
    slots = pages.slots(seq_id, np.arange(n))
    page, offset = slots // PAGE_SIZE, slots % PAGE_SIZE
    blocks = pool[:, page]  # [layers, n, 2, heads, page_size * head_dim]
    keys = blocks[:, :, 0].reshape(layers, n, heads, head_dim, PAGE_SIZE)
    values = blocks[:, :, 1].reshape(layers, n, heads, PAGE_SIZE, head_dim)
    idx = np.arange(n)
    k = keys[:, idx, :, :, offset]  # advanced indices first: [n, layers, heads, head_dim]
    v = values[:, idx, :, offset, :]
    return np.moveaxis(k, 0, 1), np.moveaxis(v, 0, 1)


@pytest.fixture(scope="module")
def artifact(tiny_models):
    return tiny_models("llama")[2]


@pytest.mark.parametrize("draft,budget,temperature", [("streamingllm", 12, 1.0), ("snapkv", 40, 0.0),
                                                      ("snapkv", 36, 0.8)])
def test_committed_kv_equals_a_fresh_prefill_of_the_accepted_text(artifact, draft, budget, temperature):
    engine, fresh = Engine(artifact), Engine(artifact)
    rng = np.random.default_rng(budget)
    prompts = [rng.integers(3, TINY_VOCAB, n).tolist() for n in (70, 113, 46)]
    with engine.prefill(prompts, max_new_tokens=NEW_TOKENS) as batch:
        results = engine.decode(batch, speculate=True, draft=draft, budget=budget, gamma=GAMMA,
                                temperature=temperature, seed=11, stop_at_eos=False)
        stats = results[0].stats
        assert stats.verify_steps > 1
        assert 0 < stats.acceptance_rate < 1, "no rejection: the rollback was not exercised"
        assert any(n < GAMMA + 1 for r in results for n in r.accepted_lengths)
        spec = []
        for seq_id, prompt, r in zip(batch.seq_ids, prompts, results):
            assert len(r.token_ids) == NEW_TOKENS
            # everything but the last (pending) token is committed
            assert engine.target.pages.length(seq_id) == len(prompt) + NEW_TOKENS - 1
            spec.append(committed_kv(engine, seq_id))
    texts = [p + r.token_ids[:-1] for p, r in zip(prompts, results)]
    with fresh.prefill(texts, max_new_tokens=1) as ref_batch:
        for (k, v), seq_id, text in zip(spec, ref_batch.seq_ids, texts):
            assert fresh.target.pages.length(seq_id) == len(text)
            k_ref, v_ref = committed_kv(fresh, seq_id)
            assert k.shape == k_ref.shape == v.shape == v_ref.shape
            assert np.isfinite(k).all() and np.isfinite(v).all()
            np.testing.assert_allclose(k, k_ref, atol=KV_ATOL, rtol=0)
            np.testing.assert_allclose(v, v_ref, atol=KV_ATOL, rtol=0)


def test_the_comparison_sees_draft_kv(artifact):
    """The control: the draft's own KV for a token differs from the target's beyond layer 0, so a pool that
    kept draft KV (a verify that did not overwrite it) would fail the test above."""
    engine, fresh = Engine(artifact), Engine(artifact)
    rng = np.random.default_rng(3)
    prompt = rng.integers(3, TINY_VOCAB, 90).tolist()
    token = int(rng.integers(3, TINY_VOCAB))
    with engine.prefill([prompt], max_new_tokens=4) as batch:
        cfg = engine.config
        view = streaming_view(DraftSettings("streamingllm", budget=10, sink=2), len(prompt), cfg.num_layers,
                              cfg.num_kv_heads)
        static_pos, static_len = pack_views([view])
        window_start = np.array([view.window_start(len(prompt))], np.int32)
        engine.target.forward("draft", np.array([token]), np.array([0]), np.array([len(prompt)]),
                              batch.seq_ids, static_pos, static_len, window_start)
        engine.target.pages.set_length(batch.seq_ids[0], len(prompt) + 1)
        k, v = committed_kv(engine, batch.seq_ids[0])
    with fresh.prefill([prompt + [token]], max_new_tokens=1) as ref:
        k_ref, v_ref = committed_kv(fresh, ref.seq_ids[0])
    np.testing.assert_allclose(k[:, :-1], k_ref[:, :-1], atol=KV_ATOL, rtol=0)  # the prompt is the same
    np.testing.assert_allclose(k[0], k_ref[0], atol=KV_ATOL, rtol=0)  # layer 0 does not depend on attention
    assert np.abs(k[1:, -1] - k_ref[1:, -1]).max() > 100 * KV_ATOL
    assert np.abs(v[1:, -1] - v_ref[1:, -1]).max() > 100 * KV_ATOL
