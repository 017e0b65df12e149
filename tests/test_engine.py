"""Engine behaviour on the compiled tiny Llama: sampling (against softmax of transformers' logits), seeds,
and per-sequence stopping at EOS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, copy_folder, set_eos
from scipy import stats

from mlc_magicdec.compile.build import compile_model
from mlc_magicdec.runtime.engine import Engine

MIN_EXPECTED = 5.0  # chi-square cells with a smaller expected count are merged
DRAW_BATCH = 1000  # the same prompt this many times per generate call


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    folder, model, artifact = tiny_models("llama")
    return folder, model, Engine(artifact)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return tiny_llama[2]


def _prompts(seed: int, lengths=(5, 37, 20)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY_VOCAB, n).tolist() for n in lengths]


def hf_last_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def first_token_draws(engine: Engine, prompt: list[int], calls: int, **kwargs) -> np.ndarray:
    """The first generated token of ``prompt`` over ``calls * DRAW_BATCH`` independent draws."""
    draws = []
    for call in range(calls):
        results = engine.generate([prompt] * DRAW_BATCH, max_new_tokens=1, seed=1000 + call, **kwargs)
        draws += [r.token_ids[0] for r in results]
        assert all(len(r.token_ids) == 1 for r in results)
    return np.array(draws)


def chi_square_p(draws: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of ``draws`` to ``probs``; cells expecting fewer than MIN_EXPECTED are merged."""
    observed = np.bincount(draws, minlength=len(probs)).astype(np.float64)
    expected = probs * len(draws)
    big = expected >= MIN_EXPECTED
    obs, exp = list(observed[big]), list(expected[big])
    if (~big).any():
        obs.append(observed[~big].sum())
        exp.append(expected[~big].sum())
    if exp[-1] < MIN_EXPECTED and len(exp) > 2:  # fold a tiny "rest" cell into the smallest big one
        j = int(np.argmin(exp[:-1]))
        obs[j] += obs.pop()
        exp[j] += exp.pop()
    return float(stats.chisquare(obs, exp).pvalue)


# ------------------------------------------------------------------------------------------------------
# Sampling


def test_temperature_zero_is_greedy(engine, tiny_llama):
    model = tiny_llama[1]
    prompts = _prompts(10)
    greedy = engine.generate(prompts, max_new_tokens=24, stop_at_eos=False)
    for kwargs in ({"temperature": 0.0, "seed": 3}, {"temperature": 0.0, "top_p": 0.2, "seed": 4},
                   {"temperature": 0.0}):
        results = engine.generate(prompts, max_new_tokens=24, stop_at_eos=False, **kwargs)
        assert [r.token_ids for r in results] == [r.token_ids for r in greedy], kwargs
    # greedy is the argmax of the model's logits: the first token, from transformers' logits
    for p, r in zip(prompts, greedy, strict=True):
        assert r.token_ids[0] == int(np.argmax(hf_last_logits(model, p)))
    # a vanishing temperature samples the argmax too (logits are divided by T, not multiplied)
    cold = engine.generate(prompts, max_new_tokens=24, stop_at_eos=False, temperature=1e-4, seed=5)
    assert [r.token_ids for r in cold] == [r.token_ids for r in greedy]


def test_seed_makes_sampling_reproducible(engine):
    prompts = _prompts(11)
    kwargs = dict(max_new_tokens=32, temperature=1.5, stop_at_eos=False)
    a = engine.generate(prompts, seed=7, **kwargs)
    b = engine.generate(prompts, seed=7, **kwargs)
    c = engine.generate(prompts, seed=8, **kwargs)
    greedy = engine.generate(prompts, max_new_tokens=32, stop_at_eos=False)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for ra, rc, rg in zip(a, c, greedy, strict=True):
        assert len(ra.token_ids) == len(rc.token_ids) == 32
        assert ra.token_ids != rc.token_ids  # 32 draws at T=1.5 over 256 tokens: equal by chance ~never
        assert ra.token_ids != rg.token_ids
    # the same prompt twice in one batch gets two independent streams
    twice = engine.generate([prompts[0], prompts[0]], seed=7, **kwargs)
    assert twice[0].token_ids != twice[1].token_ids


def test_first_token_distribution_matches_softmax(engine, tiny_llama):
    """20,000 draws of the first token at T=1.5 follow softmax(logits / 1.5) of transformers' logits."""
    model = tiny_llama[1]
    prompt = _prompts(12)[1]
    logits = hf_last_logits(model, prompt)
    probs = softmax(logits / 1.5)
    assert (probs * 20 * DRAW_BATCH >= MIN_EXPECTED).sum() > 50  # many tokens have mass: a real test
    draws = first_token_draws(engine, prompt, 20, temperature=1.5, top_p=1.0)
    assert len(draws) == 20 * DRAW_BATCH
    assert chi_square_p(draws, probs) > 1e-3
    # the test has power: the same draws clearly reject the distribution at another temperature (T=1: the
    # temperature ignored; T=2.5) and the uniform one
    for wrong in (softmax(logits), softmax(logits / 2.5), np.full(TINY_VOCAB, 1 / TINY_VOCAB)):
        assert chi_square_p(draws, wrong) < 1e-6


