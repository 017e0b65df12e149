"""Speculative sampling is lossless: with a deliberately bad draft (a tiny StreamingLLM budget), so that draft
tokens are often rejected and resampled, the joint distribution of the first three generated tokens equals the
target's, computed exactly by enumerating all 16**3 continuations with transformers.

A random Llama with a 16-token vocabulary and large weights (peaked, context-dependent distributions) keeps
the enumeration small and every cell of the chi-square test well populated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from mlc_magicdec.compile.build import compile_model
from mlc_magicdec.runtime.engine import Engine
from mlc_magicdec.runtime.views import DraftSettings

VOCAB = 16
CONTEXT = 64
PROMPT_LEN = 40
NEW = 3  # generated tokens whose joint distribution is tested: VOCAB ** NEW cells
ROWS = 2000  # copies of the prompt in one batch
CALLS = 10  # decode calls (distinct seeds) on the one prefilled batch: ROWS * CALLS draws
MIN_EXPECTED = 5.0  # cells expecting fewer draws are merged
P_MIN = 1e-3  # a correct distribution passes the chi-square test at this level
P_REJECT = 1e-6  # a wrong one must fail it at this level
BAD_DRAFT = DraftSettings(kind="streamingllm", budget=16, sink=2)  # 2 sinks + 14 recent of 40+ positions
GAMMA = 3
TOP_P_CANDIDATES = np.arange(0.6, 0.91, 0.01)
NUCLEUS_TEMPERATURE = 1.3


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + list("abcdefghijklm"))}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def make_model(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(20)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, initializer_range=0.4,
                      tie_word_embeddings=False, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(transformers model, engine, prompt, prefilled batch of ROWS copies of the prompt)."""
    root = tmp_path_factory.mktemp("vocab16")
    model = make_model(root / "hf")
    engine = Engine(compile_model(root / "hf", root / "artifact", target="llvm", quiet=True))
    prompt = np.random.default_rng(21).integers(3, VOCAB, PROMPT_LEN).tolist()
    batch = engine.prefill([prompt] * ROWS, max_new_tokens=NEW)
    yield model, engine, prompt, batch
    engine.release(batch)


# ------------------------------------------------------------------------------------------------------
# The exact distribution


def processed(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T) restricted to the smallest top set of mass >= top_p, renormalized (rows)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        cum = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
        keep_sorted = (cum - np.take_along_axis(p, order, axis=-1)) < top_p  # mass before it is below top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


@pytest.fixture(scope="module")
def tree_logits(setup):
    """transformers' next-token logits after the prompt plus every continuation of 0, 1 and 2 tokens:
    ``[1, V]``, ``[V, V]`` and ``[V * V, V]`` (row = the continuation in base V)."""
    model, _, prompt, _ = setup
    levels = []
    with torch.no_grad():
        for depth in range(NEW):
            suffixes = np.indices((VOCAB,) * depth, dtype=np.int64).reshape(depth, VOCAB ** depth).T  # base V
            ids = torch.tensor([prompt + s.tolist() for s in suffixes])
            levels.append(model(ids).logits[:, -1].double().numpy())
    return levels


