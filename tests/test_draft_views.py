"""The draft's compressed KV views: StreamingLLM and SnapKV selection against numpy, SnapKV's device scores
against transformers' attention probabilities, draft logits against transformers attending to the same
positions, and a view that covers everything giving the target's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_CONTEXT, TINY_VOCAB

from mlc_magicdec.runtime.drafter import snapkv_scores
from mlc_magicdec.runtime.engine import Engine
from mlc_magicdec.runtime.steptiming import synthetic_view
from mlc_magicdec.runtime.views import (
    DraftSettings,
    pack_views,
    smooth,
    snapkv_view,
    streaming_view,
)

LOGITS_ATOL = 1e-4
SCORES_ATOL = 1e-4
LAYERS, HEADS = 3, 2


# ------------------------------------------------------------------------------------------------------
# Host-side selection (pure numpy)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_smooth_is_a_zero_padded_moving_average(kernel):
    rng = np.random.default_rng(kernel)
    scores = rng.random((LAYERS, HEADS, 41))
    got = smooth(scores, kernel)
    assert got.shape == scores.shape
    for layer in range(LAYERS):
        for h in range(HEADS):
            want = np.convolve(scores[layer, h], np.ones(kernel), mode="same") / kernel
            np.testing.assert_allclose(got[layer, h], want, rtol=1e-12, atol=1e-12)


def _reference_snapkv(settings: DraftSettings, prompt_len: int, scores: np.ndarray) -> np.ndarray:
    """Per (layer, head): the top ``budget - window`` positions before the window by smoothed score."""
    candidates = prompt_len - settings.window
    keep = settings.budget - settings.window
    out = np.empty((LAYERS, HEADS, keep), np.int64)
    for layer in range(LAYERS):
        for h in range(HEADS):
            sm = np.convolve(scores[layer, h, :candidates], np.ones(settings.pool_kernel), mode="same")
            sm /= settings.pool_kernel
            out[layer, h] = np.sort(np.argsort(-sm, kind="stable")[:keep])
    return out


@pytest.mark.parametrize("budget,window,kernel", [(40, 8, 5), (64, 32, 5), (20, 4, 3), (50, 10, 1)])
def test_snapkv_view_keeps_the_top_smoothed_positions_per_layer_and_head(budget, window, kernel):
    rng = np.random.default_rng(budget + window)
    prompt_len = 300
    # scores as the device returns them: a row longer than the prompt (page padding), junk past the prompt
    scores = rng.random((LAYERS, HEADS, prompt_len + 20)).astype(np.float32)
    scores[..., prompt_len - window:] = 100.0  # window positions must never be chosen as static entries
    settings = DraftSettings("snapkv", budget=budget, window=window, pool_kernel=kernel)
    view = snapkv_view(settings, prompt_len, scores, LAYERS, HEADS)
    want = _reference_snapkv(settings, prompt_len, scores.astype(np.float64))
    assert view.static.shape == want.shape
    np.testing.assert_array_equal(view.static, want)
    assert (view.static < prompt_len - window).all()
    assert (np.diff(view.static, axis=-1) > 0).all()  # ascending, no duplicates
    # the heads really choose differently (so per-head selection is tested, not a shared list)
    assert not np.array_equal(view.static[0, 0], view.static[0, 1])
    assert not np.array_equal(view.static[0, 0], view.static[1, 0])
    # the recent window: right after prefill it is the observation window; it slides with the commits
    assert view.window_start(prompt_len) == prompt_len - window
    for committed in (prompt_len + 1, prompt_len + 7, prompt_len + 200):
        assert view.window_start(committed) == committed - window
    # budget entries of committed KV in all: static plus window
    assert view.static.shape[-1] + window == budget


def test_snapkv_view_prefers_a_smoothed_peak_over_an_isolated_one():
    """Pooling matters: a broad bump outranks a single spike of a higher raw score."""
    prompt_len, window = 100, 4
    scores = np.zeros((1, 1, prompt_len))
    scores[0, 0, 10] = 1.0  # spike: smoothed (kernel 5) to 0.2
    scores[0, 0, 50:55] = 0.5  # bump: its center smooths to 0.5
    view = snapkv_view(DraftSettings("snapkv", budget=window + 1, window=window, pool_kernel=5), prompt_len,
                       scores, 1, 1)
    assert view.static.tolist() == [[[52]]]
    view = snapkv_view(DraftSettings("snapkv", budget=window + 1, window=window, pool_kernel=1), prompt_len,
                       scores, 1, 1)
    assert view.static.tolist() == [[[10]]]


@pytest.mark.parametrize("prompt_len", [10, 36, 60])
def test_snapkv_view_with_budget_above_the_prompt_keeps_everything(prompt_len):
    settings = DraftSettings("snapkv", budget=64, window=32)
    scores = np.random.default_rng(0).random((LAYERS, HEADS, prompt_len + 16))
    for s in (scores, None):
        view = snapkv_view(settings, prompt_len, s, LAYERS, HEADS)
        candidates = max(prompt_len - 32, 0)
        assert view.static.shape == (LAYERS, HEADS, candidates)
        assert (view.static == np.arange(candidates)).all()
        # static plus window cover every committed position right after prefill
        covered = set(view.static[0, 0].tolist()) | set(range(view.window_start(prompt_len), prompt_len))
        assert covered == set(range(prompt_len))


@pytest.mark.parametrize("budget,sink", [(16, 4), (20, 0), (9, 8), (64, 4)])
def test_streaming_view_is_sinks_plus_a_sliding_window(budget, sink):
    for prompt_len in (1, 3, sink, budget - 1, budget, budget + 1, 200):
        if prompt_len < 1:
            continue
        settings = DraftSettings("streamingllm", budget=budget, sink=sink)
        view = streaming_view(settings, prompt_len, LAYERS, HEADS)
        sinks = list(range(min(sink, prompt_len)))
        assert view.static.shape == (LAYERS, HEADS, len(sinks))
        assert (view.static == np.array(sinks, dtype=np.int32)).all()
        for committed in range(prompt_len, prompt_len + 40):
            start = view.window_start(committed)
            attended = set(sinks) | set(range(start, committed))
            assert len(attended) == len(sinks) + (committed - start)  # sinks and window never overlap
            want = set(sinks) | set(range(max(committed - (budget - sink), 0), committed))
            assert attended == want, (prompt_len, committed)
            if prompt_len >= sink:
                assert len(attended) == min(committed, budget)


def test_pack_views_pads_ragged_static_lists():
    views = [streaming_view(DraftSettings("streamingllm", budget=10, sink=4), 50, LAYERS, HEADS),
             streaming_view(DraftSettings("streamingllm", budget=10, sink=4), 2, LAYERS, HEADS),
             snapkv_view(DraftSettings("snapkv", budget=12, window=4), 40,
                         np.random.default_rng(1).random((LAYERS, HEADS, 48)), LAYERS, HEADS)]
    static, lens = pack_views(views)
    assert lens.tolist() == [4, 2, 8]
    assert static.shape == (3, LAYERS, HEADS, 8)
    for i, v in enumerate(views):
        np.testing.assert_array_equal(static[i, ..., : lens[i]], v.static)


@pytest.mark.parametrize("budget", [128, 1024])
def test_synthetic_snapkv_views_come_in_runs_like_real_ones(budget):
    """The views that time draft steps (calibration, bench grid) hold ``budget - window`` distinct earlier
    positions per layer and head, in runs of neighbours as real SnapKV selections are (6-15 on average on
    Austen prompts), not scattered one by one."""
    settings, context = DraftSettings("snapkv", budget), 8192
    view = synthetic_view(settings, context, LAYERS, HEADS, np.random.default_rng(0))
    keep = budget - settings.window
    assert view.static.shape == (LAYERS, HEADS, keep)
    assert (np.diff(view.static, axis=-1) > 0).all() and view.static.max() < context - settings.window
    runs = (np.diff(view.static, axis=-1) != 1).sum(-1) + 1
    assert 6 <= keep / runs.mean() <= 15


# ------------------------------------------------------------------------------------------------------
# On the compiled tiny Llama


@pytest.fixture(scope="module")
def tiny(tiny_models):
    folder, _, artifact = tiny_models("llama")
    return folder, Engine(artifact)


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY_VOCAB, n).tolist() for n in lengths]


def _draft_and_verify_logits(engine: Engine, batch, views, tokens: np.ndarray):
    """Feed ``tokens[b, :]`` one at a time through the draft (as ``_draft_round`` does), then all at once
    through ``verify``; returns (draft logits, verify logits), both ``[batch, steps, vocab]``."""
    runner = engine.target
    n, steps = tokens.shape
    committed = np.array([len(p) for p in batch.prompts])
    for seq_id, c in zip(batch.seq_ids, committed):
        runner.pages.set_length(seq_id, int(c))
    static_pos, static_len = pack_views(views)
    window_start = np.array([v.window_start(int(c)) for v, c in zip(views, committed)], np.int32)
    draft = np.stack([
        runner.forward("draft", tokens[:, i], np.arange(n), committed + i, batch.seq_ids,
                       static_pos, static_len, window_start)
        for i in range(steps)], axis=1)
    seq_rows = np.repeat(np.arange(n), steps)
    positions = (committed[:, None] + np.arange(steps)).reshape(-1)
    verify = runner.forward("verify", tokens.reshape(-1), seq_rows, positions, batch.seq_ids)
    return draft, verify.reshape(n, steps, -1)


@pytest.mark.parametrize("kind", ["streamingllm", "snapkv"])
def test_a_view_covering_everything_gives_the_target_logits(tiny, kind):
    _, engine = tiny
    lengths = (150, 37, 90)
    with engine.prefill(_prompts(3, lengths), max_new_tokens=16) as batch:
        if kind == "streamingllm":  # no sinks and a window wider than everything committed
            settings = DraftSettings("streamingllm", budget=TINY_CONTEXT - 1, sink=0)
        else:  # SnapKV with a budget above the prompt keeps every position
            settings = DraftSettings("snapkv", budget=200, window=32)
        views = _views(engine, batch, settings)
        tokens = np.random.default_rng(4).integers(3, TINY_VOCAB, (len(lengths), 5))
        draft, verify = _draft_and_verify_logits(engine, batch, views, tokens)
        np.testing.assert_allclose(draft, verify, atol=LOGITS_ATOL, rtol=0)
        # one-token decode from the same state gives the same logits as well
        committed = np.array(lengths)
        decode = engine.target.forward("decode", tokens[:, 0], np.arange(len(lengths)), committed,
                                       batch.seq_ids)
        np.testing.assert_allclose(draft[:, 0], decode, atol=LOGITS_ATOL, rtol=0)


def test_a_compressing_view_changes_the_draft_logits(tiny):
    """The control: with a small budget the draft really attends to less (so the test above can fail)."""
    _, engine = tiny
    cfg = engine.config
    lengths = (150, 90)
    with engine.prefill(_prompts(5, lengths), max_new_tokens=16) as batch:
        settings = DraftSettings("streamingllm", budget=12, sink=2)
        views = [streaming_view(settings, n, cfg.num_layers, cfg.num_kv_heads) for n in lengths]
        tokens = np.random.default_rng(6).integers(3, TINY_VOCAB, (len(lengths), 3))
        draft, verify = _draft_and_verify_logits(engine, batch, views, tokens)
        assert np.abs(draft - verify).max() > 100 * LOGITS_ATOL


def test_full_view_speculation_accepts_every_greedy_draft(tiny):
    _, engine = tiny
    prompts = _prompts(7, (120, 60, 33))
    with engine.prefill(prompts, max_new_tokens=24) as batch:
        plain = engine.decode(batch, stop_at_eos=False)
        spec = engine.decode(batch, stop_at_eos=False, speculate=True, gamma=4,
                             draft_settings=DraftSettings("streamingllm", budget=TINY_CONTEXT - 1, sink=0))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert spec[0].stats.acceptance_rate == 1.0
    assert all(set(r.accepted_lengths[:-1]) == {5} for r in spec)


VIEW_CASES = {
    "streamingllm": DraftSettings("streamingllm", budget=20, sink=4),
    "snapkv": DraftSettings("snapkv", budget=48, window=16, pool_kernel=5),
}


def _views(engine: Engine, batch, settings: DraftSettings):
    cfg = engine.config
    if settings.kind == "streamingllm":
        return [streaming_view(settings, len(p), cfg.num_layers, cfg.num_kv_heads) for p in batch.prompts]
    scores = snapkv_scores(engine.target, [_Req(s, p, settings)
                                           for s, p in zip(batch.seq_ids, batch.prompts)])
    return [snapkv_view(settings, len(p), scores[s], cfg.num_layers, cfg.num_kv_heads)
            for s, p in zip(batch.seq_ids, batch.prompts)]


_ALLOWED: dict[int, torch.Tensor] = {}  # layer -> [heads, T, T] keys each query may attend to


def _masked_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention restricted, per layer and head, to the keys in ``_ALLOWED``."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = weights.masked_fill(~_ALLOWED[module.layer_idx][None], float("-inf"))
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


@pytest.mark.parametrize("kind", list(VIEW_CASES))
def test_draft_logits_equal_transformers_attending_to_the_view(tiny, kind):
    """End to end: each draft step equals transformers' model whose draft-position queries may only see the
    view's static positions (per layer and KV head) and the window up to themselves, while the prompt keeps
    full causal attention (its KV is the target's)."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    folder, engine = tiny
    cfg = engine.config
    group = cfg.num_heads // cfg.num_kv_heads
    AttentionInterface.register("magicdec_test_view", _masked_attention)
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="magicdec_test_view",
                                              dtype=torch.float32).eval()
    settings = VIEW_CASES[kind]
    lengths, steps = (150, 70), 4
    prompts = _prompts(9, lengths)
    tokens = np.random.default_rng(10).integers(3, TINY_VOCAB, (len(lengths), steps))
    with engine.prefill(prompts, max_new_tokens=16) as batch:
        views = _views(engine, batch, settings)
        draft, verify = _draft_and_verify_logits(engine, batch, views, tokens)
    assert np.abs(draft - verify).max() > 100 * LOGITS_ATOL  # the view really compresses
    for row, (prompt, view) in enumerate(zip(prompts, views)):
        n = len(prompt)
        if kind == "snapkv":  # the heads and layers really keep different positions
            assert not np.array_equal(view.static[0, 0], view.static[-1, -1])
        total = n + steps
        start = view.window_start(n)
        _ALLOWED.clear()
        for layer in range(cfg.num_layers):
            allowed = torch.tril(torch.ones(cfg.num_heads, total, total, dtype=torch.bool))
            allowed[:, n:, :] = False
            for h in range(cfg.num_heads):
                keep = torch.as_tensor(view.static[layer, h // group].astype(np.int64))
                for q in range(n, total):
                    allowed[h, q, keep] = True
                    allowed[h, q, start: q + 1] = True
            _ALLOWED[layer] = allowed
        with torch.no_grad():
            want = hf(torch.tensor([prompt + tokens[row].tolist()])).logits[0, n:].double().numpy()
        np.testing.assert_allclose(draft[row], want, atol=LOGITS_ATOL, rtol=0, err_msg=f"row {row}")


class _Req:
    """The fields of a request that ``drafter.snapkv_scores`` reads."""

    def __init__(self, seq_id: int, prompt: list[int], draft: DraftSettings):
        self.seq_id, self.prompt, self.draft = seq_id, prompt, draft


def test_snapkv_scores_match_transformers_attention(tiny):
    """``snapkv_scores[l, row, h, j]`` = attention that key ``j`` gets from the last ``w`` prompt queries,
    summed over those queries and over the query heads of KV head ``h`` (transformers' eager attention)."""
    from transformers import AutoModelForCausalLM

    folder, engine = tiny
    cfg = engine.config
    group = cfg.num_heads // cfg.num_kv_heads
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    lengths, window = (130, 47), 12
    prompts = _prompts(8, lengths)
    with engine.prefill(prompts, max_new_tokens=4) as batch:
        toks, rows, pos = [], [], []
        for row, p in enumerate(prompts):
            toks += p[-window:]
            rows += [row] * window
            pos += range(len(p) - window, len(p))
        scores = engine.target.forward("snapkv_scores", np.array(toks), np.array(rows), np.array(pos),
                                       batch.seq_ids)
    assert scores.shape[:3] == (cfg.num_layers, len(prompts), cfg.num_kv_heads)
    for row, p in enumerate(prompts):
        n = len(p)
        with torch.no_grad():
            attentions = hf(torch.tensor([p]), output_attentions=True).attentions
        assert len(attentions) == cfg.num_layers
        for layer, att in enumerate(attentions):
            probs = att[0, :, n - window:, :].double().numpy()  # [heads, window, n]
            want = probs.reshape(cfg.num_kv_heads, group, window, n).sum(axis=(1, 2))
            got = scores[layer, row, :, :n]
            np.testing.assert_allclose(got, want, atol=SCORES_ATOL, rtol=0,
                                       err_msg=f"layer {layer} row {row}")
            # each query's probabilities sum to one: the scores of a KV head add up to group * window
            np.testing.assert_allclose(got.sum(axis=-1), group * window, rtol=1e-4)