def test_top_p_never_draws_outside_the_nucleus(engine, tiny_llama):
    model = tiny_llama[1]
    prompt = _prompts(13)[2]
    probs = softmax(hf_last_logits(model, prompt))
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    k = int(np.searchsorted(cum, 0.6)) + 1  # nucleus size for top_p just above cum[k - 2]
    top_p = float((cum[k - 2] + cum[k - 1]) / 2)  # halfway between two steps: no round-off question
    nucleus = order[:k]
    assert 3 <= k < TINY_VOCAB // 2
    draws = first_token_draws(engine, prompt, 4, temperature=1.0, top_p=top_p)
    outside = set(draws.tolist()) - set(nucleus.tolist())
    assert not outside, f"tokens {sorted(outside)} are outside the nucleus {sorted(nucleus.tolist())}"
    kept = np.zeros_like(probs)
    kept[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert chi_square_p(draws, kept) > 1e-3  # and inside it, the renormalized probabilities


# ------------------------------------------------------------------------------------------------------
# Stopping


@pytest.fixture(scope="module")
def eos_case(tiny_llama, tmp_path_factory):
    """A copy of the tiny Llama whose EOS is a token that greedy decoding of prompt 0 reaches at step > 0.

    Returns ``(engine_with_that_eos, prompts, full_greedy_outputs, stop_step, eos)``.
    """
    folder, _, engine = tiny_llama
    prompts = _prompts(14)
    full = [r.token_ids for r in engine.generate(prompts, max_new_tokens=16, stop_at_eos=False)]
    others = set(full[1]) | set(full[2])
    step = next(k for k in range(3, 16) if full[0][k] not in set(full[0][:k]) | others)
    eos = full[0][step]
    unused = min(set(range(3, TINY_VOCAB)) - set().union(*full))  # a second EOS id that never comes up
    copy = copy_folder(folder, tmp_path_factory.mktemp("eos") / "llama-eos")
    set_eos(copy, [unused, eos])  # replaces the default EOS (2)
    artifact = compile_model(copy, copy.parent / "artifact", target="llvm", quiet=True)
    eos_engine = Engine(artifact)
    assert set(eos_engine.config.eos_token_ids) == {unused, eos}
    return eos_engine, prompts, full, step, eos


def test_each_sequence_stops_at_its_own_eos(eos_case):
    engine, prompts, full, step, eos = eos_case
    results = engine.generate(prompts, max_new_tokens=16)
    assert results[0].finish_reason == "eos"
    assert results[0].token_ids == full[0][: step + 1] and results[0].token_ids[-1] == eos
    for i in (1, 2):
        assert results[i].finish_reason == "length"
        assert results[i].token_ids == full[i]  # the others go on, unchanged by the stop
    # with stop_at_eos=False the EOS is just another token
    ignored = engine.generate(prompts, max_new_tokens=16, stop_at_eos=False)
    assert [r.token_ids for r in ignored] == full
    assert all(r.finish_reason == "length" for r in ignored)


def test_eos_as_first_token_stops_after_prefill(eos_case):
    engine, prompts, full, _, eos = eos_case
    rng = np.random.default_rng(15)
    candidates = [rng.integers(3, TINY_VOCAB, 8).tolist() for _ in range(400)]
    firsts = [r.token_ids[0] for r in engine.generate(candidates, max_new_tokens=1, stop_at_eos=False)]
    hits = [c for c, t in zip(candidates, firsts, strict=True) if t == eos]
    assert hits, "no random prompt starts with the EOS token; pick another seed"
    results = engine.generate([prompts[1], hits[0], prompts[2]], max_new_tokens=16)
    assert results[1].token_ids == [eos] and results[1].finish_reason == "eos"
    assert results[1].text == engine.decode_text([eos])
    assert [results[0].token_ids, results[2].token_ids] == [full[1], full[2]]
    assert results[0].finish_reason == results[2].finish_reason == "length"


def test_max_new_tokens_is_exact(engine):
    prompts = _prompts(16)
    for n in (1, 2, 17):
        results = engine.generate(prompts, max_new_tokens=n, stop_at_eos=False)
        assert [len(r.token_ids) for r in results] == [n] * 3
        assert all(r.finish_reason == "length" for r in results)


def test_the_artifact_chooses_the_default_draft_view(tiny_models, tmp_path):
    """``compile --draft streamingllm`` records the view; speculation without ``draft`` then uses it."""
    folder = tiny_models("llama")[0]
    artifact = compile_model(folder, tmp_path / "streaming", drafts=("streamingllm",), quiet=True)
    engine = Engine(artifact)
    assert engine.default_draft() == "streamingllm"
    assert Engine(tiny_models("llama")[2]).default_draft() == "snapkv"  # compiled without --draft
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, TINY_VOCAB, 90).tolist()
    with engine.prefill([prompt], max_new_tokens=12) as batch:
        runs = {
            draft: engine.decode(batch, speculate=True, draft=draft, budget=40, gamma=3, stop_at_eos=False)[0]
            for draft in (None, "streamingllm", "snapkv")
        }
    assert runs[None].accepted_lengths == runs["streamingllm"].accepted_lengths
    assert runs[None].token_ids == runs["snapkv"].token_ids  # lossless either way