def exact_distribution(tree_logits, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """P(t1, t2, t3) over ``VOCAB ** 3`` cells (cell = t1 * V * V + t2 * V + t3)."""
    joint = np.ones(1)
    for logits in tree_logits:
        joint = (joint[:, None] * processed(logits, temperature, top_p)).reshape(-1)
    np.testing.assert_allclose(joint.sum(), 1.0, rtol=1e-9)
    return joint


def top_p_margin(tree_logits, top_p: float, temperature: float) -> float:
    """How far ``top_p`` is from every cumulative mass step of every conditional distribution."""
    margin = np.inf
    for logits in tree_logits:
        p = np.sort(processed(logits, temperature, 1.0), axis=-1)[:, ::-1]
        margin = min(margin, float(np.abs(np.cumsum(p, axis=-1) - top_p).min()))
    return margin


@pytest.fixture(scope="module")
def top_p(tree_logits) -> float:
    """A top_p far from every nucleus boundary, so float32 logit differences cannot change a nucleus."""
    margin = {float(t): top_p_margin(tree_logits, float(t), NUCLEUS_TEMPERATURE) for t in TOP_P_CANDIDATES}
    best = max(margin, key=margin.get)
    assert margin[best] > 1e-3
    return best


# ------------------------------------------------------------------------------------------------------
# Draws and the test


def draws(setup, **kwargs) -> tuple[np.ndarray, float | None]:
    """``ROWS * CALLS`` 3-token continuations as cell indices, and the acceptance rate when speculating."""
    _, engine, _, batch = setup
    cells, drafted, accepted = [], 0, 0
    for call in range(CALLS):
        results = engine.decode(batch, max_new_tokens=NEW, stop_at_eos=False, seed=7919 * call + 13, **kwargs)
        tokens = np.array([r.token_ids for r in results])
        assert tokens.shape == (ROWS, NEW)
        cells.append(tokens @ (VOCAB ** np.arange(NEW - 1, -1, -1)))
        drafted += results[0].stats.drafted_tokens
        accepted += results[0].stats.accepted_tokens
    return np.concatenate(cells), (accepted / drafted if drafted else None)


def chi_square_p(cells: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of ``cells`` to ``probs``; cells expecting fewer than MIN_EXPECTED draws are merged."""
    observed = np.bincount(cells, minlength=len(probs)).astype(np.float64)
    expected = probs * len(cells)
    big = expected >= MIN_EXPECTED
    obs, exp = list(observed[big]), list(expected[big])
    if (~big).any():
        obs.append(observed[~big].sum())
        exp.append(expected[~big].sum())
    if exp[-1] < MIN_EXPECTED and len(exp) > 2:  # fold a small "rest" cell into the smallest big one
        j = int(np.argmin(exp[:-1]))
        obs[j] += obs.pop()
        exp[j] += exp.pop()
    return float(stats.chisquare(obs, exp).pvalue)


def test_the_target_distribution_is_peaked_and_context_dependent(tree_logits):
    """The setting is informative: many cells are populated, none dominates, and the conditionals differ."""
    p = exact_distribution(tree_logits, 1.0)
    assert (p * ROWS * CALLS >= MIN_EXPECTED).sum() >= 100
    assert p.max() < 0.5
    second = processed(tree_logits[1], 1.0, 1.0)  # P(t2 | t1) for every t1
    assert np.abs(second - second.mean(axis=0)).max() > 0.2


@pytest.mark.parametrize("speculate,temperature,nucleus", [
    (True, 1.0, False),
    (True, NUCLEUS_TEMPERATURE, True),
    (False, 1.0, False),  # the control: plain sampling passes the same test
], ids=["speculative-T1", "speculative-top-p", "plain-T1"])
def test_three_token_distribution_is_the_target_distribution(setup, tree_logits, top_p, speculate,
                                                             temperature, nucleus):
    tp = top_p if nucleus else 1.0
    kwargs = dict(temperature=temperature, top_p=tp)
    if speculate:
        kwargs.update(speculate=True, gamma=GAMMA, draft_settings=BAD_DRAFT)
    cells, acceptance = draws(setup, **kwargs)
    if speculate:  # drafts are rejected often enough that resampling matters, and accepted often too
        assert 0.05 < acceptance < 0.95, acceptance
    want = exact_distribution(tree_logits, temperature, tp)
    if nucleus:  # nothing is ever drawn outside the nucleus of each step
        assert want[cells].min() > 0
    p_value = chi_square_p(cells, want)
    assert p_value > P_MIN, f"p = {p_value:.2e}: the draws do not follow the target distribution"
    # power: the same draws reject a nearby wrong distribution (a higher temperature, no draft involved)
    assert chi_square_p(cells, exact_distribution(tree_logits, 2.0 * temperature, tp)) < P_REJECT
    if nucleus:
        assert chi_square_p(cells, exact_distribution(tree_logits, temperature, 1.0)) < P_REJECT


# ------------------------------------------------------------------------------------------------------
# A live serving batch: requests of different temperatures share every speculative round

SERVED_TEMPERATURES = (1.0, NUCLEUS_TEMPERATURE)


def served_draws(setup) -> tuple[dict[float, np.ndarray], float]:
    """``ROWS * CALLS / 2`` 3-token continuations per temperature from the serving loop, where each round
    verifies requests of both temperatures (and a greedy one) together; and the acceptance rate."""
    from mlc_magicdec.runtime.serving import GenerationConfig, ServeConfig, ServingEngine

    _, engine, prompt, _ = setup
    config = ServeConfig(speculate="on", draft="streamingllm", draft_budget=BAD_DRAFT.budget, gamma=GAMMA,
                         max_running=ROWS + 1, max_batch_tokens=(ROWS + 1) * (PROMPT_LEN + 1),
                         max_waiting=ROWS + 1, kv_capacity=(ROWS + 1) * CONTEXT)
    serving = ServingEngine(Engine(engine.artifact.path), config)
    tokens: dict[str, list[int]] = {}
    temperature_of: dict[str, float] = {}

    def sink(out):
        tokens.setdefault(out.request_id, []).extend(out.token_ids)

    for call in range(CALLS):
        for i in range(ROWS):
            t = SERVED_TEMPERATURES[i % 2]
            rid = serving.submit(prompt, GenerationConfig(max_tokens=NEW, temperature=t, seed=call * ROWS + i,
                                                          ignore_eos=True), sink)
            temperature_of[rid] = t
        serving.submit(prompt, GenerationConfig(max_tokens=NEW, ignore_eos=True), sink)  # a greedy one too
        serving.run_until_idle()
    cells = {t: [] for t in SERVED_TEMPERATURES}
    for rid, t in temperature_of.items():
        cells[t].append(np.asarray(tokens[rid]) @ (VOCAB ** np.arange(NEW - 1, -1, -1)))
    return {t: np.array(c) for t, c in cells.items()}, serving.stats.acceptance_rate


def test_mixed_temperatures_in_a_live_batch_keep_each_requests_distribution(setup, tree_logits):
    cells, acceptance = served_draws(setup)
    assert 0.05 < acceptance < 0.95, acceptance
    for t, draws_t in cells.items():
        assert len(draws_t) == ROWS * CALLS // 2
        p_value = chi_square_p(draws_t, exact_distribution(tree_logits, t))
        assert p_value > P_MIN, f"T={t}: p = {p_value:.2e}: the draws do not follow the target distribution"
        assert chi_square_p(draws_t, exact_distribution(tree_logits, 2.0 * t)) < P_REJECT
